"""What the accuracy sweeps share (`affjax bench-whisper-pooling`, `affjax bench-lslm-pooling`):
the resumable JSON of cells, the cell loop, the largest cut within +0.5 WER and the WER vs
retention plot.

A sweep's JSON holds ``setup`` (what the results depend on: a rerun with another setup is refused),
``unpooled`` and ``cells`` (key -> cell). A cell has at least ``stage``, ``method`` (``sim`` =
Affinity Pooling, ``avg`` / ``drop`` = the fixed-rate controls), ``proportional``, ``retention`` and
``wer`` (a fraction); ``setup["stages"]`` maps each stage name to its label.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from affjax.eval.metrics import corpus_wer, word_errors

# (method, proportional) in table order; "sim" = Affinity Pooling (similarity threshold)
METHODS = (("sim", False), ("sim", True), ("avg", False), ("avg", True), ("drop", False))
WER_MARGIN = 0.005  # "within +0.5 WER": absolute, WER as a fraction


def method_name(method: str, prop: bool) -> str:
    return {"sim": "Affinity Pooling", "avg": "uniform average", "drop": "uniform drop"}[method] + \
        (" + proportional" if prop else "")


def pct(x, digits=1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def wer_metrics(norm_refs: list[str], norm_hyps: list[str], base_norm: list[str], sources: list[str]) -> dict:
    """Corpus WER of normalised transcripts (and per source: ``wer_<source>``), ``changed``: the
    transcripts that differ from unpooled after normalisation, and ``errors``: each item's word
    errors (for paired comparisons, ``paired_delta``)."""
    def wer(idx):
        w = corpus_wer([norm_refs[i] for i in idx], [norm_hyps[i] for i in idx])
        return None if w is None else round(w, 5)

    out = {"wer": wer(range(len(norm_refs))), "changed": int(sum(h != b for h, b in zip(norm_hyps, base_norm))),
           "errors": word_errors(norm_refs, norm_hyps)}
    for src in sorted(set(sources)):
        out[f"wer_{src}"] = wer([i for i, s in enumerate(sources) if s == src])
    return out


def paired_delta(errors_a: list, errors_b: list, ref_words: list[int], items: list[int], *, n_boot: int = 2000,
                 seed: int = 0) -> dict:
    """Corpus WERs of a and b over the same ``items`` (indices) and their difference (a - b), with a
    95 % interval from a paired bootstrap (items resampled with replacement, both methods together), and the items where
    a made fewer (``better``) or more (``worse``) word errors than b."""
    idx = [i for i in items if errors_a[i] is not None and errors_b[i] is not None and ref_words[i]]
    if not idx:
        return {"a": None, "b": None, "delta": None, "lo": None, "hi": None, "better": 0, "worse": 0, "items": 0}
    a, b, n = (np.asarray([v[i] for i in idx], np.float64) for v in (errors_a, errors_b, ref_words))
    draw = np.random.default_rng(seed).integers(0, len(idx), (n_boot, len(idx)))
    boot = (a[draw].sum(1) - b[draw].sum(1)) / n[draw].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"a": float(a.sum() / n.sum()), "b": float(b.sum() / n.sum()), "delta": float((a.sum() - b.sum()) / n.sum()),
            "lo": float(lo), "hi": float(hi),
            "better": int((a < b).sum()), "worse": int((a > b).sum()), "items": len(idx)}


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Item indices sorted by length (longest first) and cut into batches of near-equal size: rows
    of a batch end their transcripts at similar steps and need the same buffers."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n_batches = math.ceil(len(order) / batch_size)
    size = math.ceil(len(order) / n_batches)
    return [order[i:i + size] for i in range(0, len(order), size)]


# ----------------------------------------------------------------------------------------------
# the resumable JSON and the cell loop


def open_doc(json_path: Path, setup: dict) -> dict:
    """The sweep's JSON: the one at ``json_path`` when its setup matches (the keys of ``setup``),
    else a new one; another setup is refused (ValueError)."""
    if not json_path.is_file():
        return {"setup": setup, "cells": {}}
    old = json.loads(json_path.read_text())
    if {k: old.get("setup", {}).get(k) for k in setup} != setup:
        raise ValueError(f"{json_path} holds a sweep with another setup ({old.get('setup')}); "
                         "give another --out or --name, or remove it")
    return old


def save_doc(doc: dict, json_path: Path) -> None:
    """Written whole to a temporary file, then renamed: a killed run never leaves half a JSON."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(json_path)


def store_unpooled(doc: dict, unpooled: dict, log=print) -> None:
    """The unpooled run (metrics and ``texts``) into the JSON; a resumed sweep whose unpooled
    transcripts changed says so (its cells were compared with the old ones)."""
    old = doc.get("unpooled")
    if old and old["texts"] != unpooled["texts"]:
        log("warning: the unpooled transcripts differ from the ones in the JSON (resumed on another machine?)")
    doc["unpooled"] = unpooled


def run_cells(doc: dict, specs: list[dict], run_one, save, transcripts: Path, progress: bool = True,
              free_compiled: bool = True) -> int:
    """Run the cells of ``specs`` (dicts with a ``key``) that ``doc["cells"]`` lacks, in order:
    ``run_one(spec) -> (cell, texts)``; after each, the cell is stored, ``save()`` called and its
    transcripts appended to ``transcripts`` (JSON lines). Returns the number of cells run.

    ``free_compiled``: drop JAX's in-memory compiled programs after each cell. Every cell brings new
    sequence buckets after its stages, so kept programs pile up: a 100-item lslm-tiny sweep reached
    20 GB and died in LLVM after 19 cells, where with this it stays near its first cell's footprint.
    The next cell reloads what it shares from the persistent compilation cache."""
    import jax  # deferred: the reporting half of this module runs without jax
    todo = [s for s in specs if s["key"] not in doc["cells"]]
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), unit="cell", disable=not progress, desc="sweep")
    transcripts.parent.mkdir(parents=True, exist_ok=True)
    with open(transcripts, "a", encoding="utf-8") as tf:
        for spec in todo:
            cell, texts = run_one(spec)
            doc["cells"][spec["key"]] = cell
            save()
            tf.write(json.dumps({"key": spec["key"], "texts": texts}, ensure_ascii=False) + "\n")
            tf.flush()
            if free_compiled:
                jax.clear_caches()
            bar.set_postfix_str(f"{spec['key']} ret {cell['retention']:.2f} WER {100 * cell['wer']:.1f}")
            bar.update(1)
    bar.close()
    return len(todo)


# ----------------------------------------------------------------------------------------------
# reporting


def main(run_sweep, cfg, errors=(FileNotFoundError, ValueError)) -> int:
    """A sweep command: ``run_sweep(cfg)``, then its table; one line and exit status 1 on the
    ``errors`` of bad settings or inputs, or a missing asset."""
    try:
        doc = run_sweep(cfg)
    except Exception as e:  # noqa: BLE001 - which errors are the user's is the caller's list
        if not isinstance(e, errors) and type(e).__name__ != "AssetMissing":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((Path(cfg.out) / f"{cfg.name}_table.md").read_text())
    print(f"{len(doc['cells'])} cells in {Path(cfg.out) / (cfg.name + '.json')}")
    return 0


def largest_cuts(doc: dict, margin: float = WER_MARGIN, *, field: str = "wer", stage: str | None = None,
                 ceiling: float | None = None) -> list[dict]:
    """Per (method, proportional): the cell (of ``stage``, or any) with the lowest retention whose
    WER ``field`` (``wer``, or one source's ``wer_<source>``) is within ``margin`` (absolute) of
    unpooled's (or at most ``ceiling``, a WER fixed from outside)."""
    limit = doc["unpooled"][field] + margin if ceiling is None else ceiling
    out = []
    for method, prop in METHODS:
        ok = [c for c in doc["cells"].values()
              if c["method"] == method and c["proportional"] == prop and (stage is None or c["stage"] == stage)
              and c[field] is not None and c[field] <= limit]
        best = min(ok, key=lambda c: (c["retention"], c["wer"]), default=None)
        out.append({"method": method, "proportional": prop, "cell": best})
    return out


def cuts_table(doc: dict, describe, columns: list[tuple[str, str]]) -> list[str]:
    """Markdown lines: the largest cut within +0.5 WER of each method; ``describe(cell)`` names the
    cell, ``columns`` are (header, cell field of a fraction) shown after its WER."""
    head = "| method | lowest retention | cell | WER | " + " | ".join(h for h, _ in columns) + " |"
    lines = ["### Largest cut within +0.5 WER (absolute) of unpooled", "", head,
             "|---" * (4 + len(columns)) + "|"]
    for r in largest_cuts(doc):
        c, name = r["cell"], method_name(r["method"], r["proportional"])
        if c is None:
            lines.append(f"| {name} | none | - | - | " + " | ".join("-" for _ in columns) + " |")
            continue
        lines.append(f"| {name} | {pct(c['retention'])} % | {describe(c)} | {pct(c['wer'], 2)} % | "
                     + " | ".join(f"{pct(c[k])} %" for _, k in columns) + " |")
    return lines


def write_plot(doc: dict, path: Path, title: str, unit: str = "tokens") -> None:
    """WER vs retention, one column per stage: Affinity Pooling (first window solid, others
    dashed; plain and proportional) and the fixed-rate controls, with unpooled and +0.5 as
    lines. Top row: the whole range (log scale); bottom row: a linear zoom around unpooled.
    Cells without a ``window`` are drawn as one window; ``unit`` names what retention counts."""
    import matplotlib  # deferred: matplotlib is heavy; only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    cells, setup = doc["cells"], doc["setup"]
    base = 100 * doc["unpooled"]["wer"]
    stages = [s for s in setup["stages"] if any(c["stage"] == s for c in cells.values())] or list(setup["stages"])
    n = len(stages)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 8.4), squeeze=False, gridspec_kw={"height_ratios": [3, 2]})
    style = {("sim", False): ("tab:blue", "o"), ("sim", True): ("tab:orange", "s"),
             ("avg", False): ("tab:green", "^"), ("avg", True): ("tab:red", "v"), ("drop", False): ("tab:purple", "x")}
    windows = sorted({c.get("window", 0) for c in cells.values()})
    for col, stage in enumerate(stages):
        for row in (0, 1):
            ax = axes[row][col]
            for (method, prop), (color, marker) in style.items():
                for w in windows:
                    pts = sorted((c["retention"], c["wer"]) for c in cells.values()
                                 if c["stage"] == stage and c["method"] == method and c["proportional"] == prop
                                 and c.get("window", 0) == w)
                    if pts:
                        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], color=color, marker=marker,
                                ms=4, lw=1.3, ls="-" if w == windows[0] else "--",
                                label=method_name(method, prop) + (f", window {w}" if method == "sim" and w else ""))
            ax.axhline(base, color="black", lw=1, label=f"unpooled ({base:.2f} %)")
            ax.axhline(base + 100 * WER_MARGIN, color="gray", lw=1, ls=":", label="unpooled + 0.5")
            ax.set_xlim(0, 102)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
                lo, hi = ax.get_ylim()
                ax.set_yticks([t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= t <= hi])
                ax.set_ylim(lo, hi)
                ax.set_title(f"stage: {setup['stages'][stage]}")
            else:
                ax.set_ylim(max(0.0, base - 1.0), base + 2.5)
                ax.set_xlabel(f"audio {unit} kept (%)")
        axes[0][col].set_ylabel("corpus WER (%), log scale" if col == 0 else "")
        axes[1][col].set_ylabel("corpus WER (%), zoom" if col == 0 else "")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4 if n >= 3 else 2, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 if n >= 3 else 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
