"""`affjax bench-whisper-pooling`: the accuracy sweep of Affinity Pooling on real Whisper weights.

    affjax bench-whisper-pooling [--model whisper-base] [--taus ...] [--windows 1 3] [--stages out 3 5]
                                 [--out docs/results] [--utterances N]

Data: the five LibriVox clips (real read speech) plus N utterances of the piper voice reading the
texts of ``affjax/data/tts_texts.jsonl`` (5 to 27 s each, generated and cached at run time, see
``affjax.data.tts``). Model: the installed CTranslate2 package (``affjax.data.assets``), loaded with
``affjax.eval.whisper.load_installed`` (converted once, like every checkpoint) so greedy decoding suppresses the checkpoint's suppressed tokens.

Cells. For every stage position (``out`` = the encoder output, or an encoder layer l: after layer
l), window and tau: Affinity Pooling with the plain mean and with ``proportional`` (log group size
on the keys of every later attention); and, for the windows in ``--control-windows`` and the taus
in ``--control-taus``, the fixed-rate controls at equal retention, item by item: each item keeps
exactly as many audio frames as the similarity stage kept for it, by uniform average pooling
(plain and proportional) or by uniform dropping (``affjax.pooling.uniform``). Frames past each clip are
kept as they are in every method (see ``affjax/models/whisper/asr.py``).

Per cell: retention (kept audio frames / audio frames, over the corpus), corpus WER (Whisper's
English normaliser), transcripts changed vs unpooled (after normalisation), encoder and decoder
FLOPs relative to unpooled (analytic; the decoder's reference is the same generated tokens over
all 1500 frames, so it measures the cross-attention saving only), unfinished transcripts, and the
wall time of the cell (its stage, the encoder layers after it and the decoding; XLA compilations
of new shapes included: the persistent compile cache makes a re-run cheaper).

Sharing work. Items are sorted by length and cut into batches; the encoder runs once per batch up
to each stage position (the states are kept in memory) and every cell starts from the shared
state. Resumable: after each cell the JSON is rewritten, and a re-run skips the cells it holds
(the item list, model and decoding limit must match).

Outputs in ``--out``: ``NAME.json`` (setup, unpooled transcripts, every cell), ``NAME_table.md``
(tables and the largest cuts within +0.5 WER), ``NAME.png`` (WER vs retention per stage), and
``--work`` (default ``runs/NAME``) gets ``transcripts.jsonl`` (every cell's transcripts).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from affjax.bench import sweep
from affjax.bench.sweep import (METHODS, cuts_table, length_batches, open_doc, pct, run_cells, save_doc, store_unpooled,
                                wer_metrics)
from affjax.data.assets import librivox_items
from affjax.data.audio import load_audio
from affjax.data.tts import synthesize, tts_texts
from affjax.eval.runner import enable_compile_cache
from affjax.eval.whisper import MODEL_NAMES, load_installed, make_normalizer
from affjax.models.whisper import asr
from affjax.models.whisper.asr import SAMPLES_PER_FRAME
from affjax.models.whisper.decoding import prompt_ids, whisper_features
from affjax.pooling.affinity import pool_stage_jit
from affjax.pooling.spec import Stage
from affjax.runtime.flops import whisper_decoder_flops, whisper_encoder_flops

__all__ = ["SweepConfig", "run_sweep", "cell_specs", "load_items", "write_table", "write_plot",
           "main_bench_whisper_pooling", "TAUS", "METHODS"]

TAUS = (0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7)
CONTROL_TAUS = (0.99, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7)


@dataclasses.dataclass
class SweepConfig:
    model: str = "whisper-base"
    taus: tuple = TAUS
    windows: tuple = (1, 3)
    stages: tuple = ("out", "3", "5")
    controls: bool = True
    control_windows: tuple = (1,)
    control_taus: tuple = CONTROL_TAUS
    utterances: int = 36             # piper utterances (the text list has 36)
    librivox: int = 5                # LibriVox clips (0 .. 5)
    batch_size: int = 16
    max_new_tokens: int = 160        # 30 s of fast speech is ~130 tokens: checked on the unpooled run
    out: str = "docs/results"
    work: str | None = None          # default runs/<name>
    name: str = "whisper_pooling"
    progress: bool = True


def _stage_layer(name: str, n_layers: int) -> int:
    if name == "out":
        return n_layers
    layer = int(name)
    if not 0 <= layer <= n_layers:
        raise ValueError(f"stage {name!r}: expected 'out' or an encoder layer 0 .. {n_layers}")
    return layer


def _label(stage: str) -> str:
    return "encoder output" if stage == "out" else f"after encoder layer {stage}"


def cell_key(stage: str, window: int, tau: float, method: str, proportional: bool) -> str:
    return f"{stage}/w{window}/tau{tau:g}/{method}{'+prop' if proportional else ''}"


def cell_specs(cfg: SweepConfig) -> list[dict]:
    """Every cell in run order: window, then stage, then tau (so an interrupted sweep already has
    the window-1 comparison with the controls); the similarity cells of a (stage, window, tau)
    come before its controls, which need their per-item counts."""
    specs = []
    for window in cfg.windows:
        for stage in cfg.stages:
            for tau in cfg.taus:
                methods = [("sim", False), ("sim", True)]
                if cfg.controls and window in cfg.control_windows and tau in cfg.control_taus:
                    methods += [("avg", False), ("avg", True), ("drop", False)]
                for method, prop in methods:
                    specs.append(dict(key=cell_key(stage, window, tau, method, prop), stage=stage, window=int(window),
                                      tau=float(tau), method=method, proportional=prop,
                                      source=cell_key(stage, window, tau, "sim", False)))
    return specs


# ----------------------------------------------------------------------------------------------
# data and model


def load_items(n_utterances: int, n_librivox: int = 5, progress: bool = False) -> list[dict]:
    """id, source, text (the reference) and wave (16 kHz float32) of every item, LibriVox first."""
    items = []
    if n_librivox:
        for it in librivox_items()[:n_librivox]:
            items.append(dict(id=it["id"], source="librivox", text=it["text"], wave=load_audio(it["audio"])))
    texts = tts_texts(n_utterances)
    waves = synthesize([t["text"] for t in texts], progress=progress)
    items += [dict(id=t["id"], source="piper", text=t["text"], wave=w) for t, w in zip(texts, waves)]
    if not items:
        raise ValueError("no items: give --utterances > 0 or keep the LibriVox clips")
    return items


def _batches(items: list[dict], batch_size: int) -> list[list[int]]:
    """Item indices by length, longest first, in batches of near-equal size (sweep.length_batches):
    short clips (whose frames are mostly padding, kept by every method) do not hold the long clips'
    buffers open."""
    return length_batches([len(it["wave"]) for it in items], batch_size)


# ----------------------------------------------------------------------------------------------
# the sweep


def _prefixes(model, processor, items, batches, layers, bsz, log):
    """Per batch: the frames of each row and the encoder states at every stage layer (shared)."""
    cfg = model.cfg
    out = []
    for rows in batches:
        waves = [items[i]["wave"] for i in rows]
        feats = whisper_features(processor, waves, bsz, cfg)
        st = asr.encoder_start(model, feats, asr.batch_frames(waves, bsz, cfg), len(rows))
        states = {}
        for layer in sorted(layers):
            st = asr.encoder_advance(model, st, layer)
            states[layer] = st
        jax.block_until_ready([s.x for s in states.values()])  # so the prefix time is real (async dispatch)
        out.append(states)
    return out


def _run_cell(model, spec, layer, prefixes, batches, bsz, prompt, groups, max_new_tokens):
    """Transcribe every item with one cell's setting. groups: Int[items] audio frames to keep per
    item (controls only). Returns per-item lists, in item order."""
    n = sum(len(r) for r in batches)
    res = {k: [None] * n for k in ("tokens", "finished", "audio", "kept", "layer_tokens", "enc_len")}
    for rows, states in zip(batches, prefixes):
        st = states[layer]
        if spec is not None:
            g = None
            if spec["method"] != "sim":
                g = np.ones(bsz, np.int64)
                g[:len(rows)] = [groups[i] for i in rows]
            st = asr.encoder_stage(st, Stage(layer, spec["tau"], spec["window"]), proportional=spec["proportional"],
                                   control=None if spec["method"] == "sim" else spec["method"], groups=g)
        e = asr.encoder_finish(model, st)
        toks, fin = asr.decode_encoded(model, e, prompt, len(rows), max_new_tokens)
        for j, i in enumerate(rows):
            res["tokens"][i], res["finished"][i] = toks[j], fin[j]
            res["audio"][i], res["kept"][i] = int(e.audio_tokens[j, 0]), int(e.audio_tokens[j, -1])
            res["layer_tokens"][i] = [int(v) for v in e.layer_tokens[j]]
            res["enc_len"][i] = int(e.enc_len[j])
    return res


def _metrics(model, res, ref_tokens, prompt_len, texts, norm_refs, norm_hyps, base_norm, sources):
    cfg = model.cfg
    full = cfg.encoder.max_source_positions
    enc = enc0 = dec = dec0 = 0
    for i, toks in enumerate(res["tokens"]):
        n_gen = len(toks) + (1 if res["finished"][i] else 0)
        enc += whisper_encoder_flops(cfg.encoder, res["layer_tokens"][i])
        enc0 += whisper_encoder_flops(cfg.encoder, [full] * cfg.encoder.layers)
        dec += whisper_decoder_flops(cfg, res["enc_len"][i], prompt_len, n_gen)
        dec0 += whisper_decoder_flops(cfg, full, prompt_len, n_gen)
    audio, kept = np.asarray(res["audio"], float), np.asarray(res["kept"], float)
    out = {
        "retention": round(float(kept.sum() / audio.sum()), 4),
        "retention_mean": round(float(np.mean(kept / audio)), 4),
        **wer_metrics(norm_refs, norm_hyps, base_norm, sources),
        "changed_raw": int(sum(t != r for t, r in zip(res["tokens"], ref_tokens))) if ref_tokens else 0,
        "unfinished": int(sum(not f for f in res["finished"])),
        "encoder_flops_rel": round(enc / enc0, 4),
        "decoder_flops_rel": round(dec / dec0, 4),
        "flops_rel": round((enc + dec) / (enc0 + dec0), 4),
    }
    return out


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Run (or resume) the sweep; returns the JSON document it wrote."""
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"unknown --model {cfg.model!r}; known: {', '.join(MODEL_NAMES)}")
    out_dir = Path(cfg.out)
    work = Path(cfg.work or Path("runs") / cfg.name)
    json_path = out_dir / f"{cfg.name}.json"
    t_start = time.perf_counter()

    model, processor, _ = load_installed(cfg.model)
    n_layers = model.cfg.encoder.layers
    layers = {s: _stage_layer(s, n_layers) for s in cfg.stages}
    norm, norm_name = make_normalizer(processor.tokenizer)
    items = load_items(cfg.utterances, cfg.librivox, progress=cfg.progress)
    sources = [it["source"] for it in items]
    norm_refs = [norm(it["text"]) for it in items]
    prompt = prompt_ids(processor.tokenizer, model.cfg)
    batches = _batches(items, cfg.batch_size)
    bsz = max(len(b) for b in batches)
    setup = {"model": cfg.model, "items": [it["id"] for it in items], "max_new_tokens": cfg.max_new_tokens,
             "batch_size": bsz, "normalizer": norm_name, "suppress_tokens": len(model.cfg.suppress_tokens)}

    doc = open_doc(json_path, setup)
    setup.update(durations_s=[round(len(it["wave"]) / 16000, 2) for it in items],
                 stages={s: _label(s) for s in cfg.stages})

    def save():
        doc["setup"] = setup
        save_doc(doc, json_path)

    t0 = time.perf_counter()
    prefixes = _prefixes(model, processor, items, batches, set(layers.values()) | {n_layers}, bsz, log)
    t_prefix = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = _run_cell(model, None, n_layers, prefixes, batches, bsz, prompt, None, cfg.max_new_tokens)
    t_base = time.perf_counter() - t0
    base_texts = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in base["tokens"]]
    base_norm = [norm(t) for t in base_texts]
    longest = max(len(t) for t in base["tokens"])
    if longest >= cfg.max_new_tokens or not all(base["finished"]):
        raise ValueError(f"an unpooled transcript reached max_new_tokens={cfg.max_new_tokens}: raise it")
    unpooled = _metrics(model, base, None, len(prompt), base_texts, norm_refs, base_norm, base_norm, sources)
    unpooled.update(seconds=round(t_base, 2), longest_tokens=longest, texts=base_texts)
    store_unpooled(doc, unpooled, log)
    setup["prefix_seconds"] = round(t_prefix, 2)
    save()
    log(f"unpooled: WER {100 * unpooled['wer']:.2f} % over {len(items)} items "
        f"(longest transcript {longest} tokens; encoder prefixes {t_prefix:.0f} s, unpooled decode {t_base:.0f} s)")

    def run_one(spec):
        groups = doc["cells"][spec["source"]]["kept"] if spec["method"] != "sim" else None
        t0 = time.perf_counter()
        res = _run_cell(model, spec, layers[spec["stage"]], prefixes, batches, bsz, prompt, groups, cfg.max_new_tokens)
        seconds = time.perf_counter() - t0
        texts = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in res["tokens"]]
        cell = {k: spec[k] for k in ("stage", "window", "tau", "method", "proportional")}
        cell["layer"] = layers[spec["stage"]]
        cell.update(_metrics(model, res, base["tokens"], len(prompt), texts, norm_refs, [norm(t) for t in texts],
                             base_norm, sources))
        cell.update(seconds=round(seconds, 2), kept=res["kept"])
        return cell, texts

    run_cells(doc, cell_specs(cfg), run_one, save, work / "transcripts.jsonl", cfg.progress)
    doc["group_stats"] = group_stats(model, prefixes, batches, items, layers, cfg.taus)
    setup["total_seconds_last_run"] = round(time.perf_counter() - t_start, 1)
    save()
    write_table(doc, out_dir / f"{cfg.name}_table.md")
    write_plot(doc, out_dir / f"{cfg.name}.png")
    return doc


def _quiet_frames(wave: np.ndarray, n_frames: int, db: float = -35.0) -> np.ndarray:
    """Bool[n_frames]: encoder frames (320 samples each) whose RMS is ``db`` below the clip's
    loud frames (95th percentile): pauses and silence."""
    x = np.zeros(n_frames * SAMPLES_PER_FRAME, np.float32)
    x[:min(len(wave), len(x))] = wave[:len(x)]
    rms = np.sqrt((x.reshape(n_frames, -1) ** 2).mean(1)) + 1e-9
    return 20 * np.log10(rms / np.percentile(rms, 95)) < db


def group_stats(model, prefixes, batches, items, layers: dict, taus, window: int = 1) -> dict:
    """How Affinity Pooling groups the frames (no decoding): per stage and tau, the mean group
    size (1 / retention), the size-weighted mean (the size of the group an average frame ends up
    in: what a plain mean under-weights in attention), the largest group, the share of frames in
    groups of 8 or more, and the share of quiet frames (pauses) overall and among the frames of
    groups of 4 or more. Uniform average pooling has size-weighted mean = mean."""
    quiet = {}
    out = {}
    for stage, layer in layers.items():
        for tau in taus:
            sizes, q_all, q_big = [], [], []
            for rows, states in zip(batches, prefixes):
                st = states[layer]
                r = pool_stage_jit(st.x, st.span, st.valid, st.pos, st.size, tau=tau, window=window,
                                   capacity=int(st.x.shape[1]), positions="first")
                group_of, audio = np.asarray(r.group_of), np.asarray(st.span) > 0
                for j, i in enumerate(rows):
                    g = group_of[j][audio[j]]
                    n = len(g)
                    if i not in quiet:
                        quiet[i] = _quiet_frames(items[i]["wave"], n)
                    size_of = np.bincount(g)[g]  # the size of each frame's group
                    sizes.append(np.bincount(g)[np.unique(g)])
                    q_all.append(quiet[i])
                    q_big.append(quiet[i][size_of >= 4])
            sz = np.concatenate(sizes).astype(float)
            qa, qb = np.concatenate(q_all), np.concatenate(q_big)
            out[f"{stage}/w{window}/tau{tau:g}"] = {
                "retention": round(len(sz) / sz.sum(), 4), "mean_size": round(float(sz.mean()), 2),
                "weighted_mean_size": round(float((sz ** 2).sum() / sz.sum()), 2), "max_size": int(sz.max()),
                "frames_in_groups_ge8": round(float(sz[sz >= 8].sum() / sz.sum()), 4),
                "quiet_frames": round(float(qa.mean()), 4),
                "quiet_among_groups_ge4": round(float(qb.mean()), 4) if len(qb) else None,
            }
    return out


# ----------------------------------------------------------------------------------------------
# reporting


def write_table(doc: dict, path: Path) -> str:
    """Markdown: per stage, one row per (window, tau) with every method's WER; then the largest
    cuts within +0.5 WER."""
    cells, un = doc["cells"], doc["unpooled"]
    setup = doc["setup"]
    lines = [f"Unpooled: WER {pct(un['wer'], 2)} % ({len(setup['items'])} items; LibriVox "
             f"{pct(un.get('wer_librivox'), 2)} %, piper {pct(un.get('wer_piper'), 2)} %).", ""]
    for stage, label in setup["stages"].items():
        rows = sorted({(c["window"], c["tau"]) for c in cells.values() if c["stage"] == stage},
                      key=lambda wt: (wt[0], -wt[1]))
        if not rows:
            continue
        lines += [f"### Stage: {label}", "",
                  "| window | tau | retention | WER sim | WER sim+prop | WER avg | WER avg+prop | WER drop "
                  "| changed (sim / +prop / avg / +prop / drop) | enc FLOPs | dec FLOPs (sim) | time s (sim / +prop) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for window, tau in rows:
            get = {(m, p): cells.get(cell_key(stage, window, tau, m, p)) for m, p in METHODS}
            sim = get[("sim", False)] or get[("sim", True)]
            wers = [pct(c["wer"], 2) if c else "-" for c in get.values()]
            changed = " / ".join(str(c["changed"]) if c else "-" for c in get.values())
            times = " / ".join(f"{c['seconds']:.0f}" if c else "-" for c in (get[("sim", False)], get[("sim", True)]))
            lines.append(f"| {window} | {tau:g} | {pct(sim['retention'])} % | " + " | ".join(wers)
                         + f" | {changed} | {pct(sim['encoder_flops_rel'])} % | {pct(sim['decoder_flops_rel'])} % "
                           f"| {times} |")
        lines.append("")
    lines += cuts_table(doc, lambda c: f"{setup['stages'][c['stage']]}, window {c['window']}, tau {c['tau']:g}",
                        [("enc FLOPs", "encoder_flops_rel"), ("dec FLOPs", "decoder_flops_rel")])
    if doc.get("group_stats"):
        lines += ["", "### How Affinity Pooling groups the frames (window 1)", "",
                  "Size-weighted mean: the size of the group an average frame ends up in (uniform average "
                  "pooling: equal to the mean). Quiet: frames 35 dB below the clip's loud frames.", "",
                  "| stage | tau | retention | mean group | size-weighted mean | largest | frames in groups >= 8 "
                  "| quiet frames: all / in groups >= 4 |", "|---|---|---|---|---|---|---|---|"]
        for key, g in doc["group_stats"].items():
            stage, _, tau = key.split("/")
            q_big = "-" if g["quiet_among_groups_ge4"] is None else pct(g["quiet_among_groups_ge4"])
            lines.append(f"| {setup['stages'].get(stage, stage)} | {tau[3:]} | {pct(g['retention'])} % "
                         f"| {g['mean_size']:.2f} | {g['weighted_mean_size']:.2f} | {g['max_size']} "
                         f"| {pct(g['frames_in_groups_ge8'])} % | {pct(g['quiet_frames'])} % / {q_big} % |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def write_plot(doc: dict, path: Path) -> None:
    """WER vs retention per stage (affjax.bench.sweep.write_plot)."""
    setup = doc["setup"]
    sweep.write_plot(doc, path, f"Whisper {setup['model'].split('-', 1)[-1]}: WER vs audio frames kept "
                                f"({len(setup['items'])} utterances; same retention per item for the controls)",
                     unit="frames")


# ----------------------------------------------------------------------------------------------
# command line


def main_bench_whisper_pooling(args) -> int:
    if not args.no_compile_cache:
        enable_compile_cache()
    cfg = SweepConfig(model=args.model, taus=tuple(args.taus), windows=tuple(args.windows), stages=tuple(args.stages),
                      controls=not args.no_controls, control_windows=tuple(args.control_windows),
                      control_taus=tuple(args.control_taus), utterances=args.utterances, librivox=args.librivox,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, out=args.out, work=args.work,
                      name=args.name, progress=not args.no_progress)
    # RuntimeError: piper failed
    return sweep.main(run_sweep, cfg, errors=(FileNotFoundError, ValueError, RuntimeError))
