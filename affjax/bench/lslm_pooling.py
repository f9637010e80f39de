"""`affjax bench-lslm-pooling`: the accuracy sweep of Affinity Pooling on a speech LM checkpoint
(Qwen2-Audio format, e.g. lslm-tiny: docs/training.md).

    affjax bench-lslm-pooling --ckpt CKPT [--manifest M] [--librivox N] [--stages input 7 15 22 dual]
                              [--taus ...] [--control-taus ...] [--proportional-too]
                              [--out docs/results] [--name lslm_pooling]

Data: the first N LibriVox clips (real read speech, ``affjax.data.assets.librivox_items``) and the
items of ``--manifest`` (JSON lines: ``id``, ``audio``, the transcript as ``reference``, ``target``
or ``text``, optional ``prompt``; e.g. the held-out ``test.jsonl`` of ``affjax.data.corpus``). Each
clip is at most 30 s (one audio span: what the fixed-rate controls take). Prompt: the item's, else
the ASR prompt the jobs use; greedy decoding up to ``--max-new-tokens``.

Stages (``--stages``; default: input, decoder layers L/4, L/2, 3L/4 and dual):
- ``input``: one stage on the language model's input embeddings (layer 0, window ``--window-input``);
- ``l`` (1 .. L-1): one stage after decoder layer l (window ``--window-deep``);
- ``dual`` or ``dual:l``: the input stage at tau plus a deep stage after layer l (default L-3, the
  paper presets' deep layer) at tau - ``--dual-offset`` (0.1: tau 0.9 and 0.8 are the presets
  dap-conservative and dap-aggressive).

Cells. For every stage and tau: Affinity Pooling (plain mean; with ``--proportional-too`` also
``proportional``: log group size on the keys of every later attention), and for the taus in
``--control-taus`` the fixed-rate controls at equal retention, item by item and stage by stage:
each item keeps exactly as many audio tokens at each stage as the similarity cell kept for it
(with the same ``proportional``), by uniform average pooling or by keeping evenly spaced tokens
(``affjax.runtime.engine.Control``; plain drop only: dropped tokens merge nothing, so proportional
changes nothing).

Per cell: retention (audio tokens after the last stage / before pooling, over the corpus; and per
stage, mean over items), corpus WER (Whisper's English normaliser, as the eval jobs), per source,
transcripts changed vs unpooled (after normalisation; ``changed_raw``: token sequences), LLM
prefill FLOPs relative to unpooled (analytic, affjax.runtime.flops), unfinished transcripts (hit
``--max-new-tokens``), per-item audio and LM token counts, wall time.

Sharing work. Items are encoded once (audio encoder, projector, embeddings: ``Engine.front_rows``
of an unpooled engine, kept on the host), sorted by length and cut into batches; every cell packs
the stored rows again (``Engine.pack_rows``) and runs its stages, layers and decoding
(``Engine.run_packed``). The unpooled run gives the reference transcripts. Resumable: the JSON is
rewritten after each cell, and a rerun skips the cells it holds (its checkpoint, items and
decoding settings must match; new stages or taus add cells), and judges the new cells against the
unpooled transcripts the JSON holds; with every cell there it only writes the table and plot.

Outputs in ``--out``: ``NAME.json``, ``NAME_table.md`` (per stage and tau, every method's WER; the
largest cuts within +0.5 WER; per stage, the largest cuts within +1.0 WER on the manifest's items),
``NAME.png`` (WER vs retention per stage, the controls drawn too);
``--work`` (default ``runs/NAME``) gets ``transcripts.jsonl`` (every cell's transcripts).

``affjax compare-cuts`` (:func:`compare_cuts`) reads several models' sweep JSONs and lists, per
stage and method, each model's largest cut at the first model's unpooled WER + margin.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from affjax.bench import sweep
from affjax.bench.sweep import (METHODS, cuts_table, length_batches, open_doc, pct, run_cells, save_doc, store_unpooled,
                                wer_metrics)
from affjax.data.assets import librivox_items
from affjax.data.audio import load_audio
from affjax.data.manifest import read_manifest
from affjax.eval import frontends
from affjax.eval.metrics import make_normalizer
from affjax.eval.results import fingerprint_checkpoint
from affjax.eval.runner import REFERENCE_NAMES, TRACES, compiles_since, enable_compile_cache
from affjax.eval.summary import flops_summary, retention_summary
from affjax.models.checkpoint import CONFIG_NAME, get_spec
from affjax.pooling.spec import PoolingConfig, Stage
from affjax.runtime.engine import Control, Engine

__all__ = ["SweepConfig", "run_sweep", "cell_specs", "default_stages", "stage_settings", "write_table",
           "merge_docs", "compare_cuts", "main_bench_lslm_pooling", "main_compare_cuts", "TAUS", "CONTROL_TAUS"]

TAUS = (0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6)
CONTROL_TAUS = (0.98, 0.95, 0.9, 0.85, 0.8, 0.7)
GOAL_MARGIN = 0.01  # lslm-tiny's goal: the largest cut at <= +1.0 WER (absolute), per stage
REFERENCE_FIELDS = ("reference", "target") + REFERENCE_NAMES  # `target`: the training manifests' field


@dataclasses.dataclass
class SweepConfig:
    ckpt: str
    manifest: str | None = None
    limit: int | None = None          # the first N manifest items
    librivox: int = 5                 # LibriVox clips (0 .. 5)
    stages: tuple | None = None       # default: default_stages(L)
    taus: tuple = TAUS
    controls: bool = True
    control_taus: tuple = CONTROL_TAUS
    proportional_too: bool = False
    window_input: int = 1
    window_deep: int = 3
    dual_offset: float = 0.1          # the dual schedule's deep stage runs at tau - dual_offset
    positions: str = "first"
    batch_size: int = 8
    max_new_tokens: int = 96
    dtype: str | None = None
    out: str = "docs/results"
    work: str | None = None           # default runs/<name>
    name: str = "lslm_pooling"
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# stages and cells


def default_stages(n_layers: int) -> tuple[str, ...]:
    """input, the deep layers L/4, L/2, 3L/4 (those in 1 .. L-1, once each), and dual."""
    deep = sorted({l for l in (n_layers // 4, n_layers // 2, 3 * n_layers // 4) if 1 <= l <= n_layers - 1})
    return ("input", *map(str, deep), "dual")


def _dual_layer(name: str, n_layers: int) -> int:
    _, _, layer = name.partition(":")
    return int(layer) if layer else max(1, n_layers - 3)


def stage_settings(name: str, tau: float, cfg: SweepConfig, n_layers: int) -> tuple[Stage, ...]:
    """The pooling stages of stage name ``name`` at threshold ``tau`` (module docstring)."""
    try:
        if name == "input":
            return (Stage(0, tau, cfg.window_input),)
        if name == "dual" or name.startswith("dual:"):
            deep = _dual_layer(name, n_layers)
            if not 1 <= deep <= n_layers - 1:
                raise ValueError
            return Stage(0, tau, cfg.window_input), Stage(deep, round(tau - cfg.dual_offset, 6), cfg.window_deep)
        layer = int(name)
        if not 1 <= layer <= n_layers - 1:
            raise ValueError
        return (Stage(layer, tau, cfg.window_deep),)
    except ValueError:
        raise ValueError(f"stage {name!r}: expected input, a decoder layer 1 .. {n_layers - 1}, dual or "
                         f"dual:LAYER") from None


def stage_label(name: str, cfg: SweepConfig, n_layers: int) -> str:
    if name == "input":
        return f"input embeddings (window {cfg.window_input})"
    if name.startswith("dual"):
        return f"input + layer {_dual_layer(name, n_layers)} at tau - {cfg.dual_offset:g}"
    return f"after decoder layer {name} (window {cfg.window_deep})"


def cell_key(stage: str, tau: float, method: str, proportional: bool) -> str:
    return f"{stage}/tau{tau:g}/{method}{'+prop' if proportional else ''}"


def cell_specs(cfg: SweepConfig, stages) -> list[dict]:
    """Every cell in run order: stage, then tau; a tau's similarity cells before its controls, which
    take their per-item counts (``source``: the similarity cell with the same ``proportional``)."""
    props = (False, True) if cfg.proportional_too else (False,)
    specs = []
    for stage in stages:
        for tau in cfg.taus:
            methods = [("sim", p) for p in props]
            if cfg.controls and tau in cfg.control_taus:
                methods += [("avg", p) for p in props] + [("drop", False)]
            for method, prop in methods:
                specs.append(dict(key=cell_key(stage, tau, method, prop), stage=stage, tau=float(tau), method=method,
                                  proportional=prop, source=cell_key(stage, tau, "sim", prop)))
    return specs


# ----------------------------------------------------------------------------------------------
# data


def load_items(cfg: SweepConfig) -> list[dict]:
    """id, source (librivox / manifest), reference, audio path and prompt (None: the default) of
    every item, LibriVox first."""
    items = [dict(id=it["id"], source="librivox", reference=it["text"], audio=it["audio"], prompt=None)
             for it in (librivox_items()[:cfg.librivox] if cfg.librivox else [])]
    if cfg.manifest:
        rows = read_manifest(cfg.manifest, required=("id", "audio"))
        for r in rows[:cfg.limit] if cfg.limit else rows:
            if r.error is not None:
                raise ValueError(f"{cfg.manifest}: {r.error}")
            ref = next((r.item[k] for k in REFERENCE_FIELDS if isinstance(r.item.get(k), str)), None)
            if ref is None:
                raise ValueError(f"{cfg.manifest}: item {r.id} has no transcript ({', '.join(REFERENCE_FIELDS)})")
            items.append(dict(id=r.id, source="manifest", reference=ref, audio=r.item["audio"],
                              prompt=r.item.get("prompt")))
    if not items:
        raise ValueError("no items: give --manifest or keep the LibriVox clips (--librivox 1 .. 5)")
    if len({it["id"] for it in items}) != len(items):
        raise ValueError("item ids must be unique")
    return items


def encode_items(items: list[dict], frontend) -> list:
    """Each item's encoded prompt (one clip of at most 30 s: one audio span)."""
    out = []
    for it in items:
        wave = load_audio(it["audio"], sr=frontend.sampling_rate)
        enc, windows = frontend.encode(it["prompt"] or frontend.default_prompt("asr", it), [wave])
        if windows != 1:
            raise ValueError(f"item {it['id']}: longer than 30 s (the controls take one clip of at most 30 s)")
        it["seconds"] = round(len(wave) / frontend.sampling_rate, 2)
        out.append(enc)
    return out


# ----------------------------------------------------------------------------------------------
# the sweep


def run_cell(engine: Engine, fronts: list, batches: list[list[int]], bsz: int, max_new_tokens: int,
             keep: list[np.ndarray] | None = None, kind: str | None = None) -> dict:
    """Transcribe every item with one engine (its pooling setting) from the stored front rows. With
    ``kind`` (avg / drop) the fixed-rate controls run in place of the stages, item i keeping
    keep[k][i] audio tokens at stage k. Returns per-item lists in item order: tokens, audio tokens
    and LM tokens (unpooled, after each stage)."""
    n = len(fronts)
    res = {"tokens": [None] * n, "audio": [None] * n, "lm": [None] * n}
    for rows in batches:
        packed = engine.pack_rows([fronts[i] for i in rows], None, bsz)
        control = None
        if kind is not None:  # this batch's counts (padding rows have no audio: any count does)
            control = Control(kind, tuple(np.pad(np.asarray(k, np.int32)[rows], (0, bsz - len(rows)),
                                                 constant_values=1) for k in keep))
        toks, stats = engine.run_packed(packed, 0, max_new_tokens=max_new_tokens, control=control)
        for j, i in enumerate(rows):
            res["tokens"][i] = toks[j]
            res["audio"][i] = fronts[i].audio[:1] + [int(s["audio_out"][j]) for s in stats]
            res["lm"][i] = fronts[i].lm[:1] + [int(s["n_valid"][j]) for s in stats]
    return res


def _metrics(res: dict, texts: list[str], stages, text_cfg, norm, norm_refs, base: dict | None, sources,
             max_new_tokens: int) -> dict:
    """A cell's figures (module docstring) from run_cell's result; `base` None: the unpooled run."""
    hyps = [norm(t) for t in texts]
    out = {**wer_metrics(norm_refs, hyps, base["norm"] if base else hyps, sources),
           "changed_raw": int(sum(t != b for t, b in zip(res["tokens"], base["tokens"]))) if base else 0,
           "unfinished": int(sum(len(t) >= max_new_tokens for t in res["tokens"]))}
    if stages:
        r = retention_summary(res["audio"])
        f = flops_summary(text_cfg, stages, res["lm"])
        out.update(retention=r["final_retention"], retention_per_stage=r["retention_per_stage"],
                   lm_flops_rel=f["lm_prefill_flops_ratio_analytic"])
    else:
        out.update(retention=1.0, lm_flops_rel=1.0)
    return out


def run_sweep(cfg: SweepConfig, log=print, loaded=None) -> dict:
    """Run (or resume) the sweep; returns the JSON document it wrote. `loaded`: (model, cfg, frontend)
    of the checkpoint, already loaded with `cfg.dtype`."""
    t_start = time.perf_counter()
    traces0 = dict(TRACES)
    ckpt = Path(cfg.ckpt)
    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    mcfg = get_spec(meta["model_type"]).config_from_hf(meta["hf_config"])
    L = mcfg.text.layers
    stages = tuple(cfg.stages or default_stages(L))
    for s in stages:  # bad names fail before the model loads
        stage_settings(s, 0.5, cfg, L)
    out_dir = Path(cfg.out)
    work = Path(cfg.work or Path("runs") / cfg.name)
    json_path = out_dir / f"{cfg.name}.json"

    items = load_items(cfg)
    norm, norm_name = make_normalizer(None)
    setup = {"ckpt": fingerprint_checkpoint(ckpt), "items": [it["id"] for it in items], "dtype": cfg.dtype,
             "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens, "positions": cfg.positions,
             "window_input": cfg.window_input, "window_deep": cfg.window_deep, "dual_offset": cfg.dual_offset,
             "normalizer": norm_name}
    doc = open_doc(json_path, setup)  # before the model: a mismatch costs nothing
    specs = cell_specs(cfg, stages)
    labels = {**doc["setup"].get("stages", {}), **{s: stage_label(s, cfg, L) for s in stages}}  # earlier runs' too
    if "tokens" in doc.get("unpooled", {}) and all(s["key"] in doc["cells"] for s in specs):
        log(f"{json_path}: every cell is there; writing the table and plot only")
        doc["setup"]["stages"] = labels
        doc["last_run"] = {"cells_run": 0, "seconds": round(time.perf_counter() - t_start, 1), "compiles": 0}
        return _write_outputs(doc, cfg, out_dir, json_path)

    model, _, frontend = loaded or frontends.load(ckpt, cfg.dtype)
    encs = encode_items(items, frontend)
    sources = [it["source"] for it in items]
    norm_refs = [norm(it["reference"]) for it in items]
    batches = length_batches([len(e.ids) for e in encs], cfg.batch_size)
    bsz = max(len(b) for b in batches)
    setup.update(model=ckpt.resolve().name, layers=L, batch_rows=bsz, stages=labels,
                 durations_s=[it["seconds"] for it in items], references=[it["reference"] for it in items],
                 sources=sources, ref_words=[len(r.split()) for r in norm_refs])

    def save():
        doc["setup"] = setup
        save_doc(doc, json_path)

    def engine(stage_list=(), proportional=False):
        return Engine(model, pooling=PoolingConfig(tuple(stage_list), cfg.positions, proportional),
                      eos_ids=frontend.eos_ids, pad_id=frontend.pad_id)

    # the audio encoder, projector and embeddings once per batch; rows wait on the host
    t0 = time.perf_counter()
    plain = engine()
    fronts = [None] * len(items)
    for rows in batches:
        for i, row in zip(rows, plain.front_rows(frontend.collate([encs[i] for i in rows], bsz))):
            fronts[i] = row
    t_front = time.perf_counter() - t0
    setup["front_seconds"] = round(t_front, 2)

    if "tokens" in doc.get("unpooled", {}):  # a resumed sweep: its cells were judged against these
        unpooled = doc["unpooled"]
        log(f"unpooled: WER {pct(unpooled['wer'], 2)} % (from {json_path}; encoding {t_front:.0f} s)")
    else:
        t0 = time.perf_counter()
        res = run_cell(plain, fronts, batches, bsz, cfg.max_new_tokens)
        texts = [frontend.text(t) for t in res["tokens"]]
        unpooled = _metrics(res, texts, (), mcfg.text, norm, norm_refs, None, sources, cfg.max_new_tokens)
        unpooled.update(seconds=round(time.perf_counter() - t0, 2), texts=texts, tokens=res["tokens"],
                        audio_tokens=[a[0] for a in res["audio"]], lm_tokens=[n[0] for n in res["lm"]])
        store_unpooled(doc, unpooled, log)
        save()
        log(f"unpooled: WER {pct(unpooled['wer'], 2)} % over {len(items)} items ({unpooled['unfinished']} reached "
            f"--max-new-tokens; encoding {t_front:.0f} s, unpooled decoding {unpooled['seconds']:.0f} s)")
    base = {"tokens": unpooled["tokens"], "norm": [norm(t) for t in unpooled["texts"]]}

    def run_one(spec):
        st = stage_settings(spec["stage"], spec["tau"], cfg, L)
        keep = kind = None
        if spec["method"] != "sim":
            src = doc["cells"][spec["source"]]["audio_tokens"]
            keep, kind = [[a[k + 1] for a in src] for k in range(len(st))], spec["method"]
        t0 = time.perf_counter()
        r = run_cell(engine(st, spec["proportional"]), fronts, batches, bsz, cfg.max_new_tokens, keep, kind)
        seconds = time.perf_counter() - t0
        texts = [frontend.text(t) for t in r["tokens"]]
        cell = {k: spec[k] for k in ("stage", "tau", "method", "proportional")}
        cell["pooling"] = PoolingConfig(st).to_text()
        cell.update(_metrics(r, texts, st, mcfg.text, norm, norm_refs, base, sources, cfg.max_new_tokens))
        cell.update(seconds=round(seconds, 2), audio_tokens=r["audio"], lm_tokens=r["lm"])
        return cell, texts

    n_run = run_cells(doc, specs, run_one, save, work / "transcripts.jsonl", cfg.progress)
    doc["last_run"] = {"cells_run": n_run, "seconds": round(time.perf_counter() - t_start, 1),
                       "compiles": compiles_since(traces0)}
    doc["setup"] = setup
    return _write_outputs(doc, cfg, out_dir, json_path)


def _write_outputs(doc: dict, cfg: SweepConfig, out_dir: Path, json_path: Path) -> dict:
    save_doc(doc, json_path)
    write_table(doc, out_dir / f"{cfg.name}_table.md")
    sweep.write_plot(doc, out_dir / f"{cfg.name}.png",
                     f"{doc['setup']['model']}: WER vs audio tokens kept ({len(doc['setup']['items'])} utterances; "
                     "the controls keep the same tokens per item and stage)")
    return doc


# ----------------------------------------------------------------------------------------------
# reporting


def write_table(doc: dict, path: Path) -> str:
    """Markdown: per stage, one row per tau with every method's WER; then the largest cuts within
    +0.5 WER, and per stage within +1.0 WER on the held-out items."""
    cells, un, setup = doc["cells"], doc["unpooled"], doc["setup"]
    per_source = ", ".join(f"{k[4:]} {pct(v, 2)} %" for k, v in un.items() if k.startswith("wer_"))
    lines = [f"Unpooled: WER {pct(un['wer'], 2)} % ({len(setup['items'])} items; {per_source}).", ""]
    for stage, label in setup["stages"].items():
        taus = sorted({c["tau"] for c in cells.values() if c["stage"] == stage}, reverse=True)
        if not taus:
            continue
        lines += [f"### Stage: {label}", "",
                  "| tau | retention | WER sim | WER sim+prop | WER avg | WER avg+prop | WER drop "
                  "| changed (sim / +prop / avg / +prop / drop) | LM prefill FLOPs (sim) | time s (sim) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for tau in taus:
            get = {(m, p): cells.get(cell_key(stage, tau, m, p)) for m, p in METHODS}
            sim = get[("sim", False)] or get[("sim", True)]
            wers = " | ".join(pct(c["wer"], 2) if c else "-" for c in get.values())
            changed = " / ".join(str(c["changed"]) if c else "-" for c in get.values())
            lines.append(f"| {tau:g} | {pct(sim['retention'])} % | {wers} | {changed} | {pct(sim['lm_flops_rel'])} % "
                         f"| {sim['seconds']:.0f} |")
        lines.append("")
    lines += cuts_table(doc, lambda c: f"{setup['stages'][c['stage']]}, tau {c['tau']:g}",
                        [("LM prefill FLOPs", "lm_flops_rel")])
    lines += [""] + stage_cuts_table(doc) + [""] + paired_table(doc)
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def stage_cuts_table(doc: dict, margin: float = GOAL_MARGIN) -> list[str]:
    """Markdown lines: per stage and method, the largest cut within +``margin`` (absolute) of unpooled
    on the manifest's items (the held-out speech; all items when there is no manifest)."""
    un, setup = doc["unpooled"], doc["setup"]
    field = "wer_manifest" if un.get("wer_manifest") is not None else "wer"
    where = "the manifest's items" if field == "wer_manifest" else "all items"
    lines = [f"### Largest cut per stage within +{100 * margin:.1f} WER (absolute) of unpooled, on {where} "
             f"(unpooled {pct(un[field], 2)} %)", "",
             "| stage | method | lowest retention | tau | WER | LM prefill FLOPs |", "|---|---|---|---|---|---|"]
    for stage, label in setup["stages"].items():
        if not any(c["stage"] == stage for c in doc["cells"].values()):
            continue
        for r in sweep.largest_cuts(doc, margin, field=field, stage=stage):
            c, name = r["cell"], sweep.method_name(r["method"], r["proportional"])
            if not any(x["stage"] == stage and x["method"] == r["method"] and x["proportional"] == r["proportional"]
                       for x in doc["cells"].values()):
                continue  # a method this sweep did not run
            lines.append(f"| {label} | {name} | none | - | - | - |" if c is None else
                         f"| {label} | {name} | {pct(c['retention'])} % | {c['tau']:g} | {pct(c[field], 2)} % "
                         f"| {pct(c['lm_flops_rel'])} % |")
    return lines


def paired_table(doc: dict) -> list[str]:
    """Markdown lines: Affinity Pooling against each fixed-rate control at equal retention, paired
    item by item over the manifest's items (all items without a manifest): the WER difference with
    its 95 % bootstrap interval, and the items each side transcribed with fewer word errors."""
    setup, cells = doc["setup"], doc["cells"]
    if "ref_words" not in setup:
        return []  # a JSON from before per-item errors were kept
    sources = setup["sources"]
    held_out = "manifest" in sources
    items = [i for i, s in enumerate(sources) if s == "manifest" or not held_out]
    where = "the manifest's items" if held_out else "all items"
    lines = [f"### Affinity Pooling against the controls at equal retention (paired over {where})", "",
             "Negative: Affinity Pooling has the lower WER. Interval: 95 %, paired bootstrap over items.", "",
             "| stage | tau | retention | control | WER sim | WER control | sim - control (95 % interval) "
             "| items sim better / worse |", "|---|---|---|---|---|---|---|---|"]
    for c in cells.values():
        if c["method"] == "sim" or "errors" not in c:
            continue
        sim = cells.get(cell_key(c["stage"], c["tau"], "sim", c["proportional"]))
        if sim is None or "errors" not in sim:
            continue
        d = sweep.paired_delta(sim["errors"], c["errors"], setup["ref_words"], items)
        if d["delta"] is None:
            continue
        lines.append(f"| {setup['stages'][c['stage']]} | {c['tau']:g} | {pct(c['retention'])} % "
                     f"| {sweep.method_name(c['method'], c['proportional'])} | {pct(d['a'], 2)} % "
                     f"| {pct(d['b'], 2)} % | {100 * d['delta']:+.2f} ({100 * d['lo']:+.2f} .. {100 * d['hi']:+.2f}) "
                     f"| {d['better']} / {d['worse']} |")
    return lines


def merge_docs(arg: str) -> tuple[str, dict]:
    """(label, one sweep document) from ``[LABEL=]JSON[,JSON...]``: sweep JSONs of one checkpoint (e.g.
    a grid and a later run of more taus), their cells joined; the checkpoint and the items must agree.
    The label defaults to the files' stems."""
    label, _, paths = arg.rpartition("=")
    docs = [(Path(p), json.loads(Path(p).read_text())) for p in paths.split(",")]
    (p0, d0), rest = docs[0], docs[1:]
    cells = dict(d0["cells"])
    for p, d in rest:
        for key in ("ckpt", "items"):
            if d["setup"][key] != d0["setup"][key]:
                raise ValueError(f"{p}: another {key} than {p0} (sweeps of one model on the same items merge)")
        cells.update(d["cells"])
    return label or "+".join(p.stem for p, _ in docs), {**d0, "cells": cells}


def compare_cuts(models: list[tuple[str, dict]], margin: float = GOAL_MARGIN, own: bool = False) -> list[str]:
    """Markdown lines: per stage and method, each model's largest cut at a WER no higher than the
    first model's unpooled + ``margin`` (on the manifest's items): the same WER ceiling for all, so a
    model whose own unpooled WER is higher gets no credit for it (``own``: each model's own unpooled
    + ``margin`` instead: how well it tolerates pooling, whatever it costs unpooled). For the later
    models, how much deeper the cut is: removed tokens / the first model's removed tokens, and the
    first model's kept tokens / its kept tokens."""
    base_label, base = models[0]
    field = "wer_manifest" if base["unpooled"].get("wer_manifest") is not None else "wer"
    where = "the manifest items" if field == "wer_manifest" else "all items"
    unpooled = ", ".join(f"{label} {pct(d['unpooled'][field], 2)} %" for label, d in models)
    ceilings = [(d if own else base)["unpooled"][field] + margin for _, d in models]
    head = (f"WER ceiling: each model's own unpooled WER + {100 * margin:.1f} ({where}). Unpooled: {unpooled}."
            if own else f"WER ceiling: {pct(ceilings[0], 2)} % (unpooled {base_label} "
            f"{pct(base['unpooled'][field], 2)} % + {100 * margin:.1f}; {where}). Unpooled: {unpooled}.")
    lines = [head, "",
             "| stage | method | " + " | ".join(f"{label}: retention, tau, WER" for label, _ in models)
             + "".join(f" | deeper ({label}): removed x, kept /" for label, _ in models[1:]) + " |",
             "|---" * (2 + 2 * len(models) - 1) + "|"]
    stages = {}
    for _, d in models:
        stages.update(d["setup"]["stages"])
    for stage, label in stages.items():
        per_model = [{(r["method"], r["proportional"]): r["cell"]
                      for r in sweep.largest_cuts(d, field=field, stage=stage, ceiling=ceiling)}
                     for (_, d), ceiling in zip(models, ceilings)]
        for method, prop in METHODS:
            best = []
            for (_, d), found in zip(models, per_model):
                ran = any(c["stage"] == stage and c["method"] == method and c["proportional"] == prop
                          for c in d["cells"].values())
                best.append(found[(method, prop)] if ran else "n/a")
            if all(b == "n/a" for b in best):
                continue
            row = [label, sweep.method_name(method, prop)]
            row += ["not run" if b == "n/a" else "none" if b is None else
                    f"{pct(b['retention'])} %, {b['tau']:g}, {pct(b[field], 2)} %" for b in best]
            b0 = best[0]
            for b in best[1:]:
                if not isinstance(b, dict) or not isinstance(b0, dict):
                    row.append("-")
                else:
                    removed = (1 - b["retention"]) / (1 - b0["retention"]) if b0["retention"] < 1 else float("inf")
                    row.append(f"{removed:.2f}x, {b0['retention'] / b['retention']:.2f}x")
            lines.append("| " + " | ".join(row) + " |")
    return lines


# ----------------------------------------------------------------------------------------------
# command line


def main_bench_lslm_pooling(args) -> int:
    if not args.no_compile_cache:
        enable_compile_cache()
    cfg = SweepConfig(ckpt=args.ckpt, manifest=args.manifest, limit=args.limit, librivox=args.librivox,
                      stages=tuple(args.stages) if args.stages else None, taus=tuple(args.taus),
                      controls=not args.no_controls, control_taus=tuple(args.control_taus),
                      proportional_too=args.proportional_too, window_input=args.window_input,
                      window_deep=args.window_deep, dual_offset=args.dual_offset, positions=args.positions,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, dtype=args.dtype, out=args.out,
                      work=args.work, name=args.name, progress=not args.no_progress)
    return sweep.main(run_sweep, cfg)


def main_compare_cuts(args) -> int:
    models = []
    for arg in args.sweeps:
        try:
            models.append(merge_docs(arg))
        except (OSError, ValueError, KeyError) as e:
            print(f"compare-cuts: {arg}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
    text = "\n".join(compare_cuts(models, args.margin / 100, own=args.own)) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
    return 0
