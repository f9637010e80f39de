"""Convert a Hugging Face model directory (or a CTranslate2 Whisper folder) into an affjax (orbax) checkpoint.

    python checkpoints_convert/convert.py --src HF_OR_CT2_DIR --dst CKPT_DIR [--dtype float32|bfloat16] [--overwrite]

Model types: qwen2_audio and whisper (`WhisperForConditionalGeneration.save_pretrained` output).
A CTranslate2 (faster-whisper) folder (model.bin + config.json + tokenizer.json) converts to a
Whisper checkpoint with its processor and generation config.

Runs from the repository root without installing. On any error prints `error: <message>` to
stderr, exits 1, and leaves nothing at --dst.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import affjax  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="Hugging Face model directory (config.json + weights) or a CTranslate2 Whisper folder")
    p.add_argument("--dst", required=True, help="output checkpoint directory (must be absent or empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype to store (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = p.parse_args(argv)

    from affjax.checkpoint import convert

    try:
        convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
