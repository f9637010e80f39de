"""`affjax eval`: accuracy jobs. Task `asr` on Whisper checkpoints: WER with and without Affinity
Pooling on the encoder, retention, FLOPs.

    affjax eval --ckpt CKPT --task asr --manifest M --out DIR [--pooling SPEC] [--proportional]
    affjax eval --model whisper-base --data librivox          # the main job

Model. `--ckpt` is a converted checkpoint (checkpoints_convert/convert.py, from a Hugging Face
Whisper folder or a CTranslate2 one). `--model whisper-base | whisper-tiny.en` takes the installed
CTranslate2 package (affjax.assets), converts it once into `$AFFJAX_CACHE/models/<name>` (default
`~/.cache/affjax/models/<name>`) and reuses it.

Data. `--manifest M`: JSON lines with `id`, `audio` (path, relative to the manifest's folder) and
`text` (the reference; rows without one are transcribed but not scored). `--data librivox`: the
five LibriVox clips of Debian's pocketsphinx-testdata with their transcripts.

Pooling. The spec's text form with LAYER = encoder layer (0 .. L, L = the encoder output: see
affjax/models/whisper/asr.py). `--positions` does not apply to Whisper (absolute positions, added
before layer 1) and is ignored. Without `--pooling` the job runs two settings, the unpooled model
and the default pooled one (`asr.default_pooling`: the encoder output, tau 0.95, window 1,
proportional); with `--pooling` (`none` included) it runs that one setting.

Outputs. One setting: `DIR/results.jsonl` (per item, manifest order: `id`, `reference`, `text`,
`audio_tokens` [audio frames before, after each stage], `enc_frames` (frames the decoder attends
to), `finished`, `truncated` for clips over 30 s (short-form: only the first 30 s are heard); or
`id` and `error`) and `DIR/summary.json`. Two settings: the same files in
`DIR/unpooled/` and `DIR/pooled/`, and `DIR/summary.json` = {"runs": [summary, summary]}. A summary
holds corpus WER (Whisper's English normaliser, `EnglishTextNormalizer` with the tokenizer's
spelling mapping when it has one; `--normalizer basic` for `BasicTextNormalizer`; jiwer),
retention per stage (mean over items of audio frames after the stage / before pooling) and final
(corpus ratio), encoder and decoder FLOPs relative to unpooled (analytic, asr.encoder_flops /
asr.decoder_flops: the decoder's unpooled reference is the same token counts over all 1500 frames),
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
import os
import time
from pathlib import Path

import numpy as np

from affjax.metrics import corpus_wer, make_normalizer  # scoring lives in affjax/metrics.py

__all__ = ["MODEL_NAMES", "DATASETS", "EvalConfig", "resolve_checkpoint", "run_eval", "RUNNERS",
           "make_normalizer", "corpus_wer", "format_summary"]

MODEL_NAMES = {"whisper-base": "base", "whisper-tiny.en": "tiny.en"}  # --model -> assets name
DATASETS = ("librivox",)
TASKS = ("asr", "qa", "st")


@dataclasses.dataclass
class EvalConfig:
    ckpt: str | None = None
    model: str | None = None          # a MODEL_NAMES key (instead of ckpt)
    task: str = "asr"
    manifest: str | None = None
    data: str | None = None           # a DATASETS name (instead of manifest)
    out: str | None = None            # default runs/<model>-<data>
    batch_size: int = 8
    pooling: str | None = None        # None: unpooled + the default pooled setting
    proportional: bool = False
    positions: str = "first"          # not used by Whisper
    max_new_tokens: int = 128
    dtype: str | None = None
    normalizer: str = "english"       # english | basic
    drop_padding: bool = False        # diagnostic: remove the frames past each clip
    language: str = "en"
    progress: bool = True
    # Qwen2-Audio checkpoints (affjax.eval_lslm)
    task_given: bool = False          # --task was given explicitly (checked against an hf: recipe's task)
    pool_mode: str = "bucketed"
    capacity: float | tuple[float, ...] | None = None
    schedule: str = "two-pass"        # two-pass | in-order
    window: int = 256                 # items per two-pass scheduling window
    retry_errors: bool = False
    limit: int | None = None          # first N items only
    mesh: str | None = None           # e.g. "data=4,model=2"


# ----------------------------------------------------------------------------------------------
# model and data resolution


def cache_root() -> Path:
    env = os.environ.get("AFFJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "affjax"


def resolve_checkpoint(cfg: EvalConfig, log=print) -> tuple[Path, str]:
    """(checkpoint dir, model label); converts a `--model` package on first use."""
    if (cfg.ckpt is None) == (cfg.model is None):
        raise ValueError("give exactly one of --ckpt and --model")
    if cfg.ckpt is not None:
        p = Path(cfg.ckpt)
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        return p, p.resolve().name
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"unknown --model {cfg.model!r}; known: {', '.join(MODEL_NAMES)}")
    from affjax.assets import whisper_ct2_dir
    from affjax.checkpoint import CONFIG_NAME, FORMAT, convert

    dst = cache_root() / "models" / cfg.model
    meta = json.loads((dst / CONFIG_NAME).read_text()) if (dst / CONFIG_NAME).is_file() else None
    if meta is None or meta.get("format", 1) < FORMAT:
        src = whisper_ct2_dir(MODEL_NAMES[cfg.model])
        log(f"converting {cfg.model} ({'first use' if meta is None else 'made by an older converter'}) -> {dst}")
        convert(src, dst, overwrite=True, progress=False)
    return dst, cfg.model


def _rows(cfg: EvalConfig):
    """(rows, data label): rows are ManifestRow-like objects with id, item, error, ok."""
    from affjax.data.manifest import ManifestRow, read_manifest

    if (cfg.manifest is None) == (cfg.data is None):
        raise ValueError("give exactly one of --manifest and --data")
    if cfg.data and cfg.data.startswith("hf:"):
        raise ValueError("--data hf:... recipes are for Qwen2-Audio checkpoints (they carry its prompts)")
    if cfg.manifest is not None:
        return read_manifest(cfg.manifest, required=("id", "audio")), Path(cfg.manifest).stem
    if cfg.data not in DATASETS:
        raise ValueError(f"unknown --data {cfg.data!r}; known: {', '.join(DATASETS)}")
    from affjax.assets import librivox_items

    items = librivox_items()
    return [ManifestRow(i + 1, it["id"], {**it, "audio": str(it["audio"])}, None)
            for i, it in enumerate(items)], cfg.data


# ----------------------------------------------------------------------------------------------
# the Whisper ASR runner


def _load_whisper(ckpt: Path, dtype: str | None):
    from transformers import WhisperProcessor

    from affjax.checkpoint import load

    model, mcfg, meta = load(ckpt, dtype=dtype)
    try:
        processor = WhisperProcessor.from_pretrained(str(ckpt))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{ckpt}: no Whisper processor (tokenizer + feature extractor) beside the weights: {e}") \
            from None
    return model, processor


def _settings(cfg: EvalConfig, wcfg) -> list[tuple[str, object]]:
    from affjax.models.whisper import asr

    if cfg.pooling is None:
        return [("unpooled", asr.parse_whisper_pooling("none", wcfg)), ("pooled", asr.default_pooling(wcfg))]
    return [("", asr.parse_whisper_pooling(cfg.pooling, wcfg, cfg.proportional))]


def _run_setting(model, processor, rows, pooling, cfg: EvalConfig, out_dir: Path, labels: dict, norm,
                 norm_name: str) -> dict:
    from tqdm import tqdm

    from affjax.data.audio import load_audio
    from affjax.models.whisper import asr

    wcfg = model.cfg
    sr = processor.feature_extractor.sampling_rate
    good = [r for r in rows if r.error is None]
    bsz = max(1, min(cfg.batch_size, len(good)))  # never pad a small job to a large batch
    n_unpooled = wcfg.encoder.max_source_positions
    results: dict[int, dict] = {}
    t0 = time.perf_counter()
    first_batch = None
    bar = tqdm(total=len(rows), unit="item", disable=not cfg.progress,
               desc=f"asr {pooling.to_text() if pooling.stages else 'unpooled'}")
    enc_f = enc_f0 = dec_f = dec_f0 = 0
    audio_counts, frames_kept = [], []
    chunk_samples = processor.feature_extractor.n_samples

    def flush(pending):
        nonlocal first_batch, enc_f, enc_f0, dec_f, dec_f0
        if not pending:
            return
        tb = time.perf_counter()
        out = asr.transcribe_pooled(model, processor, [w for _, w in pending], pooling,
                                    drop_padding=cfg.drop_padding, max_new_tokens=cfg.max_new_tokens,
                                    batch_size=bsz, language=cfg.language, sampling_rate=sr)
        if first_batch is None:
            first_batch = time.perf_counter() - tb
        for i, (row, _) in enumerate(pending):
            ref = row.item.get("text")
            n_gen = len(out.tokens[i]) + (1 if out.finished[i] else 0)
            enc_f += asr.encoder_flops(wcfg.encoder, out.layer_tokens[i])
            enc_f0 += asr.encoder_flops(wcfg.encoder, [n_unpooled] * wcfg.encoder.layers)
            dec_f += asr.decoder_flops(wcfg, out.enc_len[i], out.prompt_len, n_gen)
            dec_f0 += asr.decoder_flops(wcfg, n_unpooled, out.prompt_len, n_gen)
            audio_counts.append(out.audio_tokens[i])
            frames_kept.append(out.enc_len[i])
            results[row.index] = {"id": row.id, "reference": ref if isinstance(ref, str) else None,
                                  "text": out.texts[i], "audio_tokens": out.audio_tokens[i],
                                  "enc_frames": out.enc_len[i], "finished": out.finished[i]}
            if len(pending[i][1]) > chunk_samples:  # short-form only: Whisper hears the first 30 s
                results[row.index]["truncated"] = True
        bar.update(len(pending))

    pending = []
    for row in rows:
        if row.error is not None:
            results[row.index] = {"id": row.id, "error": row.error}
            bar.update(1)
            continue
        try:
            wave = load_audio(row.item["audio"], sr=sr)
        except Exception as e:  # one bad item never stops the job  # noqa: BLE001
            results[row.index] = {"id": row.id, "error": f"{type(e).__name__}: {e}"}
            bar.update(1)
            continue
        pending.append((row, wave))
        if len(pending) == bsz:
            flush(pending)
            pending = []
    flush(pending)
    bar.close()
    seconds = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "w", encoding="utf-8") as f:
        for idx in sorted(results):
            f.write(json.dumps(results[idx], ensure_ascii=False) + "\n")

    ok = [r for r in results.values() if "error" not in r]
    scored = [r for r in ok if r["reference"] is not None]
    wer = corpus_wer([norm(r["reference"]) for r in scored], [norm(r["text"]) for r in scored])
    summary = {
        "task": "asr", "model": labels["model"], "data": labels["data"],
        "pooling": pooling.to_text(), "proportional": bool(pooling.proportional and pooling.stages),
        "drop_padding": cfg.drop_padding,
        "items": len(rows), "ok": len(ok), "errors": len(rows) - len(ok), "scored": len(scored),
        "unfinished": sum(1 for r in ok if not r["finished"]),
        "wer": None if wer is None else round(wer, 6), "normalizer": norm_name,
    }
    if audio_counts:
        a = np.asarray(audio_counts, np.float64)
        base = np.maximum(a[:, :1], 1)
        summary["retention_per_stage"] = [round(float((a[:, k:k + 1] / base).mean()), 4) for k in range(1, a.shape[1])]
        summary["final_retention"] = round(float(a[:, -1].sum() / max(a[:, 0].sum(), 1)), 4)
        summary["enc_frames_kept"] = round(float(np.mean(frames_kept)) / n_unpooled, 4)
        summary["encoder_flops_rel"] = round(enc_f / enc_f0, 4)
        summary["decoder_flops_rel"] = round(dec_f / dec_f0, 4)
        summary["flops_rel"] = round((enc_f + dec_f) / (enc_f0 + dec_f0), 4)
        summary["gflops_per_item"] = round((enc_f + dec_f) / len(ok) / 1e9, 2)
    summary["seconds"] = round(seconds, 2)
    summary["first_batch_seconds_incl_compile"] = None if first_batch is None else round(first_batch, 2)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run_whisper_asr(cfg: EvalConfig, ckpt: Path, labels: dict, log=print) -> dict:
    t0 = time.perf_counter()
    model, processor = _load_whisper(ckpt, cfg.dtype)
    t_load = time.perf_counter() - t0
    rows, _ = _rows(cfg)
    norm, norm_name = make_normalizer(processor.tokenizer, cfg.normalizer)
    out = Path(cfg.out or Path("runs") / f"{labels['model']}-{labels['data']}")
    settings = _settings(cfg, model.cfg)
    runs = []
    for name, pooling in settings:
        s = _run_setting(model, processor, rows, pooling, cfg, out / name if name else out, labels, norm,
                         norm_name)
        if name:
            s["setting"] = name
        runs.append(s)
    total = round(time.perf_counter() - t0, 2)
    if len(runs) == 1:
        summary = dict(runs[0], load_seconds=round(t_load, 2), total_seconds=total)
    else:
        summary = {"runs": runs, "load_seconds": round(t_load, 2), "total_seconds": total}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["out"] = str(out)
    return summary


def _run_lslm(cfg: EvalConfig, ckpt: Path, labels: dict, log=print) -> dict:
    from affjax.eval_lslm import run_lslm_eval
    return run_lslm_eval(cfg, ckpt, labels, log=log)


# (model_type, task) -> runner(cfg, ckpt, labels)
RUNNERS = {("whisper", "asr"): run_whisper_asr, **{("qwen2_audio", t): _run_lslm for t in TASKS}}


def run_eval(cfg: EvalConfig, log=print) -> dict:
    """Resolve the checkpoint and data, dispatch on (model_type, task), return the summary."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown --task {cfg.task!r}; known: {', '.join(TASKS)}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    from affjax.checkpoint import CONFIG_NAME

    ckpt, model_label = resolve_checkpoint(cfg, log)
    try:
        meta = json.loads((ckpt / CONFIG_NAME).read_text())
    except OSError:
        raise ValueError(f"{ckpt}: no {CONFIG_NAME} (not an affjax checkpoint)") from None
    key = (meta.get("model_type"), cfg.task)
    if key not in RUNNERS:
        raise ValueError(f"eval --task {cfg.task} is not available for model_type {key[0]!r} "
                         f"(available: {', '.join(f'{m}/{t}' for m, t in RUNNERS)})")
    data_label = (cfg.data.split(":", 1)[1].replace("/", "_").replace(":", "-") if cfg.data and cfg.data.startswith("hf:")
                  else cfg.data if cfg.data else Path(cfg.manifest or "data").stem)
    return RUNNERS[key](cfg, ckpt, {"model": model_label, "data": data_label}, log=log)


# ----------------------------------------------------------------------------------------------
# printing


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(summary: dict) -> str:
    if "primary" in summary:  # a Qwen2-Audio eval (affjax.eval_lslm)
        from affjax.eval_lslm import format_lslm_summary
        return format_lslm_summary(summary)
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
