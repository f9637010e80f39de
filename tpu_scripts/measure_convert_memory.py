"""Peak memory of the checkpoint converter on a >= 1 GB random Qwen2-Audio checkpoint.

    OMP_NUM_THREADS=1 python tpu_scripts/measure_convert_memory.py [--vocab 151646 --hidden 1024 ...]

Builds a randomly initialised Qwen2-Audio with transformers (float32), saves it sharded with
save_pretrained, frees it, then runs checkpoints_convert/convert.py in a subprocess and reports the
checkpoint size on disk, the converter's peak RSS (psutil polling of the child and
ru_maxrss from os.wait4) and their ratio. Also reports the RSS of a child that only
imports the converter, the fixed cost that does not grow with the checkpoint. Temporary files are
deleted at the end. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_checkpoint(dst: Path, a) -> None:
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=128, d_model=a.audio_d, encoder_layers=a.audio_layers,
                          encoder_attention_heads=8, encoder_ffn_dim=4 * a.audio_d, max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=a.vocab, hidden_size=a.hidden,
                         intermediate_size=a.intermediate, num_hidden_layers=a.text_layers,
                         num_attention_heads=a.hidden // 128, num_key_value_heads=2, tie_word_embeddings=False),
        audio_token_id=a.vocab - 1)
    model = Qwen2AudioForConditionalGeneration(cfg)
    model.save_pretrained(dst, max_shard_size=a.shard)
    del model
    gc.collect()


def dir_bytes(d: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in d.glob(pattern))


def run_measured(cmd: list[str]) -> tuple[int, int, int, float, str]:
    """Run cmd -> (exit code, peak RSS by 20 ms psutil polling, peak RSS from the kernel's
    ru_maxrss of this very child (os.wait4), seconds, output tail)."""
    import psutil

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
        peak, done = [0], threading.Event()

        def poll():
            ps = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], ps.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.02)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-2000:]
    return proc.returncode, peak[0], usage.ru_maxrss * 1024, time.perf_counter() - t0, tail


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=151646)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--audio-d", type=int, default=512)
    p.add_argument("--audio-layers", type=int, default=4)
    p.add_argument("--shard", default="300MB")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="affjax-convert-mem-"))
    try:
        src, dst = work / "hf", work / "ckpt"
        t0 = time.perf_counter()
        # build in a child so the parent's torch memory is gone before the measurement
        code = subprocess.run([sys.executable, __file__, "--_build", str(src), json.dumps(vars(a))], cwd=ROOT)
        if code.returncode:
            return code.returncode
        ckpt = dir_bytes(src, "*.safetensors")
        print(f"built {src.name}: {ckpt / 1e9:.3f} GB in {len(list(src.glob('*.safetensors')))} shards "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

        rc, _, base_rss, _, tail = run_measured([sys.executable, "-c",
                                             "import jax, orbax.checkpoint, affjax.models.checkpoint, time; "
                                             "jax.numpy.zeros(1).block_until_ready(); time.sleep(0.5)"])
        assert rc == 0, tail
        cmd = [sys.executable, "checkpoints_convert/convert.py", "--src", str(src), "--dst", str(dst),
               "--dtype", a.dtype, "--quiet"]
        rc, peak, ru, secs, tail = run_measured(cmd)
        if rc:
            print(tail, file=sys.stderr)
            return rc
        out = dir_bytes(dst / "params", "**/*")
        result = {
            "checkpoint_bytes": ckpt, "converted_bytes_on_disk": out, "dtype": a.dtype,
            "peak_rss_bytes_polled": peak, "peak_rss_bytes_ru_maxrss": ru,
            "ratio_peak_over_checkpoint": round(max(peak, ru) / ckpt, 3),
            "import_only_rss_bytes": base_rss,
            "ratio_excluding_import_rss": round((max(peak, ru) - base_rss) / ckpt, 3),
            "convert_seconds": round(secs, 1),
        }
        print(json.dumps(result, indent=2))
        return 0 if result["ratio_peak_over_checkpoint"] < 1.5 else 2
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--_build":
        build_checkpoint(Path(sys.argv[2]), argparse.Namespace(**json.loads(sys.argv[3])))
        sys.exit(0)
    sys.exit(main())
