"""Batch jobs over a JSONL manifest: `score` (teacher-forced log-likelihood of a continuation) and
`generate` (greedy decoding), for Qwen2-Audio checkpoints.

Rows come out in manifest order. A bad item (missing or corrupt audio, bad prompt, malformed line)
becomes a row with `error` naming the cause; the job goes on with the rest.

`mesh` ("data=4,model=2", affjax.sharding) runs the model sharded over the devices; without it a
machine with several devices puts them all on `data`. On several processes (a multi-host slice,
`jax.distributed`), each process runs its share of the manifest and process 0 writes the output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from affjax import shapes


@dataclasses.dataclass
class JobConfig:
    task: str                      # "score" | "generate"
    ckpt: str
    manifest: str
    out: str
    batch_size: int = 4
    max_new_tokens: int = 64
    pooling: str | None = None
    positions: str = "first"
    proportional: bool = False
    pool_mode: str = "bucketed"
    capacity: float | tuple[float, ...] | None = None  # one retention, or one per stage
    dtype: str | None = None
    progress: bool = True
    xla_cost: bool = True          # pooled runs: XLA-measured LM prefill FLOPs vs unpooled (compiles the
                                   # unpooled programs of each batch shape once for cost analysis)
    mesh: str | None = None        # device mesh "data=4,model=2" (affjax.sharding.parse_mesh)


def enable_compile_cache(path: str | None = None) -> str:
    """JAX's persistent compilation cache: warm runs skip XLA compilation."""
    import jax
    path = path or os.environ.get("AFFJAX_COMPILE_CACHE") or str(Path.home() / ".cache" / "affjax" / "jax-compile")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def load_for_inference(ckpt: str, dtype: str | None = None, mesh=None):
    """(model, cfg, processor, eos_ids, pad_id) from a converted checkpoint directory; with a `mesh`
    every parameter is restored directly onto its shards (affjax.sharding)."""
    from transformers import AutoProcessor, GenerationConfig

    from affjax import sharding

    model, cfg, meta = sharding.load(ckpt, mesh, dtype=dtype)
    processor = AutoProcessor.from_pretrained(ckpt)
    eos = []
    try:
        gc = GenerationConfig.from_pretrained(ckpt)
        eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    except OSError:
        pass
    tok = processor.tokenizer
    if not eos or eos == [None]:
        eos = [tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return model, cfg, processor, [int(e) for e in eos if e is not None], int(pad)


def _audio_paths(item: dict) -> list[str]:
    a = item.get("audio")
    if a is None:
        return []
    return [a] if isinstance(a, str) else list(a)


def _prepare(row, processor, task: str):
    """Manifest row -> Encoded, or raise ValueError naming the cause."""
    from affjax.data.audio import load_audio
    from affjax.models.qwen2_audio.inputs import encode

    item = row.item
    prompt = item.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("missing or non-string 'prompt'")
    cont = None
    if task == "score":
        cont = item.get("continuation")
        if not isinstance(cont, str):
            raise ValueError("missing or non-string 'continuation'")
    sr = processor.feature_extractor.sampling_rate
    audios = [load_audio(p, sr=sr) for p in _audio_paths(item)]
    try:
        return encode(processor, prompt, audios, cont)
    except (ValueError, TypeError) as e:
        raise ValueError(f"processor rejected the item: {e}") from None


def run(job: JobConfig, *, log=print) -> dict:
    """Run a score/generate job; writes JSONL rows to job.out and returns the summary dict."""
    from tqdm import tqdm

    from affjax import sharding
    from affjax.data.manifest import read_manifest
    from affjax.engine import TRACES, Engine
    from affjax.models.qwen2_audio.inputs import collate
    from affjax.pooling.spec import parse_pooling

    if job.task not in ("score", "generate"):
        raise ValueError(f"unknown task {job.task!r}")
    t_start = time.perf_counter()
    sharding.initialize_distributed()  # first: a no-op (one line on stderr) unless launched as several processes
    mesh = sharding.mesh_or_none(job.mesh)
    model, cfg, processor, eos_ids, pad_id = load_for_inference(job.ckpt, job.dtype, mesh)
    pooling = parse_pooling(job.pooling, cfg.text.layers, positions=job.positions, proportional=job.proportional)
    engine = Engine(model, pooling=pooling, pool_mode=job.pool_mode, capacity=job.capacity,
                    eos_ids=eos_ids, pad_id=pad_id, mesh=mesh)
    rows_per_batch = sharding.padded_batch_size(job.batch_size, mesh)  # whole rows of the data axis
    engine.record = bool(pooling.stages)  # programs of each prefill, for the XLA FLOPs ratio
    t_load = time.perf_counter() - t_start
    required = ("id", "audio", "prompt") + (("continuation",) if job.task == "score" else ())
    all_rows = read_manifest(job.manifest, required=required)
    rows = sharding.host_share(all_rows)  # this process's rows (all of them on one process)
    out_path = Path(job.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    results: dict[int, dict] = {}
    stage_counts = []  # per item: [audio before, after stage 1, ...]
    forced_total = 0
    flop_counts = []  # per item: valid tokens [unpooled, after stage 1, ...] (analytic FLOPs)
    xla_lm = {"pooled": 0.0, "unpooled": 0.0}
    n_ok = n_err = 0
    times = {"first_batch": None, "steady": 0.0, "steady_items": 0, "compile_batches": 0, "batches": 0}
    bar = tqdm(total=len(rows), unit="item", disable=not job.progress, desc=job.task)

    def flush_batch(pending):
        nonlocal n_ok, forced_total
        if not pending:
            return
        traces_before = sum(TRACES.values())
        t0 = time.perf_counter()
        batch = collate([e for _, e in pending], batch_size=rows_per_batch, audio_token_id=cfg.audio_token_id,
                        out_frames_of=cfg.audio.output_lengths, pad_id=pad_id)
        times["batches"] += 1
        if job.task == "score":
            lp, stats = engine.score(batch)
        else:
            toks, stats = engine.generate(batch, job.max_new_tokens)
        dt = time.perf_counter() - t0
        compiled = sum(TRACES.values()) > traces_before
        if compiled:
            times["compile_batches"] += 1
            times["first_batch"] = times["first_batch"] or dt
        else:
            times["steady"] += dt
            times["steady_items"] += len(pending)
        for b, (row, enc) in enumerate(pending):
            audio = [int((batch.span[b] > 0).sum())] + [int(s["audio_out"][b]) for s in stats]
            rec = {"id": row.id}
            if job.task == "score":
                rec.update(logprob=float(lp[b]), num_tokens=int(len(enc.cont_ids)))
            else:
                rec.update(text=processor.tokenizer.decode(toks[b], skip_special_tokens=True), tokens=toks[b])
            if pooling.stages:
                rec["audio_tokens"] = audio
                flop_counts.append([int(batch.valid[b].sum())] + [int(s["n_valid"][b]) for s in stats])
                if job.pool_mode == "fixed":
                    rec["forced_merges"] = [int(s["forced"][b]) for s in stats]
                    forced_total += sum(rec["forced_merges"])
                stage_counts.append(audio)
            results[row.index] = rec
            n_ok += 1
        if pooling.stages and job.xla_cost:
            _add_xla_lm_flops(engine, batch, job, xla_lm)
        bar.update(len(pending))

    pending = []
    for row in rows:
        if row.error is not None:
            results[row.index] = {"id": row.id, "error": row.error}
            n_err += 1
            bar.update(1)
            continue
        try:
            enc = _prepare(row, processor, job.task)
            n = len(enc.ids) + (len(enc.cont_ids) if enc.cont_ids is not None else 0)
            shapes.bucket(n)
        except Exception as e:  # one bad item never stops the job
            results[row.index] = {"id": row.id, "error": f"{type(e).__name__}: {e}"}
            n_err += 1
            bar.update(1)
            continue
        pending.append((row, enc))
        if len(pending) == job.batch_size:
            flush_batch(pending)
            pending = []
    flush_batch(pending)
    bar.close()
    if sharding.process_count() > 1:  # every process makes the same engine calls, then process 0 writes
        fe = processor.feature_extractor
        for _ in range(int(sharding.agree_max([times["batches"]])[0]) - times["batches"]):
            empty = sharding.empty_batch(rows_per_batch, n_mels=fe.feature_size, frames=fe.nb_max_frames,
                                         score=job.task == "score", pad_id=pad_id)
            engine.score(empty) if job.task == "score" else engine.generate(empty, job.max_new_tokens)
        mine = {"results": [[i, r] for i, r in results.items()], "stage_counts": stage_counts,
                "flop_counts": flop_counts, "xla_lm": xla_lm, "ok": n_ok, "errors": n_err, "forced": forced_total}
        every = sharding.gather_to_host0([mine])
        if every is None:
            return {"task": job.task, "process": sharding.process_index(), "items": len(rows), "written_by": 0}
        results = {i: r for p in every for i, r in p["results"]}
        stage_counts = [c for p in every for c in p["stage_counts"]]
        flop_counts = [c for p in every for c in p["flop_counts"]]
        xla_lm = {k: sum(p["xla_lm"][k] for p in every) for k in xla_lm}
        n_ok, n_err, forced_total = (sum(p[k] for p in every) for k in ("ok", "errors", "forced"))

    with open(out_path, "w", encoding="utf-8") as f:
        for idx in sorted(results):
            f.write(json.dumps(results[idx], ensure_ascii=False) + "\n")

    summary = {
        "task": job.task, "items": len(all_rows), "ok": n_ok, "errors": n_err,
        "load_seconds": round(t_load, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
        "first_batch_seconds_incl_compile": None if times["first_batch"] is None else round(times["first_batch"], 3),
        "steady_items_per_second": (round(times["steady_items"] / times["steady"], 3) if times["steady"] else None),
        "compiles": dict(TRACES),
        "pooling": pooling.to_text() if pooling.stages else "none",
        "mesh": sharding.mesh_text(mesh) if mesh is not None else "one device",
    }
    if pooling.stages and stage_counts:
        arr = np.asarray(stage_counts, np.float64)
        base = np.maximum(arr[:, :1], 1)
        summary["retention_per_stage"] = [round(float((arr[:, k + 1:k + 2] / base).mean()), 4)
                                          for k in range(arr.shape[1] - 1)]
        summary["final_retention"] = round(float(arr[:, -1].sum() / max(arr[:, 0].sum(), 1)), 4)
        if job.pool_mode == "fixed":
            summary["forced_merges"] = forced_total
        summary.update(_flops_summary(cfg.text, pooling.stages, flop_counts, xla_lm if job.xla_cost else None))
    return summary


def _add_xla_lm_flops(engine, batch, job: JobConfig, acc: dict) -> None:
    """Add this batch's LM prefill FLOPs, from XLA's cost analysis, pooled (the programs the engine
    just ran) and unpooled (the same batch through an unpooled prefill), the audio encoder +
    embedding program left out of both."""
    from affjax.flops import lm_xla_flops
    score = job.task == "score"
    unpooled = engine.program_costs(engine.unpooled_programs(batch, extra=0 if score else job.max_new_tokens,
                                                             score=score))
    pooled = engine.program_costs(engine.programs)
    embed = unpooled["embed"]["flops"]
    acc["pooled"] += lm_xla_flops(pooled, embed)
    acc["unpooled"] += lm_xla_flops(unpooled, embed)


def _flops_summary(text_cfg, stages, counts, xla_lm) -> dict:
    """Pooled vs unpooled LM prefill FLOPs of the run's batches (spec section 5)."""
    from affjax.flops import analytic_lm_flops, tokens_per_layer
    if not counts:
        return {}
    L = text_cfg.layers
    pooled = analytic_lm_flops(text_cfg, [tokens_per_layer(L, stages, c) for c in counts])
    unpooled = analytic_lm_flops(text_cfg, [[c[0]] * L for c in counts])
    out = {"lm_prefill_flops_ratio_analytic": round(pooled / unpooled, 4)}
    detail = {"analytic_pooled": pooled, "analytic_unpooled": unpooled}
    if xla_lm is not None and xla_lm["unpooled"] > 0:
        out["lm_prefill_flops_ratio_xla"] = round(xla_lm["pooled"] / xla_lm["unpooled"], 4)
        detail.update(xla_pooled=xla_lm["pooled"], xla_unpooled=xla_lm["unpooled"])
    out["lm_prefill_flops"] = detail
    return out
