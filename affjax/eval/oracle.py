"""`affjax eval --ckpt QWEN2_AUDIO_CKPT --manifest M --out DIR --oracle 'none;merge-words;drop-words:p=0.5'`:
the paper's oracle interventions (Fig. 2-3) on a speech LM, from word boundaries.

1. Word boundaries: the installed Whisper base aligns each item's transcript (the manifest's
   reference for asr, else Whisper's own greedy transcript) with its alignment heads and DTW
   (affjax.eval.alignment). They are stored in DIR/alignment.jsonl (or --alignment FILE), one row
   per id with the text aligned, and reused by later runs while the text is the same.
2. One eval run per intervention (affjax.pooling.oracle; ``none`` is the unmodified model) into
   DIR/<setting>/: results.jsonl, summary.json / .md, resumable like every eval; the model is
   loaded once for all of them. Result rows carry ``words`` (the item's aligned words) and
   ``audio_tokens`` [before, after the intervention].
3. DIR/summary.json = {"runs": [summary, ...]}, each run's summary with its ``setting``
   (`affjax report DIR` tabulates it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from affjax.data.audio import load_audio
from affjax.eval import frontends, runner
from affjax.eval.alignment import Word, align, alignment_heads
from affjax.eval.lslm import fmt_value, format_lslm_summary, job_rows, run_lslm
from affjax.eval.summary import command_line, write_summary
from affjax.eval.whisper import load_whisper
from affjax.pooling.oracle import Oracle, parse_oracle

ALIGNER = "whisper-base"
MAX_SECONDS = 30.0  # Whisper's window: longer clips are not aligned (their items become error rows)


def parse_specs(text: str) -> list[Oracle | None]:
    """``SPEC;SPEC...`` -> interventions in order, None for ``none``; ValueError on a bad or repeated one."""
    specs = [s.strip() for s in text.split(";") if s.strip()]
    if not specs:
        raise ValueError("no intervention given")
    out = [None if s == "none" else parse_oracle(s) for s in specs]
    names = [setting(o) for o in out]
    if len(set(names)) < len(names):
        raise ValueError(f"an intervention is given twice: {names}")
    return out


def setting(o: Oracle | None) -> str:
    return "none" if o is None else o.to_text()


def _folder(o: Oracle | None) -> str:
    return setting(o).replace(":", "_").replace(",", "_").replace("=", "")


def word_alignments(rows, task: str, path: Path, *, batch_size: int = 8, log=print) -> dict[str, list[Word]]:
    """item id -> words of each manifest row that has one clip of at most 30 s, from `path` where it
    holds the same text, else aligned now with Whisper base and appended there."""
    cached = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                cached[r["id"]] = r
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
    todo = []
    out = {}
    for row in rows:
        it = row.item
        ref = it.get("reference") if task == "asr" and isinstance(it.get("reference"), str) else None
        c = cached.get(row.id)
        if c is not None and c.get("text") == ref:
            out[row.id] = [Word(*w) for w in c["words"]]
        elif row.error is None and isinstance(it.get("audio"), str):
            todo.append((row.id, it["audio"], ref))
    if not todo:
        return out
    ckpt, _ = runner.resolve_checkpoint(runner.JobConfig(model=ALIGNER), log=log)
    model, processor, _ = load_whisper(ckpt)
    heads = alignment_heads(ckpt)
    clips = []
    for item_id, audio, ref in todo:
        try:
            wave = load_audio(audio)
        except Exception:  # noqa: BLE001 - the eval run reports the cause as the item's error
            continue
        if 0 < len(wave) <= MAX_SECONDS * 16000:
            clips.append((item_id, wave, ref))
    log(f"aligning {len(clips)} items with {ALIGNER} -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for i in range(0, len(clips), batch_size):
            chunk = clips[i:i + batch_size]
            got = align(model, processor, heads, [w for _, w, _ in chunk], [r for _, _, r in chunk],
                        batch_size=batch_size)
            for (item_id, _, ref), a in zip(chunk, got):
                out[item_id] = a.words
                f.write(json.dumps({"id": item_id, "text": ref, "source": "reference" if ref else ALIGNER,
                                    "words": [[w.text, w.start, w.end] for w in a.words]}) + "\n")
            f.flush()
    return out


def run_oracle(cfg: runner.JobConfig, ckpt: Path, model_label: str, log=print) -> dict:
    """Align, then one eval run per intervention of `cfg.oracle`; returns {"runs": [summary, ...]}."""
    t0 = time.perf_counter()
    specs = parse_specs(cfg.oracle)
    task = cfg.task or "asr"
    out = Path(cfg.out or Path("runs") / f"{model_label}-{runner.data_label(cfg)}-oracle")
    rows, task, _, _ = job_rows(cfg, task, out, log)
    runner.check_rows(rows, f"manifest {cfg.manifest or cfg.data}")
    runner.dedupe_ids(rows)
    if (cfg.data or "").startswith("hf:"):  # the recipe wrote its manifest under out/data: every run reads that
        cfg = dataclasses.replace(cfg, data=None, manifest=str(out / "data" / "manifest.jsonl"), limit=None)
    apath = Path(cfg.alignment) if cfg.alignment else out / "alignment.jsonl"
    words = word_alignments(rows, task, apath, batch_size=cfg.batch_size, log=log)
    t_align = time.perf_counter() - t0
    loaded = frontends.load(ckpt, cfg.dtype)
    runs = []
    for o in specs:
        sub = dataclasses.replace(cfg, task=task, oracle=None if o is None else o.to_text(), out=str(out / _folder(o)))
        s = run_lslm(sub, ckpt, model_label, log=log, words=words, loaded=loaded)
        runs.append({"setting": setting(o), **s})
    summary = {"task": task, "model": model_label, "data": runs[0]["data"], "runs": runs, "alignment": str(apath),
               "aligner": ALIGNER, "align_seconds": round(t_align, 3),
               "total_seconds": round(time.perf_counter() - t0, 3), "command": command_line()}
    write_summary(out / "summary.json", summary, oracle_markdown(summary))
    summary["out"] = str(out)
    return summary


def oracle_markdown(s: dict) -> str:
    lines = [f"# oracle interventions: {s['model']} on {s['data']} ({s['task']})", "",
             f"Word boundaries: {s['aligner']} alignment heads + DTW ({s['alignment']}).", "",
             "| intervention | metric | value | audio tokens kept | LM prefill FLOPs vs unmodified | ok | errors |",
             "|---|---|---|---|---|---|---|"]
    for r in s["runs"]:
        name, value = r.get("primary") or ("-", None)
        lines.append(f"| {r['setting']} | {name} | {fmt_value(value)} | {fmt_value(r.get('final_retention'))} | "
                     f"{fmt_value(r.get('lm_prefill_flops_ratio_analytic'))} | {r['ok']} | {r['errors']} |")
    return "\n".join(lines + ["", f"`{s['command']}`"])


def format_oracle_summary(s: dict) -> str:
    return "\n\n".join([format_lslm_summary(r) for r in s["runs"]] + [f"summary: {s['out']}/summary.md"])
