"""`affjax bench-eval`: items per second of `affjax eval` (Qwen2-Audio, task asr) on this machine,
for a tiny and a ~70 M-parameter random checkpoint, at several batch sizes, unpooled vs a pooling
setting, and the padding fraction with and without two-pass scheduling.

Each cell runs the same eval twice into fresh run directories: the first run compiles, the second
is timed (items / run seconds of the eval itself: audio loading, processor, prefill, decoding;
model loading excluded). Random weights give meaningless similarities, so the realised retention
of the pooling setting is reported beside its speed. Manifest: synthetic speech-like audio of 2 to
30 s and prompts of 10 to 200 words, mixed lengths in manifest order.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from affjax.eval.runner import JobConfig, enable_compile_cache, run_eval
from affjax.models.checkpoint import convert, load
from affjax.testing import long_prompt, make_tiny_qwen2_audio, synth_speech_like

# ~70 M parameters with the real Qwen2 vocabulary (151,6xx tokens; tied embeddings: 48.5 M)
MODELS = {
    "tiny": dict(audio_d=64, audio_layers=2, audio_heads=4, text_hidden=64, text_layers=4, heads=4, kv_heads=2,
                 intermediate=128),
    "70m": dict(audio_d=384, audio_layers=4, audio_heads=6, audio_ffn=1536, text_hidden=320, text_layers=8, heads=8,
                kv_heads=4, intermediate=960, tie_word_embeddings=True),
}


def _manifest(d: Path, n: int, seed: int = 0) -> Path:
    import soundfile as sf  # deferred: soundfile (libsndfile) loads only when the manifest is written

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sec = float(rng.uniform(2.0, 30.0))
        words = int(rng.integers(10, 200))
        sf.write(str(d / f"u{i}.wav"), synth_speech_like(sec, seed=100 + i), 16000)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "prompt": long_prompt(words, seed=i),  # holds one audio block
                     "reference": "unused"})
    path = d / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _n_params(ckpt: Path) -> int:
    model, _, _ = load(ckpt)
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model))))


def run_bench(models=("tiny", "70m"), batches=(1, 4, 8), poolings=("none", "dap-aggressive"), items: int = 16,
              max_new_tokens: int = 16, repeats: int = 1, log=print) -> dict:
    out = {"items": items, "max_new_tokens": max_new_tokens, "cells": []}
    with tempfile.TemporaryDirectory(prefix="affjax-bench-eval-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        manifest = _manifest(data, items)
        for name in models:
            src = make_tiny_qwen2_audio(tmp / f"hf-{name}", seed=0, **MODELS[name])
            ckpt = convert(src, tmp / f"ck-{name}", progress=False)
            n_params = _n_params(ckpt)
            log(f"model {name}: {n_params / 1e6:.1f} M parameters")
            for pooling in poolings:
                for bs in batches:
                    for schedule in ("two-pass", "in-order"):
                        if bs == 1 and schedule == "in-order":
                            continue  # one row per batch: nothing to pad, same as two-pass
                        runs = []
                        for k in range(repeats + 1):  # run 0 compiles
                            cfg = JobConfig(ckpt=str(ckpt), manifest=str(manifest), task="asr",
                                             out=str(tmp / "runs" / f"{name}-{pooling}-{bs}-{schedule}-{k}"),
                                             batch_size=bs, pooling=pooling, schedule=schedule,
                                             max_new_tokens=max_new_tokens, progress=False)
                            t0 = time.perf_counter()
                            s = run_eval(cfg, log=lambda *_: None)
                            s["wall"] = time.perf_counter() - t0
                            runs.append(s)
                        timed = runs[1:]
                        if any(r["errors"] or not r["run_seconds"] for r in runs):
                            raise RuntimeError(f"bench eval run failed: {runs[-1]}")
                        cell = {"model": name, "params": n_params, "pooling": pooling, "batch": bs,
                                "schedule": schedule,
                                "items_per_second": statistics.median(items / r["run_seconds"] for r in timed),
                                "compile_run_seconds": runs[0]["run_seconds"],
                                "padding_fraction": timed[0]["padding_fraction"],
                                "final_retention": timed[0].get("final_retention"),
                                "lm_flops_ratio": timed[0].get("lm_prefill_flops_ratio_analytic"),
                                "recompiled_when_warm": bool(timed[0]["compiles"])}
                        out["cells"].append(cell)
                        log(format_cell(cell))
    return out


def format_cell(c: dict) -> str:
    ret = "-" if c["final_retention"] is None else f"{c['final_retention']:.3f}"
    return (f"{c['model']:>5} {c['pooling']:>15} b{c['batch']:<2} {c['schedule']:>9}: "
            f"{c['items_per_second']:7.2f} items/s  padding {c['padding_fraction']:.3f}  retention {ret}"
            + ("  (recompiled!)" if c["recompiled_when_warm"] else ""))


def markdown(result: dict) -> str:
    lines = ["| model | pooling | batch | schedule | items/s | padding | retention | LM FLOPs |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        lines.append(f"| {c['model']} ({c['params'] / 1e6:.0f} M) | {c['pooling']} | {c['batch']} | {c['schedule']} | "
                     f"{c['items_per_second']:.2f} | {c['padding_fraction']:.3f} | "
                     f"{'-' if c['final_retention'] is None else round(c['final_retention'], 3)} | "
                     f"{'-' if c['lm_flops_ratio'] is None else round(c['lm_flops_ratio'], 3)} |")
    return "\n".join(lines)


def main_bench_eval(args) -> int:
    enable_compile_cache()
    res = run_bench(models=tuple(args.models), batches=tuple(args.batch), poolings=tuple(args.pooling),
                    items=args.items, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    print(markdown(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0
