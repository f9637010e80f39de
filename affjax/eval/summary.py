"""The one summary module of every job: retention per stage, LM prefill FLOPs vs unpooled, and the
run facts (versions, command line). Throughput and RTFx come from affjax.eval.runner.Clock."""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
from pathlib import Path

import numpy as np

from affjax.runtime.flops import analytic_lm_flops, tokens_per_layer


def retention_summary(audio_tokens: list[list[int]]) -> dict:
    """Mean retention per stage (audio tokens after the stage / before pooling, averaged over items)
    and the final corpus retention."""
    if not audio_tokens:
        return {}
    a = np.asarray(audio_tokens, np.float64)
    base = np.maximum(a[:, :1], 1)
    return {"retention_per_stage": [round(float((a[:, k:k + 1] / base).mean()), 4) for k in range(1, a.shape[1])],
            "final_retention": round(float(a[:, -1].sum() / max(a[:, 0].sum(), 1)), 4)}


def flops_summary(text_cfg, stages, counts) -> dict:
    """Pooled vs unpooled LM prefill FLOPs, analytic (docs/pooling.md section 5), of the sequences run."""
    if not counts:
        return {}
    L = text_cfg.layers
    pooled = analytic_lm_flops(text_cfg, [tokens_per_layer(L, stages, c) for c in counts])
    unpooled = analytic_lm_flops(text_cfg, [[c[0]] * L for c in counts])
    return {"lm_prefill_flops_ratio_analytic": round(pooled / unpooled, 4),
            "lm_prefill_flops": {"analytic_pooled": pooled, "analytic_unpooled": unpooled}}


def versions() -> dict:
    out = {}
    for pkg in ("affjax", "jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])


def write_summary(path: Path, summary: dict, markdown: str | None = None) -> None:
    path.write_text(json.dumps(summary, indent=1) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown + "\n")


