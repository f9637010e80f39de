"""Convert a Hugging Face model directory (or a CTranslate2 Whisper folder) into an affjax (orbax) checkpoint.

    python checkpoints_convert/convert.py --src HF_OR_CT2_DIR --dst CKPT_DIR [--dtype float32|bfloat16] [--overwrite]
    python checkpoints_convert/convert.py --src KIMI_DIR --speech-tokenizer GLM4_TOKENIZER_DIR --dst CKPT_DIR

Model types: qwen2_audio, whisper (`WhisperForConditionalGeneration.save_pretrained` output) and
kimi_audio (the Kimi-Audio-7B(-Instruct) release folder with its whisper-large-v3/ subfolder;
--speech-tokenizer adds the GLM-4-Voice speech tokenizer folder, so that the checkpoint holds
everything that turns audio into the model's two input streams).
A CTranslate2 (faster-whisper) folder (model.bin + config.json + tokenizer.json) converts to a
Whisper checkpoint with its processor and generation config.

Runs from the repository root without installing. On any error prints `error: <message>` to
stderr, exits 1, and leaves nothing at --dst and no temporary directory beside it; SIGTERM and
Ctrl-C count as errors. A run killed outright (SIGKILL, out of memory) leaves its temporary
directory `.DST.tmp-HOST-PID-*` beside --dst: the next conversion to the same --dst removes it and
says so on stderr (see `affjax.models.checkpoint.remove_stale_temps`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

try:
    import affjax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that the conversion's cleanup runs."""


def _on_sigterm(signum, frame):
    raise _Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="Hugging Face model directory (config.json + weights) or a CTranslate2 Whisper folder")
    p.add_argument("--dst", required=True, help="output checkpoint directory (must be absent or empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype to store (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--speech-tokenizer", metavar="DIR",
                   help="kimi_audio: the GLM-4-Voice speech tokenizer folder, converted into the checkpoint")
    args = p.parse_args(argv)

    from affjax.models.checkpoint import convert

    # the converter's log lines (stale temporary directories removed or kept) go to stderr as they
    # are, whatever handlers jax / absl put on the root logger
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    conv_log = logging.getLogger("affjax.models.checkpoint")
    saved = conv_log.level, conv_log.propagate
    conv_log.addHandler(handler)
    conv_log.setLevel(logging.INFO)
    conv_log.propagate = False
    # default SIGTERM ends the process without running the conversion's cleanup: raise instead
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        extras = {"speech_tokenizer": args.speech_tokenizer} if args.speech_tokenizer else None
        convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet,
                extras=extras)
    except (KeyboardInterrupt, _Terminated) as e:
        print(f"error: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        conv_log.removeHandler(handler)
        conv_log.setLevel(saved[0])
        conv_log.propagate = saved[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
