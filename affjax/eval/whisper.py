"""`affjax eval`: accuracy jobs. Task `asr` on Whisper checkpoints: WER with and without Affinity
Pooling on the encoder, retention, FLOPs.

    affjax eval --ckpt CKPT --task asr --manifest M --out DIR [--pooling SPEC] [--proportional]
    affjax eval --model whisper-base --data librivox          # the main job

Model. `--ckpt` is a converted checkpoint (checkpoints_convert/convert.py, from a Hugging Face
Whisper folder or a CTranslate2 one). `--model whisper-base | whisper-tiny.en` takes the installed
CTranslate2 package (affjax.data.assets), converts it once into `$AFFJAX_CACHE/models/<name>` (default
`~/.cache/affjax/models/<name>`) and reuses it.

Data. `--manifest M`: JSON lines with `id`, `audio` (path, relative to the manifest's folder) and
`text` (the reference; `reference`, `transcript`, `transcription` and `sentence` are taken too;
rows without one are transcribed but not scored). `--data librivox`: the
five LibriVox clips of Debian's pocketsphinx-testdata with their transcripts.

Pooling. The text form of docs/pooling.md section 2, with LAYER = encoder layer (0 .. L, L = the encoder output: see
affjax/models/whisper/asr.py). `--positions` does not apply to Whisper (absolute positions, added
before layer 1) and is ignored. Without `--pooling` the job runs two settings, the unpooled model
and the default pooled one (`asr.default_pooling`: the encoder output, tau 0.95, window 1,
proportional); with `--pooling` (`none` included) it runs that one setting.

Outputs (through the one runner, affjax.eval.runner: rows stored per batch, resumable, a rerun with
other inputs or settings refused unless `--restart`). One setting: `DIR/results.jsonl` (per item,
manifest order: `id`, `reference`, `text`, `audio_tokens` [audio frames before, after each stage],
`layer_tokens`, `enc_frames` (frames the decoder attends to), `finished`, `truncated` for clips over
30 s (short-form: only the first 30 s are heard); or `id` and `error`) and `DIR/summary.json`. Two settings: the same files in
`DIR/unpooled/` and `DIR/pooled/`, and `DIR/summary.json` = {"runs": [summary, summary]}. A summary
holds corpus WER (Whisper's English normaliser, `EnglishTextNormalizer` with the tokenizer's
spelling mapping when it has one; `--normalizer basic` for `BasicTextNormalizer`; jiwer),
retention per stage (mean over items of audio frames after the stage / before pooling) and final
(corpus ratio), encoder and decoder FLOPs relative to unpooled (analytic, flops.whisper_encoder_flops /
flops.whisper_decoder_flops: the decoder's unpooled reference is the same token counts over all 1500 frames),
and times. Bad items (missing file, corrupt audio, bad manifest line) become error rows; the job
goes on.

Why padding frames are kept: on the five LibriVox clips with no pooling at all, removing the
frames past the clip (`--drop-padding`, masked out of encoder self-attention and decoder
cross-attention) turns WER 1.4 % into 380 % for base (4.2 % -> 166 % for tiny.en): the decoder
repeats the sentence until the token limit. Masking them out of the cross-attention alone gives
9.9 % (base) and 227 % (tiny.en).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from affjax.data.audio import load_audio
from affjax.data.manifest import read_manifest
from affjax.eval import runner
from affjax.eval.metrics import corpus_wer, make_normalizer  # scoring lives in affjax/eval/metrics.py
from affjax.eval.results import ResultStore, fingerprint_checkpoint, fingerprint_file, open_run
from affjax.eval.summary import command_line, retention_summary, versions, write_summary
from affjax.models.checkpoint import CONFIG_NAME, get_spec, load
from affjax.models.whisper import asr
from affjax.runtime.flops import whisper_decoder_flops, whisper_encoder_flops

__all__ = ["MODEL_NAMES", "DATASETS", "WhisperAsrTask", "run_whisper_asr", "summarize_asr", "make_normalizer",
           "corpus_wer", "format_whisper_summary"]

MODEL_NAMES = {"whisper-base": "base", "whisper-tiny.en": "tiny.en"}  # --model -> assets name
DATASETS = ("librivox",)


# ----------------------------------------------------------------------------------------------
# data


def _rows(cfg: runner.JobConfig, log=print):
    """(rows, data label, data fingerprint)."""
    if cfg.data and cfg.data.startswith("hf:"):
        raise runner.UsageError("--data hf:... recipes are for Qwen2-Audio checkpoints (they carry its prompts)")
    if cfg.manifest is not None:
        rows = read_manifest(cfg.manifest, required=("id", "audio"))
        runner.reference_field(rows, cfg.manifest, log)
        rows = rows[:cfg.limit] if cfg.limit else rows
        return rows, Path(cfg.manifest).stem, fingerprint_file(cfg.manifest)
    if cfg.data not in DATASETS:
        raise runner.UsageError(f"unknown --data {cfg.data!r}; known: {', '.join(DATASETS)}")
    rows, fp = runner.librivox_rows(cfg.limit)
    return rows, cfg.data, fp


# ----------------------------------------------------------------------------------------------
# the Whisper ASR task


def load_whisper(ckpt: Path, dtype: str | None = None):
    """A converted Whisper checkpoint -> (model, processor, HF config dict)."""
    from transformers import WhisperProcessor  # deferred: transformers is heavy

    model, mcfg, meta = load(ckpt, dtype=dtype)
    try:
        processor = WhisperProcessor.from_pretrained(str(ckpt))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{ckpt}: no Whisper processor (tokenizer + feature extractor) beside the weights: {e}") \
            from None
    return model, processor, meta["hf_config"]


def load_installed(model_name: str, dtype: str | None = None, log=print):
    """An installed real Whisper (`--model`, a key of MODEL_NAMES), converted once into
    $AFFJAX_CACHE/models like every checkpoint -> (model, processor, HF config dict)."""
    return load_whisper(runner.resolve_checkpoint(runner.JobConfig(model=model_name), log=log)[0], dtype)


def _settings(cfg: runner.JobConfig, wcfg) -> list[tuple[str, object]]:
    try:
        if cfg.pooling is None:
            return [("unpooled", asr.parse_whisper_pooling("none", wcfg)), ("pooled", asr.default_pooling(wcfg))]
        return [("", asr.parse_whisper_pooling(cfg.pooling, wcfg, cfg.proportional))]
    except ValueError as e:
        raise runner.UsageError(f"--pooling {cfg.pooling!r}: {e}") from None


@dataclasses.dataclass
class _Clip:
    id: str
    wave: object
    reference: str | None


class WhisperAsrTask:
    """Short-form greedy transcription with pooling on the encoder (affjax.eval.runner's task protocol)."""

    def __init__(self, model, processor, pooling, cfg: runner.JobConfig, clock: runner.Clock, log=print):
        self.model, self.processor, self.pooling, self.cfg, self.clock, self.log = \
            model, processor, pooling, cfg, clock, log
        self.sr = processor.feature_extractor.sampling_rate
        self.chunk_samples = processor.feature_extractor.n_samples

    def prepare(self, row) -> _Clip:
        ref = row.item.get("reference")
        return _Clip(row.id, load_audio(row.item["audio"], sr=self.sr), ref if isinstance(ref, str) else None)

    def run_window(self, items: list[_Clip], sink: runner.Sink) -> None:
        bsz = max(1, min(self.cfg.batch_size, len(items)))  # never pad a small job to a large batch
        for i in range(0, len(items), bsz):
            for clip, rec in runner.run_batch(lambda b: self._batch(b, bsz), items[i:i + bsz],
                                              lambda c, cause: sink.fail(c.id, cause), log=self.log):
                sink.done(clip.id, rec)
            sink.store.flush()

    def _batch(self, clips: list[_Clip], bsz: int) -> list[dict]:
        secs = sum(min(len(c.wave), self.chunk_samples) for c in clips) / self.sr
        out = self.clock.timed(lambda: asr.transcribe_pooled(
            self.model, self.processor, [c.wave for c in clips], self.pooling, drop_padding=self.cfg.drop_padding,
            max_new_tokens=self.cfg.max_new_tokens, batch_size=bsz, language=self.cfg.language,
            sampling_rate=self.sr), len(clips), secs)
        recs = []
        for i, c in enumerate(clips):
            rec = {"reference": c.reference, "text": out.texts[i], "audio_tokens": out.audio_tokens[i],
                   "layer_tokens": out.layer_tokens[i], "enc_frames": out.enc_len[i], "finished": out.finished[i],
                   "generated": len(out.tokens[i]) + (1 if out.finished[i] else 0), "prompt_len": out.prompt_len}
            if len(c.wave) > self.chunk_samples:  # short-form only: Whisper hears the first 30 s
                rec["truncated"] = True
            recs.append(rec)
        return recs


def summarize_asr(rows: list[dict], wcfg, pooling, norm, norm_name: str) -> dict:
    """WER, retention and analytic encoder / decoder FLOPs relative to unpooled, from result rows."""
    ok = [r for r in rows if "error" not in r]
    scored = [r for r in ok if r.get("reference") is not None]
    wer = corpus_wer([norm(r["reference"]) for r in scored], [norm(r["text"]) for r in scored])
    s = {"task": "asr", "pooling": pooling.to_text(), "proportional": bool(pooling.proportional and pooling.stages),
         "items": len(rows), "ok": len(ok), "errors": len(rows) - len(ok), "scored": len(scored),
         "unfinished": sum(1 for r in ok if not r["finished"]), "wer": None if wer is None else round(wer, 6),
         "normalizer": norm_name}
    if ok:
        n0 = wcfg.encoder.max_source_positions
        enc = sum(whisper_encoder_flops(wcfg.encoder, r["layer_tokens"]) for r in ok)
        enc0 = len(ok) * whisper_encoder_flops(wcfg.encoder, [n0] * wcfg.encoder.layers)
        dec = sum(whisper_decoder_flops(wcfg, r["enc_frames"], r["prompt_len"], r["generated"]) for r in ok)
        dec0 = sum(whisper_decoder_flops(wcfg, n0, r["prompt_len"], r["generated"]) for r in ok)
        s.update(retention_summary([r["audio_tokens"] for r in ok]))
        s.update(enc_frames_kept=round(sum(r["enc_frames"] for r in ok) / len(ok) / n0, 4),
                 encoder_flops_rel=round(enc / enc0, 4), decoder_flops_rel=round(dec / dec0, 4),
                 flops_rel=round((enc + dec) / (enc0 + dec0), 4), gflops_per_item=round((enc + dec) / len(ok) / 1e9, 2))
    return s


def run_whisper_asr(cfg: runner.JobConfig, ckpt: Path, model_label: str, log=print) -> dict:
    t0 = time.perf_counter()
    rows, data_label, data_fp = _rows(cfg, log)
    runner.check_rows(rows, f"manifest {cfg.manifest or cfg.data}")
    runner.dedupe_ids(rows)
    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    wcfg = get_spec(meta["model_type"]).config_from_hf(meta["hf_config"])
    settings = _settings(cfg, wcfg)
    out = Path(cfg.out or Path("runs") / f"{model_label}-{data_label}")
    ckpt_fp = fingerprint_checkpoint(ckpt)
    records = []
    for name, pooling in settings:  # every run record checked before the model loads
        record = {"task": "asr", "model_type": "whisper", "ckpt": ckpt_fp, "data": data_fp,
                  "pooling": pooling.to_text(), "proportional": bool(pooling.proportional),
                  "drop_padding": cfg.drop_padding, "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.dtype,
                  "language": cfg.language}
        results = (out / name if name else out) / "results.jsonl"
        open_run(results, record, restart=cfg.restart, log=log)
        records.append(results)
    model, processor, _ = load_whisper(ckpt, cfg.dtype)
    t_load = time.perf_counter() - t0
    norm, norm_name = make_normalizer(processor.tokenizer, cfg.normalizer)
    runs = []
    for (name, pooling), results in zip(settings, records):
        traces0 = dict(runner.TRACES)
        store = ResultStore(results, log=log)
        clock = runner.Clock()
        task = WhisperAsrTask(model, processor, pooling, cfg, clock, log=log)
        try:
            runner.run_items(task, rows, store, window=cfg.window, retry_errors=cfg.retry_errors,
                             progress=cfg.progress, desc=f"asr {pooling.to_text() if pooling.stages else 'unpooled'}",
                             log=log, clock=clock)
            store.compact([r.id for r in rows])
        finally:
            store.close()
        s = summarize_asr(store.ordered([r.id for r in rows]), wcfg, pooling, norm, norm_name)
        s.update(model=model_label, data=data_label, drop_padding=cfg.drop_padding, **clock.summary(),
                 seconds=round(clock.run_seconds, 2), compiles=runner.compiles_since(traces0))
        if name:
            s["setting"] = name
        write_summary(results.with_name("summary.json"), s)
        runs.append(s)
    total = round(time.perf_counter() - t0, 2)
    common = {"load_seconds": round(t_load, 2), "total_seconds": total, "versions": versions(),
              "command": command_line()}
    summary = dict(runs[0], **common) if len(runs) == 1 else {"runs": runs, **common}
    write_summary(out / "summary.json", summary)
    summary["out"] = str(out)
    return summary


# ----------------------------------------------------------------------------------------------
# printing


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def format_whisper_summary(summary: dict) -> str:
    runs = summary.get("runs") or [summary]
    head = runs[0]
    lines = [f"{head['model']} on {head['data']}: {head['items']} items, {head['ok']} ok, {head['errors']} errors "
             f"(WER normaliser: {head['normalizer']})"]
    names = [r["pooling"] + (" +proportional" if r.get("proportional") else "")
             + (" +drop-padding" if r.get("drop_padding") else "") for r in runs]
    w = max(20, *(len(n) for n in names))
    cols = f"{'setting':<{w}} {'WER':>7} {'retention':>10} {'enc frames':>10} {'enc FLOPs':>9} {'dec FLOPs':>9} " \
           f"{'time':>7}"
    lines.append(cols)
    for name, r in zip(names, runs):
        ret = "-" if "final_retention" not in r else f"{r['final_retention']:.3f}"
        ef = "-" if "enc_frames_kept" not in r else f"{r['enc_frames_kept']:.3f}"
        ex = "-" if "encoder_flops_rel" not in r else f"{r['encoder_flops_rel']:.3f}"
        dx = "-" if "decoder_flops_rel" not in r else f"{r['decoder_flops_rel']:.3f}"
        lines.append(f"{name:<{w}} {_pct(r['wer']):>7} {ret:>10} {ef:>10} {ex:>9} {dx:>9} {r['seconds']:>6.1f}s")
        if r.get("retention_per_stage") and len(r["retention_per_stage"]) > 1:
            lines.append(f"{'':<{w}} retention per stage: {r['retention_per_stage']}")
    lines.append(f"load {summary.get('load_seconds', 0):.1f} s, total {summary.get('total_seconds', 0):.1f} s"
                 + (f"; results in {summary['out']}" if "out" in summary else ""))
    return "\n".join(lines)
