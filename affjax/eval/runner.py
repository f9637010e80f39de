"""The one job runner: `affjax score`, `affjax generate` and every `affjax eval` go through it.

    options -> validate (before any heavy work) -> manifest rows -> run record (resume or refuse)
    -> model -> windows of items: prepare each (a bad item is an error row) -> the task runs its
    batches (rows stored and fsynced per batch) -> compact in manifest order -> summary

A task (Qwen2-Audio, Kimi-Audio: affjax.eval.lslm; Whisper: affjax.eval.whisper) gives
`prepare(row)` (raise to make the item an error row naming the cause) and `run_window(items, sink)`, which calls
`sink.done(item, record)` or `sink.fail(item, cause)` for every item. `run_batch` is the rule every
task's batches follow: a batch that raises (a compile error, an out-of-memory) is run again item
by item, once, and only the items that fail alone become error rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from affjax.data.assets import librivox_items, whisper_ct2_dir
from affjax.data.manifest import ManifestRow
from affjax.eval.results import ResultStore
from affjax.runtime.compiles import TRACES

SCHEDULES = ("two-pass", "in-order")


class UsageError(ValueError):
    """Bad options or inputs, found before any heavy work: one line, exit status 1."""


@dataclasses.dataclass
class JobConfig:
    """Every option of score / generate / eval (the CLI fills it; tests build it directly)."""
    task: str | None = None          # score | generate | asr | qa | st (None: asr, or the hf: recipe's task)
    ckpt: str | None = None
    model: str | None = None          # an installed real model name (affjax.eval.whisper.MODEL_NAMES)
    manifest: str | None = None
    data: str | None = None           # librivox | hf:DATASET[:CONFIG]:SPLIT
    out: str | None = None            # eval: run directory; score/generate: the results JSONL
    batch_size: int = 8
    max_new_tokens: int = 128
    pooling: str | None = None
    positions: str = "first"
    proportional: bool = False
    pool_mode: str = "bucketed"
    capacity: float | tuple[float, ...] | None = None
    dtype: str | None = None
    normalizer: str = "english"       # Whisper WER: english | basic
    drop_padding: bool = False        # Whisper diagnostic
    language: str = "en"              # Whisper decoding language
    schedule: str | None = None       # two-pass | in-order (default: two-pass for eval, in-order for score/generate)
    window: int = 256                 # items per scheduling window
    retry_errors: bool = False
    restart: bool = False
    limit: int | None = None
    mesh: str | None = None
    xla_cost: bool = True             # pooled in-order runs: XLA-measured LM prefill FLOPs vs unpooled
    progress: bool = True
    oracle: str | None = None         # Qwen2-Audio eval: oracle interventions 'SPEC;SPEC...' (affjax.eval.oracle)
    alignment: str | None = None      # their word alignments (JSONL; default RUN_DIR/alignment.jsonl)


def validate(cfg: JobConfig) -> None:
    """Every cheap check of the options, before a checkpoint is read (minutes for a 7B model)."""
    def need(ok: bool, msg: str):
        if not ok:
            raise UsageError(msg)
    need(cfg.task in (None, "score", "generate", "asr", "qa", "st"), f"unknown task {cfg.task!r}")
    need((cfg.ckpt is None) != (cfg.model is None), "give exactly one of --ckpt and --model")
    need(cfg.task not in ("score", "generate") or cfg.out is not None, f"{cfg.task} needs --out FILE.jsonl")
    need((cfg.manifest is None) != (cfg.data is None), "give exactly one of --manifest and --data")
    need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    need(cfg.window >= 1, f"--window must be >= 1, got {cfg.window}")
    need(cfg.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}")
    need(cfg.limit is None or cfg.limit >= 1, f"--limit must be >= 1, got {cfg.limit}")
    need(cfg.schedule in (None,) + SCHEDULES, f"unknown --schedule {cfg.schedule!r} ({', '.join(SCHEDULES)})")
    need(cfg.pool_mode in ("bucketed", "fixed"), f"--pool-mode must be bucketed or fixed, got {cfg.pool_mode!r}")
    need(cfg.positions in ("first", "mean", "reindex"), f"unknown --positions {cfg.positions!r}")
    need(cfg.normalizer in ("english", "basic"), f"unknown --normalizer {cfg.normalizer!r}")
    if cfg.capacity is not None:
        need(cfg.pool_mode == "fixed", "--capacity applies to --pool-mode fixed only (bucketed mode has no cap)")
        caps = cfg.capacity if isinstance(cfg.capacity, tuple) else (cfg.capacity,)
        need(all(0.0 < float(c) <= 1.0 for c in caps), f"--capacity retentions must lie in (0, 1], got {cfg.capacity}")
    if cfg.pool_mode == "fixed" and cfg.pooling not in (None, "none"):
        need(cfg.capacity is not None, "--pool-mode fixed needs --capacity (a fraction of the audio tokens)")
    if cfg.mesh is not None:
        from affjax.runtime.sharding import parse_mesh  # deferred: sharding imports jax; only --mesh needs it
        try:
            parse_mesh(cfg.mesh)
        except ValueError as e:
            raise UsageError(f"--mesh {cfg.mesh!r}: {e}") from None
    if cfg.oracle is not None:
        need(cfg.task in (None, "asr", "qa", "st"), "--oracle is an eval option (tasks asr, qa, st)")
        need(cfg.pooling in (None, "none") and cfg.pool_mode == "bucketed",
             "--oracle runs on the unpooled model: leave out --pooling and --pool-mode fixed")
        from affjax.eval.oracle import parse_specs  # deferred: the oracle module imports jax
        try:
            parse_specs(cfg.oracle)
        except ValueError as e:
            raise UsageError(f"--oracle {cfg.oracle!r}: {e}") from None
    if cfg.ckpt is not None:
        need(Path(cfg.ckpt).is_dir(), f"checkpoint not found: {cfg.ckpt}")
    if cfg.manifest is not None:
        need(Path(cfg.manifest).is_file(), f"manifest not found: {cfg.manifest}")


def check_rows(rows: list, what: str) -> None:
    """An empty manifest is an error, not a run of nothing."""
    if not rows:
        raise UsageError(f"{what} has no items")


REFERENCE_NAMES = ("reference", "text", "transcript", "transcription", "sentence", "ref")


def reference_field(rows: list, manifest, log=print) -> None:
    """An ASR manifest names its transcript field in one of the common ways: take the first found as
    `reference`. A manifest in which no item has one is transcribed but not scored, and says so,
    naming the fields it looked for."""
    good = [r for r in rows if r.error is None]
    for r in good:
        for k in REFERENCE_NAMES:
            if isinstance(r.item.get(k), str):
                r.item["reference"] = r.item[k]
                break
    if good and not any(isinstance(r.item.get("reference"), str) for r in good):
        log(f"warning: {manifest}: no item has a transcript (fields {', '.join(REFERENCE_NAMES)}): the items "
            "are transcribed but no WER is computed")


def data_label(cfg: JobConfig) -> str:
    """The data part of a run's name: the manifest's stem, `librivox`, or the hf: spec made path-safe."""
    if cfg.data is None:
        return Path(cfg.manifest).stem
    return cfg.data.split(":", 1)[-1].replace("/", "_").replace(":", "-")


def librivox_rows(limit: int | None = None) -> tuple[list, str]:
    """`--data librivox`: the installed LibriVox clips (real read speech) as manifest rows with their
    transcripts as `reference` -> (rows, data fingerprint)."""
    items = [{**it, "audio": str(it["audio"]), "reference": it["text"]} for it in librivox_items()]
    rows = [ManifestRow(i + 1, it["id"], it, None) for i, it in enumerate(items)]
    return (rows[:limit] if limit else rows), json.dumps(items, sort_keys=True)


def dedupe_ids(rows: list) -> None:
    """A duplicate id's error row is stored as `id@lineN`, so it never replaces the first item's result."""
    seen = set()
    for r in rows:
        if r.id in seen:
            r.id = f"{r.id}@line{r.index}"
        seen.add(r.id)


@dataclasses.dataclass
class Clock:
    """This invocation's time: compiling batches apart from steady ones (RTFx counts steady audio
    seconds over steady processing seconds, as the Open ASR Leaderboard reports it)."""
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    steady_seconds: float = 0.0
    steady_units: int = 0
    steady_audio_seconds: float = 0.0
    items_done: int = 0

    def timed(self, fn, units: int = 0, audio_seconds: float = 0.0):
        before = sum(TRACES.values())
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.run_seconds += dt
        if sum(TRACES.values()) > before:
            self.compile_seconds += dt
        else:
            self.steady_seconds += dt
            self.steady_units += units
            self.steady_audio_seconds += audio_seconds
        return out

    def summary(self) -> dict:
        s = self.steady_seconds
        return {"items_this_run": self.items_done, "run_seconds": round(self.run_seconds, 3),
                "compile_seconds": round(self.compile_seconds, 3),
                "items_per_second": round(self.items_done / self.run_seconds, 3) if self.run_seconds else None,
                "steady_sequences_per_second": round(self.steady_units / s, 3) if s else None,
                "rtfx": round(self.steady_audio_seconds / s, 2) if s and self.steady_audio_seconds else None}


class Sink:
    """Where a task puts finished items: the results store, the progress bar and the clock."""

    def __init__(self, store: ResultStore, bar, clock: Clock):
        self.store, self.bar, self.clock = store, bar, clock
        self.failed_batches = 0

    def done(self, row_id: str, rec: dict) -> None:
        self.store.add({"id": row_id, **rec})
        self.clock.items_done += 1
        self.bar.update(1)

    def fail(self, row_id: str, cause: str) -> None:
        self.store.add({"id": row_id, "error": cause})
        self.clock.items_done += 1
        self.bar.update(1)


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def run_batch(fn, units: list, on_error, *, retry: bool = True, log=print):
    """`fn(units)` -> outputs; if the batch raises, each unit runs alone once and `on_error(unit,
    cause)` takes those that still fail. Returns [(unit, output)] of the units that succeeded."""
    try:
        return list(zip(units, fn(units)))
    except Exception as e:  # noqa: BLE001 - a batch failure must not end the job
        if not retry or len(units) == 1:
            for u in units:
                on_error(u, describe(e))
            return []
        log(f"a batch of {len(units)} failed ({describe(e)}); running its items one by one")
    done = []
    for u in units:
        try:
            done += list(zip([u], fn([u])))
        except Exception as e:  # noqa: BLE001
            on_error(u, describe(e))
    return done


def run_items(task, rows: list, store: ResultStore, *, window: int, retry_errors: bool, progress: bool,
              desc: str, log=print, multi: bool = False, clock: Clock | None = None) -> Clock:
    """The skeleton: skip done ids, prepare each item (a bad one is an error row), hand windows of
    prepared items to the task, flush the store after each. Several processes run the same number
    of windows (the task's batches are collective)."""
    done = store.done(retry_errors)
    todo = [r for r in rows if r.id not in done]
    if len(todo) < len(rows):
        log(f"resuming {store.path}: {len(rows) - len(todo)} of {len(rows)} items already done")
    clock = clock or Clock()
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), unit="item", disable=not progress, desc=desc,
               dynamic_ncols=True)
    sink = Sink(store, bar, clock)
    n_windows = -(-len(todo) // window)
    if multi:
        from affjax.runtime import sharding  # deferred: keeps this module jax-free (imported before validation)
        n_windows = int(sharding.agree_max([n_windows])[0])
    try:
        for w in range(0, n_windows * window, window):
            items = []
            for row in todo[w:w + window]:
                if row.error is not None:
                    sink.fail(row.id, row.error)
                    continue
                try:
                    items.append(task.prepare(row))
                except Exception as e:  # noqa: BLE001 - one bad item never stops the run
                    sink.fail(row.id, describe(e))
            store.flush()
            if items or multi:
                task.run_window(items, sink)
            store.flush()
            bar.set_postfix(compile=f"{clock.compile_seconds:.1f}s", refresh=False)
    finally:
        bar.close()
    return clock


def enable_compile_cache(path: str | None = None) -> str:
    """JAX's persistent compilation cache: warm runs skip XLA compilation."""
    import jax  # deferred: keeps this module jax-free (imported before validation)
    path = path or os.environ.get("AFFJAX_COMPILE_CACHE") or str(Path.home() / ".cache" / "affjax" / "jax-compile")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def compiles_since(before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in TRACES.items() if v - before.get(k, 0)}


# ----------------------------------------------------------------------------------------------
# model resolution and dispatch


def cache_root() -> Path:
    env = os.environ.get("AFFJAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "affjax"


def resolve_checkpoint(cfg: JobConfig, log=print) -> tuple[Path, str]:
    """(checkpoint dir, model label); converts a `--model` package on first use."""
    if (cfg.ckpt is None) == (cfg.model is None):
        raise UsageError("give exactly one of --ckpt and --model")
    if cfg.ckpt is not None:
        p = Path(cfg.ckpt)
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        return p, p.resolve().name
    if cfg.model == "lslm-tiny":  # built from installed parts + the committed trained weights
        from affjax.train.lslm import install  # deferred: model code (jax) loads only now
        try:
            return install(cache_root() / "models" / cfg.model, log=log), cfg.model
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    from affjax.eval.whisper import MODEL_NAMES  # deferred: import cycle with affjax.eval.whisper
    if cfg.model not in MODEL_NAMES:
        raise UsageError(f"unknown --model {cfg.model!r}; known: {', '.join(MODEL_NAMES)}, lslm-tiny")
    from affjax.models.checkpoint import ensure_converted  # deferred: model code (jax) loads only now
    return ensure_converted(whisper_ct2_dir(MODEL_NAMES[cfg.model]), cache_root() / "models" / cfg.model,
                            log=log), cfg.model


def _run_lslm(cfg: JobConfig, ckpt: Path, model_label: str, log=print) -> dict:
    if cfg.oracle is not None:
        from affjax.eval.oracle import run_oracle  # deferred: import cycle with affjax.eval.lslm
        return run_oracle(cfg, ckpt, model_label, log=log)
    from affjax.eval.lslm import run_lslm  # deferred: import cycle with affjax.eval.lslm
    return run_lslm(cfg, ckpt, model_label, log=log)


def _run_whisper(cfg: JobConfig, ckpt: Path, model_label: str, log=print) -> dict:
    from affjax.eval.whisper import run_whisper_asr  # deferred: import cycle with affjax.eval.whisper
    return run_whisper_asr(cfg, ckpt, model_label, log=log)


# model_type -> (tasks, job(cfg, ckpt, model label))
RUNNERS = {"whisper": (("asr",), _run_whisper),
           "qwen2_audio": (("score", "generate", "asr", "qa", "st"), _run_lslm),
           "kimi_audio": (("score", "generate", "asr", "qa", "st"), _run_lslm)}


def run_eval(cfg: JobConfig, log=print) -> dict:
    """Validate the options, resolve the checkpoint, dispatch on (model_type, task); the summary.
    Every job (score, generate, eval) comes here."""
    validate(cfg)
    from affjax.models.checkpoint import CONFIG_NAME  # deferred: model code (jax) loads after validation

    ckpt, model_label = resolve_checkpoint(cfg, log)
    try:
        meta = json.loads((ckpt / CONFIG_NAME).read_text())
    except OSError:
        raise UsageError(f"{ckpt}: no {CONFIG_NAME} (not an affjax checkpoint)") from None
    mt = meta.get("model_type")
    tasks, run = RUNNERS.get(mt, ((), None))
    if cfg.oracle is not None and mt != "qwen2_audio":
        raise UsageError(f"--oracle needs a Qwen2-Audio checkpoint, this one is {mt!r}")
    task = cfg.task or ("asr" if not (cfg.data or "").startswith("hf:") else None)
    if run is None or (task is not None and task not in tasks):
        raise UsageError(f"task {cfg.task or 'asr'} is not available for model_type {mt!r} (available: "
                                + "; ".join(f"{m}: {', '.join(t)}" for m, (t, _) in RUNNERS.items()) + ")")
    return run(dataclasses.replace(cfg, task=task), ckpt, model_label, log=log)


def format_summary(summary: dict) -> str:
    """The summary as the CLI prints it, per model."""
    if "aligner" in summary:  # the oracle interventions' runs
        from affjax.eval.oracle import format_oracle_summary  # deferred: import cycle with affjax.eval.oracle
        return format_oracle_summary(summary)
    if summary.get("task") in ("score", "generate", "qa", "st") or "primary" in summary:
        from affjax.eval.lslm import format_lslm_summary  # deferred: import cycles with affjax.eval.lslm / .whisper
        return format_lslm_summary(summary)
    from affjax.eval.whisper import format_whisper_summary
    return format_whisper_summary(summary)
