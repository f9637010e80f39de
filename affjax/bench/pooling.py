"""`affjax bench-pooling`: what Affinity Pooling saves in the prefill, measured like for like.

Model: Qwen2-Audio's decoder depth (32 text layers) at a width this machine can run (hidden 256,
4 heads, SwiGLU 688 = Qwen2-Audio-7B's 11008/4096 ratio, vocab 4096) with a small audio tower
(d 128 x 2 layers); random weights. Input per item: one clip of --audio-seconds (25 audio tokens a
second: 750 at 30 s) between 40 text tokens. Methods (docs/pooling.md section 2 placements, paper
retentions):

- `unpooled`;
- `input`: one stage at l=0 keeping 78.6 % of the audio tokens (window 1);
- `deep@29`: one stage after decoder layer 29 keeping 14.9 % (window 3);
- `dap`: both, 78.6 % after the input stage and 14.9 % of the original after layer 29.

Like for like: every pooled run is compared with the unpooled run under the SAME buffer policy of
the input sequence, and every buffer after a stage follows affjax.runtime.shapes (the one bucket grid):

- `bucket` (the job path): the input sequence is padded to ``shapes.bucket(n)`` on both sides;
- `exact`: the input buffer is the valid length on both sides (no padding before the first stage;
  a pooled buffer is still sized by the engine, ``min(shapes.bucket(pooled), input buffer)``).

Each pooled method runs in both pooling modes of the engine:

- `fixed`: the one-program fixed-capacity prefill; tau = 2 (> 1: nothing merges on its own) and a
  per-stage retention cap r, so the overflow rule (docs/pooling.md section 4) merges each span to
  exactly max(1, ceil(r T)) groups; r per stage relative to the tokens entering it: (0.786,
  0.149 / 0.786) for `dap`; each buffer is ``shapes.bucket`` of the cap;
- `bucketed` (the default job mode): each piece its own program, exact threshold semantics, the
  host slicing the packed buffer to ``shapes.bucket`` of the longest row after each stage. Random
  weights make similarities meaningless, so each stage's tau is calibrated on these inputs (by
  bisection on the stage's own output count, in the middle of the tau interval that keeps the
  target) to keep the same ceil(r T) tokens per span as the fixed mode.

Reported per case (batch size x audio length x buffer policy), each as a ratio to unpooled:
- LM prefill FLOPs: analytic (valid tokens, docs/pooling.md section 5: the full attention square);
  XLA-realized (cost analysis of the compiled programs the prefill ran, at their padded buffers,
  while-loop bodies times their trip counts, the audio encoder + embedding program subtracted:
  affjax.runtime.flops); and XLA at the valid lengths (one decoder layer compiled at each stage's exact
  valid length, times its layers): the part of the realized-vs-analytic gap that is not padding
  but counting (XLA counts the blocked causal attention, about half the square above 256 tokens);
  the gap is realized - analytic in points;
- time to first token: prefill + the first greedy token (`Engine.generate(batch, 1)`), every
  engine of the case interleaved round-robin for --repeats rounds; speed-up = the median over
  rounds of the per-round ratio (and the ratio of medians); the first call (compilation) apart;
- peak prefill memory: max over the prefill's programs of XLA's memory analysis (temp + argument +
  output - aliased) plus the KV caches of the layer groups already run (a bucketed prefill holds
  them while its later programs run), with and without the parameters; the KV cache bytes of each
  layer group;
- compiles: the traces (= compilations, affjax.runtime.compiles.TRACES) the first call of each engine
  caused, the programs its prefill runs, and for the run as a whole the buckets its sequences can
  hit (shapes.buckets_between; the other grids' counts beside it). --seq-grid runs the whole bench
  under another grid of shapes.SEQ_GRIDS (16 per octave, or the old grid) to compare policies;
- optionally (--stage-timing) the pooling stage alone vs one decoder layer at the same buffer.

Run: ``python -m affjax.bench.pooling --batch 1 --audio-seconds 5 10 15 20 25 30 --methods dap``
(all options: ``--help``); ``affjax bench-pooling`` runs the same function with its own options.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.bench import kimi
from affjax.models.checkpoint import model_type_of
from affjax.models.kimi_audio.modeling import KimiAudio, KimiAudioConfig
from affjax.models.qwen2_audio.inputs import Encoded, collate
from affjax.models.qwen2_audio.modeling import Qwen2Audio, Qwen2AudioConfig
from affjax.pooling.affinity import retention_slots
from affjax.pooling.spec import PoolingConfig, Stage
from affjax.runtime import shapes
from affjax.runtime.compiles import TRACES
from affjax.runtime.costs import program_costs
from affjax.runtime.engine import (
    POOL_COMPILER_OPTIONS,
    Engine,
    Seq,
    chained_capacity,
    embed_seq,
    pool_program,
    pool_seq,
    run_layers,
    slice_seq,
)
from affjax.runtime.plan import load_hf_config
from affjax.runtime.flops import analytic_lm_flops, lm_xla_flops, tokens_per_layer, total_flops, xla_cost

BENCH_POOLING_CONFIG = {
    "model_type": "qwen2_audio",
    "audio_token_index": 4095,
    "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 80, "d_model": 128, "encoder_layers": 2,
                     "encoder_attention_heads": 2, "encoder_ffn_dim": 512, "max_source_positions": 1500},
    "text_config": {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 32,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 688,
                    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False},
}

INPUT_RETENTION = 0.786   # paper, input stage tau 0.8: 78.64 % of the audio tokens
DAP_RETENTION = 0.149     # paper, dap-aggressive: 14.91 % after both stages
GOALS = {"flops_ratio_max": 0.75, "ttft_speedup_min": 1.3, "memory_reduction_min": 1.7, "pool_vs_layer_max": 0.05,
         "flops_gap_max_points": 5.0}
PAPER_DAP_FLOPS = 0.7252
BUFFERS = ("bucket", "exact")
POOL_MODES = ("bucketed", "fixed")
METHODS = ("input", "deep", "dap")


def build_model(config: dict | None = None, seed: int = 0, dtype: str = "float32"):
    """A random Qwen2-Audio (default BENCH_POOLING_CONFIG) or Kimi-Audio model of an HF config."""
    config = config or BENCH_POOLING_CONFIG
    if model_type_of(config) == "kimi_audio":
        cfg = KimiAudioConfig.from_hf(config)
        return KimiAudio(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed)), cfg
    cfg = Qwen2AudioConfig.from_hf(config)
    return Qwen2Audio(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed)), cfg


def pooling_inputs(cfg, batch: int, audio_seconds: float = 30.0, text_tokens: int = 40, exact: bool = False,
                   seed: int = 0):
    """Identical-shape items: text tokens around one audio placeholder run (Kimi-Audio: an
    instruction, then the clip's windows, affjax.bench.kimi.inputs). `exact`: the sequence buffer is
    the valid length (no bucket padding); else the job path's bucket (shapes.bucket)."""
    if isinstance(cfg, KimiAudioConfig):
        return kimi.inputs(cfg, batch, audio_seconds, text_tokens, exact=exact, seed=seed)
    rng = np.random.default_rng(seed)
    frames = min(int(round(audio_seconds * 100)), cfg.audio.mel_frames)
    n_audio = int(cfg.audio.output_lengths(frames))
    vocab = cfg.text.vocab_size
    items = []
    for _ in range(batch):
        head = rng.integers(0, min(vocab, cfg.audio_token_id), text_tokens // 2)
        tail = rng.integers(0, min(vocab, cfg.audio_token_id), text_tokens - text_tokens // 2)
        ids = np.concatenate([head, np.full(n_audio, cfg.audio_token_id), tail]).astype(np.int32)
        feats = rng.standard_normal((1, cfg.audio.num_mel_bins, cfg.audio.mel_frames)).astype(np.float32)
        items.append(Encoded(ids, feats, np.array([frames], np.int32)))
    return collate(items, batch_size=batch, audio_token_id=cfg.audio_token_id, out_frames_of=cfg.audio.output_lengths,
                   seq_len=len(items[0].ids) if exact else None)


def method_stages(num_layers: int, name: str, input_retention: float = INPUT_RETENTION,
                  dap_retention: float = DAP_RETENTION) -> tuple[tuple[int, int], tuple[float, ...]]:
    """((layer, window) per stage, retention per stage relative to the tokens entering it)."""
    deep = num_layers - 3
    return {"input": (((0, 1),), (input_retention,)),
            "deep": (((deep, 3),), (dap_retention,)),
            "dap": (((0, 1), (deep, 3)), (input_retention, dap_retention / input_retention))}[name]


def method_label(num_layers: int, name: str) -> str:
    return f"deep@{num_layers - 3}" if name == "deep" else name


def methods(num_layers: int, input_retention: float = INPUT_RETENTION, dap_retention: float = DAP_RETENTION):
    """{name: (PoolingConfig, capacity)} of the fixed-capacity settings (deep stage at L - 3)."""
    out = {"unpooled": (PoolingConfig(()), None)}
    for m in METHODS:
        stages, rs = method_stages(num_layers, m, input_retention, dap_retention)
        out[method_label(num_layers, m)] = (PoolingConfig(tuple(Stage(l, 2.0, w) for l, w in stages)), rs)
    return out


def _median(fn, repeats: int) -> tuple[float, list[float]]:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs


def _tree_bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _peak_excl_params(program, cost: dict) -> int:
    """XLA's temp + output - aliased bytes plus the program's non-parameter arguments."""
    args = program.args
    params = args[0] if args and isinstance(args[0], nnx.State) else None
    other = [x for x in (args[1:] if params is not None else args)]
    arg_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(other))
    return int(cost["temp_bytes"] + cost["output_bytes"] - cost["alias_bytes"] + arg_bytes)


IN_PROGRAM_STAGES = 16  # stages chained in one program for the in-program stage time


def _stage_timing(engine, batch, retentions, deep_layer: int, repeats: int) -> list[dict]:
    """The pooling stage alone vs one decoder layer on the same buffer (both jitted, warm medians).

    The stage is timed as each mode runs it: bucketed mode calls it as its own program (threshold
    only, at full buffer), then the host reads the longest row and slices to its bucket; fixed-capacity
    mode runs it inside the one prefill program, timed here as ``IN_PROGRAM_STAGES`` chained stages
    in one program (each reads its input through the previous one's output, so XLA neither hoists
    nor overlaps them; an optimization barrier keeps every output alive), compiled with the prefill
    program's options. The fixed-capacity stage as a call of its own is reported too: it adds the
    per-call cost (dispatch, executor start) that the prefill never pays.
    """
    rin, rdap = retentions
    embed = engine.jitted("embed", embed_seq)
    layer = engine.jitted("group", run_layers, static=("start", "end", "extra", "proportional", "keep_cache"))
    seq = embed(engine.state, *engine.device_batch(batch))
    n0 = seq.x.shape[1]
    cap = lambda rs: min(n0, shapes.bucket(chained_capacity(batch.span, batch.valid, rs)[-1]))
    seq_in, _ = pool_program(seq, stage=Stage(0, 2.0, 1), positions="first", capacity=cap([rin]), retention=rin)
    cases = [("input (window 1)", seq, Stage(0, 2.0, 1), cap([rin]), rin),
             ("deep, after input (window 3)", seq_in, Stage(deep_layer, 2.0, 3), cap([rin, rdap / rin]), rdap / rin),
             ("deep alone (window 3)", seq, Stage(deep_layer, 2.0, 3), cap([rdap]), rdap)]
    rows = []
    for name, s, stage, cap, r in cases:
        def pool():
            jax.block_until_ready(pool_program(s, stage=stage, positions="first", capacity=cap, retention=r))

        def chained(seq):
            def body(_, c):
                out = pool_seq(dataclasses.replace(seq, x=seq.x + c), stage, "first", cap, r)
                out = jax.lax.optimization_barrier(out)  # every output is computed (no dead code)
                return out[0].x[0, 0, 0] * 0
            return jax.lax.fori_loop(0, IN_PROGRAM_STAGES, body, jnp.zeros((), seq.x.dtype))
        chained_jit = jax.jit(chained)  # the prefill program's (default) options

        def pool_in_program():
            jax.block_until_ready(chained_jit(s))

        def pool_threshold_only():  # bucketed mode: the stage's own program (threshold only), then the
            jax.block_until_ready(engine.pool_bucketed(s, stage))  # host's bucket pick and slice

        def one_layer():
            jax.block_until_ready(layer(engine.state, s, start=0, end=1, extra=0, proportional=False,
                                        keep_cache=True))
        fns = (pool, pool_in_program, pool_threshold_only, one_layer)
        scale = (1, IN_PROGRAM_STAGES, 1, 1)
        for f in fns:  # compile
            f()
        # round-robin, ratios per round: a slow spell of the shared machine hits all four alike
        runs = [[_median(f, 1)[0] / k for f, k in zip(fns, scale)] for _ in range(repeats)]
        med = lambda i: statistics.median(r[i] for r in runs)
        vs_layer = lambda i: statistics.median(r[i] / r[3] for r in runs)
        rows.append({"stage": name, "buffer": int(s.x.shape[1]), "pool_s": med(0), "pool_in_program_s": med(1),
                     "pool_threshold_only_s": med(2), "layer_s": med(3), "pool_vs_layer": vs_layer(0),
                     "pool_in_program_vs_layer": vs_layer(1), "pool_threshold_only_vs_layer": vs_layer(2)})
    return rows


# ----------------------------------------------------------------------------------------------
# tau calibration for the bucketed mode (own jitted functions: the engine's pieces and TRACES are
# left alone, so each engine's first call compiles what a job's would)


@functools.lru_cache(maxsize=None)
def _calib_fns(graphdef):
    def embed(state, *args):
        return embed_seq(nnx.merge(graphdef, state), *args)

    def group(state, seq, *, start, end):
        return run_layers(nnx.merge(graphdef, state), seq, start, end, 0, False, keep_cache=False)[0]

    def pool(seq, tau, *, stage, positions, capacity):  # as Engine.pool_bucketed's program computes it
        return pool_seq(seq, stage, positions, capacity, None, dots="reduce", tau=tau)

    return (jax.jit(embed), jax.jit(group, static_argnames=("start", "end")),
            jax.jit(pool, static_argnames=("stage", "positions", "capacity"), compiler_options=POOL_COMPILER_OPTIONS))


def _span_lengths(seq) -> list[np.ndarray]:
    span, valid = jax.device_get((seq.span, seq.valid))
    return [np.bincount(span[b][valid[b] & (span[b] > 0)]) for b in range(span.shape[0])]


def _calibrate_tau(pool, seq, stage_static, positions: str, target: int, iters: int = 40) -> tuple[float, int]:
    """A tau whose threshold rule leaves `target` audio tokens over the batch: the middle of the
    interval of taus that do (so float noise between programs cannot flip a decision), or the
    closest count when no tau gives it exactly. Returns (tau, audio tokens it leaves)."""
    def count(tau):
        _, st = pool(seq, np.float32(tau), stage=stage_static, positions=positions, capacity=seq.x.shape[1])
        return int(jax.device_get(st["audio_out"]).sum())

    def edge(pred):  # the tau where pred(count) turns False -> True, bracketed in [-1, 1.5]
        lo, hi = -1.0, 1.5
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if pred(count(mid)) else (mid, hi)
        return lo, hi
    a_lo, _ = edge(lambda c: c > target)    # count(a_lo) <= target: the largest such tau
    _, b_hi = edge(lambda c: c >= target)   # count(b_hi) >= target: the smallest such tau
    if b_hi < a_lo:                          # [b_hi, a_lo] keeps exactly target
        tau = 0.5 * (a_lo + b_hi)
    else:                                    # target skipped: the closer side
        tau = a_lo if target - count(a_lo) <= count(b_hi) - target else b_hi
    return float(tau), count(tau)


def calibrate_bucketed(engine_state, graphdef, batch, stages, retentions, positions: str = "first"):
    """Per-stage taus for the bucketed mode keeping max(1, ceil(r_k T)) of the T tokens each audio
    span has entering stage k (summed over the batch), with the engine's own buffers: the input
    buffer, then after each stage the bucket of the longest row. Returns [(tau, kept, target)]."""
    embed, group, pool = _calib_fns(graphdef)
    seq = embed(engine_state, *map(jnp.asarray, (batch.ids, batch.valid, batch.span, batch.audio_index,
                                                 batch.features, batch.feature_lengths)))
    out, layer = [], 0
    for (at, window), r in zip(stages, retentions):
        if at > layer:
            seq = group(engine_state, seq, start=layer, end=at)
            layer = at
        target = int(sum(retention_slots(n[1:], r).sum() for n in _span_lengths(seq)))
        static = Stage(at, 2.0, window).static
        tau, kept = _calibrate_tau(pool, seq, static, positions, target)
        out.append((tau, kept, target))
        seq, st = pool(seq, np.float32(tau), stage=static, positions=positions, capacity=seq.x.shape[1])
        n_max = int(jax.device_get(st["n_valid"]).max())
        seq = slice_seq(seq, min(shapes.bucket(max(n_max, 1)), seq.x.shape[1]))
    return out


# ----------------------------------------------------------------------------------------------
# the run


@functools.lru_cache(maxsize=None)
def _layer_fn(graphdef):
    def one_layer(state, seq):
        return run_layers(nnx.merge(graphdef, state), seq, 0, 1, 1, False, keep_cache=True)
    return jax.jit(one_layer)


_LAYER_FLOPS: dict = {}


def _layer_xla_flops(graphdef, state, n: int, d: int) -> float:
    """XLA's (loop-corrected) FLOPs of one decoder layer on one row of exactly n tokens."""
    if n not in _LAYER_FLOPS:
        s = lambda *shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt)
        seq = Seq(s(1, n, d), s(1, n, dt=bool), s(1, n), s(1, n), s(1, n, dt=jnp.int32), s(1, n, dt=jnp.int32))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        _LAYER_FLOPS[n] = xla_cost(_layer_fn(graphdef).lower(abstract, seq).compile())["flops"]
    return _LAYER_FLOPS[n]


def _engines(model, cfg, batch, methods_run, pool_modes, log):
    """{label: (Engine, calibration)}: unpooled first, then each method in each pooling mode."""
    L = cfg.text.layers
    engines = {"unpooled": (Engine(model), None)}
    for m in methods_run:
        stages, rs = method_stages(L, m)
        label = method_label(L, m)
        for mode in pool_modes:
            if mode == "fixed":
                pc = PoolingConfig(tuple(Stage(l, 2.0, w) for l, w in stages))
                engines[f"{label}/fixed"] = (Engine(model, pooling=pc, pool_mode="fixed", capacity=rs), None)
            else:
                probe = engines["unpooled"][0]
                cal = calibrate_bucketed(probe.state, probe.graphdef, batch, stages, rs)
                log(f"  {label}/bucketed: tau " + ", ".join(f"{t:.6f} (keeps {k} of target {g})" for t, k, g in cal))
                pc = PoolingConfig(tuple(Stage(l, t, w) for (l, w), (t, _, _) in zip(stages, cal)))
                engines[f"{label}/bucketed"] = (Engine(model, pooling=pc), [
                    {"tau": t, "audio_kept": k, "audio_target": g} for t, k, g in cal])
    return engines


def _measure_case(model, cfg, b, seconds, text_tokens, buffer, methods_run, pool_modes, repeats, stage_timing,
                  params_bytes, log):
    L = cfg.text.layers
    batch = pooling_inputs(cfg, b, seconds, text_tokens, exact=buffer == "exact")
    n_valid = int(batch.valid[0].sum())
    log(f"batch {b}, {seconds:g} s, buffer {buffer}: {n_valid} valid tokens per item in a "
        f"{batch.ids.shape[1]}-token buffer")
    engines = _engines(model, cfg, batch, methods_run, pool_modes, log)
    graphdef, state = engines["unpooled"][0].graphdef, engines["unpooled"][0].state
    rows = {}
    for name, (eng, cal) in engines.items():
        before = TRACES.copy()
        eng.record = True
        t0 = time.perf_counter()
        eng.generate(batch, 1)
        first = time.perf_counter() - t0
        programs = list(eng.programs)
        eng.record = False
        traces = {k: v - before.get(k, 0) for k, v in TRACES.items() if v != before.get(k, 0)}
        out = eng.prefill(batch, extra=1)
        stats = [jax.device_get(s) for s in out.stats]
        kv, li = [], 0
        for start, end in eng.groups:
            n = end - start
            kv.append({"layers": [start, end], "slots": int(out.caches[li][0].shape[1]) if n else 0,
                       "bytes": _tree_bytes(out.caches[li:li + n])})
            li += n
        del out
        costs = program_costs(programs)
        embed = program_costs(eng.unpooled_programs(batch, extra=1))["embed"]
        counts = [[int(batch.valid[i].sum())] + [int(s["n_valid"][i]) for s in stats] for i in range(b)]
        audio = [[int((batch.span[i] > 0).sum())] + [int(s["audio_out"][i]) for s in stats] for i in range(b)]
        per_layer = [tokens_per_layer(L, eng.pooling.stages, c) for c in counts]
        buffers = _buffers(eng, programs, batch)
        # a bucketed prefill runs its programs one after another while holding the KV caches of the
        # layer groups already run: each program's peak plus those caches
        kv_of = {f"layers[{g['layers'][0]}:{g['layers'][1]})": g["bytes"] for g in kv}
        peak_excl, held = 0, 0
        for p, c in zip(programs, costs.values()):
            peak_excl = max(peak_excl, _peak_excl_params(p, c) + held)
            held += kv_of.get(p.label, 0)
        rows[name] = {
            "pool_mode": eng.pool_mode if eng.pooling.stages else "-", "pooling": eng.pooling.to_text(),
            "capacity": list(eng.capacity) if isinstance(eng.capacity, tuple) else eng.capacity,
            "calibration": cal, "first_call_s": first, "compiles_first_call": traces,
            "programs_per_prefill": len(programs), "buffers": buffers,
            "programs": {k: dict(c) for k, c in costs.items()},
            "audio_tokens_per_stage": audio[0], "tokens_per_stage": counts[0],
            "audio_tokens_per_stage_rows": audio, "tokens_per_stage_rows": counts,
            "retention": sum(a[-1] for a in audio) / max(sum(a[0] for a in audio), 1),
            "forced_merges": [int(s["forced"].sum()) for s in stats],
            "analytic_lm_flops": analytic_lm_flops(cfg.text, per_layer),
            "xla_valid_layers_flops": sum(_layer_xla_flops(graphdef, state, n, cfg.text.hidden)
                                          for pl in per_layer for n in pl),
            "xla_lm_flops": lm_xla_flops(costs, embed["flops"]),
            "xla_lm_flops_raw": lm_xla_flops(costs, embed["flops_xla_raw"], key="flops_xla_raw"),
            "xla_total_flops": total_flops(costs),
            "peak_bytes": params_bytes + peak_excl, "peak_bytes_excl_params": peak_excl,
            "xla_program_peak_bytes": max(c.get("peak_bytes", 0) for c in costs.values()), "kv_cache": kv,
            "kv_cache_bytes": sum(g["bytes"] for g in kv),
        }
        log(f"  {name}: first call {first:.1f} s ({sum(traces.values())} compiles), buffers {buffers}, "
            f"audio {' -> '.join(map(str, audio[0]))}")
    # warm TTFT, round-robin over the engines: each round runs every engine once
    runs = {name: [] for name in engines}
    for _ in range(repeats):
        for name, (eng, _) in engines.items():
            t0 = time.perf_counter()
            eng.generate(batch, 1)
            runs[name].append(time.perf_counter() - t0)
    base = rows["unpooled"]
    base["ttft_runs_s"] = runs["unpooled"]
    base_med = statistics.median(runs["unpooled"])
    for name, r in rows.items():
        r["ttft_runs_s"] = runs[name]
        r["ttft_median_s"] = statistics.median(runs[name])
        r["compile_s"] = r["first_call_s"] - r["ttft_median_s"]
        r["flops_ratio_analytic"] = r["analytic_lm_flops"] / base["analytic_lm_flops"]
        r["flops_ratio_xla"] = r["xla_lm_flops"] / base["xla_lm_flops"]
        r["flops_ratio_xla_raw"] = r["xla_lm_flops_raw"] / base["xla_lm_flops_raw"]
        r["flops_ratio_xla_valid"] = r["xla_valid_layers_flops"] / base["xla_valid_layers_flops"]
        r["flops_gap_points"] = 100 * (r["flops_ratio_xla"] - r["flops_ratio_analytic"])
        r["flops_gap_counting_points"] = 100 * (r["flops_ratio_xla_valid"] - r["flops_ratio_analytic"])
        r["flops_gap_padding_points"] = 100 * (r["flops_ratio_xla"] - r["flops_ratio_xla_valid"])
        r["ttft_speedup"] = base_med / r["ttft_median_s"]
        r["ttft_speedup_per_round_median"] = statistics.median(u / t for u, t in zip(runs["unpooled"], runs[name]))
        r["memory_reduction"] = base["peak_bytes"] / r["peak_bytes"]
        r["memory_reduction_excl_params"] = base["peak_bytes_excl_params"] / r["peak_bytes_excl_params"]
        r["kv_reduction"] = base["kv_cache_bytes"] / r["kv_cache_bytes"]
    case = {"batch": b, "audio_seconds": seconds, "sequence_buffer": buffer, "valid_tokens": n_valid,
            "buffer": int(batch.ids.shape[1]), "methods": rows}
    dap = engines.get("dap/fixed", (None,))[0]
    if stage_timing and dap is not None:
        case["pool_stage_timing"] = _stage_timing(dap, batch, (INPUT_RETENTION, DAP_RETENTION),
                                                  dap.pooling.stages[-1].layer, max(20, 3 * repeats))
    return case


def _buffers(eng, programs, batch) -> list[int]:
    """The sequence buffer of each (non-empty) layer group as the prefill ran it: the input buffer
    before the first stage, then each stage's (bucketed: the sliced bucket; fixed: the cap's bucket)."""
    if eng.pool_mode == "fixed" and eng.pooling.stages:
        T = int(batch.ids.shape[1])
        need = chained_capacity(batch.span, batch.valid, eng.capacity)
        per_group = [T] + [min(int(shapes.bucket(int(c))), T) for c in need]
        return [n for n, (start, end) in zip(per_group, eng.groups) if end > start]
    return [int(p.args[1].x.shape[1]) for p in programs if p.label.startswith("layers[")]


def grid_report(lengths: dict[str, tuple[int, int]], grid_name: str = "32") -> dict:
    """The bucket grid in force and the buckets a job over these length ranges can hit (compiles
    per piece), beside the same counts for the other grids of shapes.SEQ_GRIDS."""
    others = {k: shapes._grid(shapes.SEQ_MIN, g) for k, g in shapes.SEQ_GRIDS.items() if k != grid_name}
    return {"name": grid_name, "grid": [list(g) for g in shapes.SEQ_GRIDS[grid_name]], "first_bucket": shapes.SEQ_MIN,
            "buckets": len(shapes.SEQ_BUCKETS),
            "buckets_up_to_fine_end": sum(1 for x in shapes.SEQ_BUCKETS if x <= shapes.FINE_UP_TO),
            "fine_up_to": shapes.FINE_UP_TO,
            "ranges": {k: {"tokens": list(v), "buckets": shapes.buckets_between(*v),
                           **{f"buckets_grid_{name}": shapes.buckets_between(*v, buckets=b)
                              for name, b in others.items()}}
                       for k, v in lengths.items()}}


def run_bench_pooling(batches=(1,), repeats=5, audio_seconds=(30.0,), text_tokens=40, buffers=BUFFERS,
                      methods_run=METHODS, pool_modes=POOL_MODES, stage_timing=None, config: dict | None = None,
                      log=print, command: str | None = None, seq_grid: str = "32", on_case=None,
                      done: list | None = None, dtype: str = "float32") -> dict:
    """The bench (see the module docstring). `seq_grid`: a key of shapes.SEQ_GRIDS; another than
    the policy's own ("32") runs the whole bench under that grid (shapes.seq_grid). `on_case(res)`
    is called after each case with the results so far (``res["partial"]`` True); `done`: cases of an
    interrupted run of the same settings, kept and not measured again (--resume). `config`: an HF
    config dict (default BENCH_POOLING_CONFIG; `--ckpt-config qwen2-audio-7b` gives the real geometry
    for an accelerator), random weights in `dtype`."""
    with shapes.seq_grid(shapes.SEQ_GRIDS[seq_grid]):
        return _run(batches, repeats, audio_seconds, text_tokens, buffers, methods_run, pool_modes, stage_timing,
                    config, log, command, seq_grid, on_case, done or [], dtype)


def _run(batches, repeats, audio_seconds, text_tokens, buffers, methods_run, pool_modes, stage_timing, config, log,
         command, seq_grid, on_case=None, done=(), dtype="float32") -> dict:
    if isinstance(audio_seconds, (int, float)):
        audio_seconds = (float(audio_seconds),)
    stage_timing = len(audio_seconds) == 1 if stage_timing is None else stage_timing
    model, cfg = build_model(config, dtype=dtype)
    L = cfg.text.layers
    params_bytes = _tree_bytes(nnx.state(model))
    res = {"command": command,
           "config": f"text d{cfg.text.hidden} x {L} layers ({cfg.text.heads} heads, kv {cfg.text.kv_heads}, "
                     f"mlp {cfg.text.intermediate}, vocab {cfg.text.vocab_size}), audio d{cfg.audio.d_model} x "
                     f"{cfg.audio.layers}; random weights, {dtype}",
           "params_bytes": params_bytes, "audio_seconds": list(audio_seconds), "text_tokens": text_tokens,
           "repeats": repeats, "sequence_buffers": list(buffers), "pool_modes": list(pool_modes),
           "methods": [method_label(L, m) for m in methods_run],
           "retention_driver": {"fixed": "tau=2 (no natural merges) + per-stage retention cap (overflow rule)",
                                "bucketed": "per-stage tau calibrated on the inputs to keep the same ceil(r T) "
                                            "tokens per span (threshold rule, exact semantics)"},
           "retentions": {method_label(L, m): list(method_stages(L, m)[1]) for m in methods_run},
           "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "device": str(jax.devices()[0]), "jax": jax.__version__, "goals": GOALS,
           "paper_dap_flops_ratio": PAPER_DAP_FLOPS, "cases": []}
    t_run = time.perf_counter()
    traces0 = TRACES.copy()
    for b in batches:
        for s in audio_seconds:
            for buf in buffers:
                kept = [c for c in done if (c["batch"], c["audio_seconds"], c["sequence_buffer"]) == (b, s, buf)]
                if kept:
                    log(f"batch {b}, {s:g} s, buffer {buf}: kept from the interrupted run")
                    res["cases"].append(kept[0])
                    continue
                res["cases"].append(_measure_case(model, cfg, b, s, text_tokens, buf, methods_run, pool_modes,
                                                  repeats, stage_timing, params_bytes, log))
                if on_case is not None:
                    on_case({**res, "partial": True})
    res["wall_s"] = time.perf_counter() - t_run
    res["compiles_total"] = {k: v - traces0.get(k, 0) for k, v in TRACES.items() if v != traces0.get(k, 0)}
    ranges = {}
    for label in ["unpooled"] + [f"{method_label(L, m)}/{pm}" for m in methods_run for pm in pool_modes]:
        valid = [c["methods"][label]["tokens_per_stage"] for c in res["cases"] if label in c["methods"]]
        for k in range(len(valid[0]) if valid else 0):
            ranges[f"{label} layer group {k}"] = (min(v[k] for v in valid), max(v[k] for v in valid))
    res["grid"] = grid_report(ranges, seq_grid)
    return res


# ----------------------------------------------------------------------------------------------
# report


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def format_case(r: dict, c: dict) -> list[str]:
    lines = [f"### batch {c['batch']}, {c['audio_seconds']:g} s audio, buffer policy `{c['sequence_buffer']}` "
             f"({c['valid_tokens']} valid tokens per item, input buffer {c['buffer']})", "",
             "| method | buffers per layer group | audio tokens per stage | LM FLOPs analytic | XLA at valid lengths "
             "| XLA realized (raw) | gap, points (counting + padding) | TTFT s | TTFT speed-up, per-round median "
             "(of medians) | compiles, first call | peak MiB excl. params (with) | peak reduction excl. params "
             "(with) | KV MiB per layer group |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in c["methods"].items():
        kv = " + ".join(f"{_mb(g['bytes'])} [{g['layers'][0]}:{g['layers'][1]})" for g in m["kv_cache"]
                        if g["layers"][1] > g["layers"][0])
        lines.append(
            f"| {name} | {' / '.join(map(str, m['buffers']))} "
            f"| {' -> '.join(map(str, m['audio_tokens_per_stage']))} ({100 * m['retention']:.1f} %) "
            f"| {_pct(m['flops_ratio_analytic'])} | {_pct(m['flops_ratio_xla_valid'])} "
            f"| {_pct(m['flops_ratio_xla'])} ({_pct(m['flops_ratio_xla_raw'])}) "
            f"| {m['flops_gap_points']:+.1f} ({m['flops_gap_counting_points']:+.1f} "
            f"{m['flops_gap_padding_points']:+.1f}) "
            f"| {m['ttft_median_s']:.3f} | {m['ttft_speedup_per_round_median']:.2f}x ({m['ttft_speedup']:.2f}x) "
            f"| {sum(m['compiles_first_call'].values())} | {_mb(m['peak_bytes_excl_params'])} ({_mb(m['peak_bytes'])}) "
            f"| {m['memory_reduction_excl_params']:.2f}x ({m['memory_reduction']:.2f}x) | {kv} |")
    if c.get("pool_stage_timing"):
        lines += ["", "| pooling stage | buffer | bucketed: own call, threshold only ms | / layer "
                  "| fixed cap: in the prefill program ms | / layer | fixed cap: own call ms | / layer "
                  "| one decoder layer ms |", "|---|---|---|---|---|---|---|---|---|"]
        for s in c["pool_stage_timing"]:
            lines.append(f"| {s['stage']} | {s['buffer']} | {1e3 * s['pool_threshold_only_s']:.2f} "
                         f"| {100 * s['pool_threshold_only_vs_layer']:.1f} % | {1e3 * s['pool_in_program_s']:.2f} "
                         f"| {100 * s['pool_in_program_vs_layer']:.1f} % | {1e3 * s['pool_s']:.2f} "
                         f"| {100 * s['pool_vs_layer']:.1f} % | {1e3 * s['layer_s']:.2f} |")
    return lines + [""]


def format_sweep(r: dict, method: str) -> list[str]:
    """Realized vs analytic FLOPs at each audio length, per buffer policy and pooling mode."""
    modes = [pm for pm in r["pool_modes"] if any(f"{method}/{pm}" in c["methods"] for c in r["cases"])]
    head = ("| batch | audio s | valid tokens | buffer policy | LM FLOPs analytic | XLA at valid lengths | "
            + " | ".join(f"{pm}: buffers | {pm}: XLA realized (gap, points) | {pm}: TTFT speed-up "
                         f"| {pm}: peak reduction excl. params" for pm in modes) + " |")
    lines = [f"{method} vs unpooled, like for like (same buffer policy on both sides); gap = realized - analytic; "
             "buffers = unpooled -> pooled, per layer group", "", head, "|" + "---|" * (6 + 4 * len(modes))]
    for c in r["cases"]:
        ms = c["methods"]
        if not any(f"{method}/{pm}" in ms for pm in modes):
            continue
        row = f"| {c['batch']} | {c['audio_seconds']:g} | {c['valid_tokens']} | {c['sequence_buffer']} "
        row += (f"| {_pct(ms[f'{method}/{modes[0]}']['flops_ratio_analytic'])} "
                f"| {_pct(ms[f'{method}/{modes[0]}']['flops_ratio_xla_valid'])} ")
        for pm in modes:
            m = ms[f"{method}/{pm}"]
            row += (f"| {' / '.join(map(str, ms['unpooled']['buffers']))} -> {' / '.join(map(str, m['buffers']))} "
                    f"| {_pct(m['flops_ratio_xla'])} ({m['flops_gap_points']:+.1f}) "
                    f"| {m['ttft_speedup_per_round_median']:.2f}x | {m['memory_reduction_excl_params']:.2f}x ")
        lines.append(row + "|")
    return lines + [""]


def goal_checks(r: dict, method: str = "dap") -> list[tuple[str, str, bool]]:
    g = r["goals"]
    rows = [(c, name, m) for c in r["cases"] for name, m in c["methods"].items() if name.startswith(method + "/")]
    if not rows:
        return []
    span = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"
    gaps = [m["flops_gap_points"] for _, _, m in rows]
    flops = [max(m["flops_ratio_analytic"], m["flops_ratio_xla"]) for _, _, m in rows]
    ttft = [m["ttft_speedup_per_round_median"] for _, _, m in rows]
    mem = [m["memory_reduction_excl_params"] for _, _, m in rows]
    worst_gap = max(rows, key=lambda x: abs(x[2]["flops_gap_points"]))
    out = [
        (f"realized LM FLOPs within {g['flops_gap_max_points']:.0f} points of analytic (every case)",
         f"gap {min(gaps):+.1f} to {max(gaps):+.1f} points (worst: {worst_gap[1]}, {worst_gap[0]['audio_seconds']:g} s, "
         f"{worst_gap[0]['sequence_buffer']})", max(abs(x) for x in gaps) <= g["flops_gap_max_points"]),
        (f"{method} LM FLOPs <= {100 * g['flops_ratio_max']:.0f} % (analytic and XLA; paper theory "
         f"{100 * r['paper_dap_flops_ratio']:.2f} %)", f"worst {100 * max(flops):.1f} %", max(flops) <= g["flops_ratio_max"]),
        (f"TTFT >= {g['ttft_speedup_min']}x faster (per-round median)", f"{span(ttft)}x",
         min(ttft) >= g["ttft_speedup_min"]),
        (f"peak prefill memory >= {g['memory_reduction_min']}x lower (without params)", f"{span(mem)}x",
         min(mem) >= g["memory_reduction_min"]),
    ]
    timing = [s for c in r["cases"] for s in c.get("pool_stage_timing", [])]
    if timing:
        worst = max(max(s["pool_threshold_only_vs_layer"], s["pool_in_program_vs_layer"]) for s in timing)
        out.append((f"pooling stage < {100 * g['pool_vs_layer_max']:.0f} % of a decoder layer",
                    f"worst {100 * worst:.1f} % (each mode as its jobs run it)", worst < g["pool_vs_layer_max"]))
    return out


def format_bench_pooling(r: dict) -> str:
    gr = r["grid"]
    lines = [f"pooling bench: {r['config']}; audio {', '.join(f'{s:g}' for s in r['audio_seconds'])} s + "
             f"{r['text_tokens']} text tokens; buffer policies: {', '.join(r['sequence_buffers'])}; pooling modes: "
             f"{', '.join(r['pool_modes'])}; TTFT: {r['repeats']} rounds (round-robin); {r['device']}, jax {r['jax']}",
             f"retention: fixed: {r['retention_driver']['fixed']}; bucketed: {r['retention_driver']['bucketed']}",
             f"bucket grid `{gr.get('name', '32')}` (affjax.runtime.shapes.SEQ_GRIDS): from {gr['first_bucket']}, (up to, step) "
             f"{', '.join(f'({a}, {b})' for a, b in gr['grid'])}: {gr['buckets']} buckets, "
             f"{gr['buckets_up_to_fine_end']} up to {gr['fine_up_to']}", ""]
    for c in r["cases"]:
        lines += format_case(r, c)
    for method in r["methods"]:
        lines += format_sweep(r, method)
    others = [k[len("buckets_grid_"):] for k in next(iter(gr["ranges"].values()), {}) if k.startswith("buckets_grid_")]
    lines += [f"| buckets a job can hit (= compiles per piece) | valid tokens | this grid ({gr.get('name', '32')}) | "
              + " | ".join(f"grid {o}" for o in others) + " |", "|---|---|---|" + "---|" * len(others)]
    for k, v in gr["ranges"].items():
        lines.append(f"| {k} | {v['tokens'][0]}-{v['tokens'][1]} | {v['buckets']} | "
                     + " | ".join(str(v[f"buckets_grid_{o}"]) for o in others) + " |")
    lines += ["", f"compiles in this run: {sum(r['compiles_total'].values())} "
              f"({', '.join(f'{k} {v}' for k, v in sorted(r['compiles_total'].items()))}); wall {r['wall_s']:.0f} s", ""]
    for method in r["methods"]:
        checks = goal_checks(r, method)
        if checks:
            lines += [f"| goal ({method} vs unpooled, every case and pooling mode) | measured | met |", "|---|---|---|"]
            lines += [f"| {a} | {m} | {'yes' if ok else 'no'} |" for a, m, ok in checks]
            lines.append("")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--repeats", type=int, default=5, help="TTFT rounds (every engine once per round); medians")
    p.add_argument("--audio-seconds", type=float, nargs="+", default=[30.0],
                   help="one or several audio lengths (a sweep: 5 10 15 20 25 30)")
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--buffers", nargs="+", choices=BUFFERS, default=list(BUFFERS),
                   help="input buffer policy, the same on both sides: bucket (the job path) and/or exact")
    p.add_argument("--exact-length", action="store_true", help="same as --buffers exact")
    p.add_argument("--pool-modes", nargs="+", choices=POOL_MODES, default=list(POOL_MODES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--stage-timing", action=argparse.BooleanOptionalAction, default=None,
                   help="time the pooling stage against one decoder layer (default: with one audio length)")
    p.add_argument("--seq-grid", default="32", choices=("32", "16", "old"),
                   help="sequence bucket grid (affjax.runtime.shapes.SEQ_GRIDS): 32 = the policy in force; 16 per octave "
                        "and the old grid to compare")
    p.add_argument("--out", default=None, help="write the results as JSON here (also after each case)")
    p.add_argument("--show", default=None, metavar="JSON", help="print the tables of a saved run (no bench)")
    p.add_argument("--ckpt-config", default=None, metavar="CONFIG",
                   help="model geometry: 'qwen2-audio-7b', 'qwen2-audio-tiny', an HF config.json or a checkpoint folder "
                        "(random weights); default: the bench's own 32-layer narrow model, sized for a CPU")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter and compute dtype")
    p.add_argument("--model", default="qwen2-audio", choices=("qwen2-audio", "kimi-audio"),
                   help="without --ckpt-config: the bench's narrow Qwen2-Audio (32 layers) or Kimi-Audio-shaped "
                        "model (28 layers, 12.5 Hz audio tokens: affjax.bench.kimi.POOLING_CONFIG)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cases of an interrupted run of the same command found in --out")


def _settings_key(args, seconds, buffers) -> dict:
    """What a run measures (all but --out/--resume/--show): a resumed run must match it."""
    return {"batch": list(args.batch), "repeats": args.repeats, "audio_seconds": [float(x) for x in seconds],
            "text_tokens": args.text_tokens, "buffers": list(buffers),
            "methods": list(getattr(args, "methods", METHODS)), "pool_modes": list(getattr(args, "pool_modes", POOL_MODES)),
            "stage_timing": getattr(args, "stage_timing", None), "seq_grid": getattr(args, "seq_grid", "32"),
            "ckpt_config": getattr(args, "ckpt_config", None), "dtype": getattr(args, "dtype", "float32"),
            "model": getattr(args, "model", "qwen2-audio")}


def main_bench_pooling(args) -> int:
    if getattr(args, "show", None):
        with open(args.show) as f:
            r = json.load(f)
        print(f"command: {r.get('command')}\n")
        print(format_bench_pooling(r))
        return 0
    seconds = args.audio_seconds if isinstance(args.audio_seconds, (list, tuple)) else [args.audio_seconds]
    buffers = ["exact"] if args.exact_length else getattr(args, "buffers", list(BUFFERS))
    done, settings = [], _settings_key(args, seconds, buffers)
    config = load_hf_config(args.ckpt_config) if getattr(args, "ckpt_config", None) else None
    if config is None and getattr(args, "model", "qwen2-audio") == "kimi-audio":
        config = kimi.POOLING_CONFIG
    if getattr(args, "resume", False) and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        if old.get("partial") and old.get("settings") == settings:
            done = old["cases"]

    def save(res):
        with open(args.out, "w") as f:
            json.dump({**res, "settings": settings}, f, indent=1)
    r = run_bench_pooling(tuple(args.batch), args.repeats, tuple(seconds), args.text_tokens, tuple(buffers),
                          tuple(getattr(args, "methods", METHODS)), tuple(getattr(args, "pool_modes", POOL_MODES)),
                          getattr(args, "stage_timing", None), log=lambda s: print(s, flush=True),
                          command=" ".join(["affjax" if sys.argv[0].endswith("affjax") else
                                            "python -m affjax.bench.pooling"] + sys.argv[1:]),
                          seq_grid=getattr(args, "seq_grid", "32"), on_case=save if args.out else None, done=done,
                          config=config, dtype=getattr(args, "dtype", "float32"))
    print(format_bench_pooling(r))
    if args.out:
        save(r)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m affjax.bench.pooling", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main_bench_pooling(parser.parse_args()))
