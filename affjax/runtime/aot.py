"""Every program of a speech-LM job (Qwen2-Audio, Kimi-Audio) compiled for a real TPU topology, on a
machine without a TPU.

The `libtpu` wheel (`pip install -e ".[tpu]"`) gives compile-only TPU devices through
`jax.experimental.topologies`: nothing can be placed on them, but `jit(...).lower(abstract sharded
inputs).compile()` runs the real TPU compiler. So a plan made here is the TPU compiler's own:
per-chip peak memory (`memory_analysis().peak_memory_in_bytes`: HBM plus what it places in on-chip
VMEM, VMEM_NOTE; an HBM overflow is a compile error, reported as "does not fit"), FLOPs, and the
collectives it inserted.

What is compiled (`job_programs`), as a job runs it in fixed-capacity mode (one buffer size per
stage, from the retention cap, as `affjax score/generate --pool-mode fixed` does):
  embed              the audio encoder + projector + token embedding (`engine.embed_seq`)
  pool@L             each pooling stage, at its capacity (`engine.pool_seq`)
  layers[a:b)        each layer group between two stages (`engine.run_layers`), KV caches kept
  last_head          the next-token logits of the prompt's last position
  score_head         the continuation's log-probabilities (scoring jobs)
  decode             the greedy loop (`lax.while_loop`, every layer, the KV caches carried)
Inputs and parameters are `ShapeDtypeStruct`s sharded by the logical-axis table
(affjax.runtime.sharding); each program's outputs are compiled with the shardings the compiler
chose and feed the next program, as the arrays of a real run would.

Depth (`depth="full"`, the default): every program at the model's real depth, one compile each
(a whole 7B job: 1-6 minutes on 2 cores, docs/tpu.md). `depth="two-point"` compiles every group with one layer and with
two and extrapolates each figure v to the group's n layers:
    v(n) = v(1) + (n - 1) x (v(2) - v(1))
(n = the group's layers for `layers[a:b)`, the encoder's for `embed`; the decode loop, which runs
every group at its own cache length, takes one more compile per group, that group at two layers and
the others at one: v(1) + sum over groups of (n_g - 1) x (v_g - v(1))). FLOPs and bytes moved are
linear in depth, so they come out exact; the peak is not, at full size: the compiler's peak counts
on-chip VMEM (VMEM_NOTE), whose share changes from one to two layers, and the rule multiplies that
change by n - 1 (Kimi-Audio-7B's decode loop: 747 MiB of own bytes by the rule, 158 compiled whole).
`tests/test_aot.py` checks the rule against the full depth on tiny configs, where it holds.

Also here: `max_batch` (the largest batch that fits per chip, by compiling) and `whisper_plan`
(Whisper transcription's two programs, data parallel, and its real-time factor by the roofline).

Loops. TPU HLO carries no `known_trip_count`, so XLA's cost analysis counts a `while` body once;
`affjax.runtime.flops.loop_corrected_flops` takes the trip count from the loop's condition (an
induction variable compared with a constant), which gives the decode loop's bound (max_new_tokens).

JAX is imported inside the functions: `prepare_env` must run before it is (JAX reads JAX_PLATFORMS
on import, libtpu its TPU_* variables when the backends start).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

GiB = 1 << 30

# Published per-chip figures: HBM bytes, peak bf16 FLOP/s, HBM bandwidth (bytes/s).
CHIPS: dict[str, dict] = {
    "v4": {"hbm": 32 * GiB, "flops": 275e12, "hbm_bw": 1.2e12},
    "v5e": {"hbm": 16 * GiB, "flops": 197e12, "hbm_bw": 0.819e12},
    "v5p": {"hbm": 95 * GiB, "flops": 459e12, "hbm_bw": 2.765e12},
    "v6e": {"hbm": 32 * GiB, "flops": 918e12, "hbm_bw": 1.64e12},
}
# Cloud TPU slice names -> the topology names `get_topology_desc` accepts
ALIASES: dict[str, str] = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4",
    "v5litepod-4": "v5e:2x2", "v5litepod-8": "v5e:2x4", "v5litepod-16": "v5e:4x4",
    "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+x\d+(x\d+)?)$")
# What the compiler's peak counts (shown with a 32 MiB weight read twice: peak = 2 x the argument, and
# = the argument once the on-chip memory is capped at 16 MiB; tests/test_aot.py).
VMEM_NOTE = ("the compiler's peak counts the buffers it places in the chip's on-chip vector memory (VMEM: "
             "weights prefetched whole, a short program's activations) as well as HBM, so a program's figure can "
             "exceed its HBM use by up to the VMEM size (128 MiB on v5e); --vmem-mib 16 caps that share")
INSTALL = 'pip install -e ".[tpu]"   (the libtpu wheel jax[tpu] pins; compile-only, no TPU needed)'


class AotError(ValueError):
    pass


def canonical_topology(name: str) -> str:
    """'v5e-8' or 'v5e:2x4' -> 'v5e:2x4'; anything else is refused with the accepted forms."""
    name = ALIASES.get(name, name)
    if not _TOPOLOGY.match(name):
        raise AotError(f"unknown TPU topology {name!r}: give CHIP:AxB[xC] with CHIP in {', '.join(CHIPS)} "
                       f"(e.g. v5e:2x4, v4:2x2x1) or a slice name ({', '.join(sorted(ALIASES))})")
    return name


# JAX devices per chip in the compile-only topologies: v4's give one device per TensorCore (v4:2x2x1
# is 8 devices for 4 chips, no megacore), each with half the chip's HBM, FLOP/s and bandwidth.
DEVICES_PER_CHIP = {"v4": 2}


def chip(topology: str) -> dict:
    """The published figures of one JAX device of `topology` (a chip, or half a v4 chip)."""
    name = canonical_topology(topology).split(":")[0]
    k = DEVICES_PER_CHIP.get(name, 1)
    return {key: v // k if key == "hbm" else v / k for key, v in CHIPS[name].items()}


def prepare_env(vmem_mib: int | None = None) -> None:
    """Before JAX starts: keep the host on CPU and tell libtpu it is not on a TPU VM (it would
    otherwise probe for one and print errors). `vmem_mib`: the on-chip vector memory (VMEM) the
    compiler may place buffers in (default: the chip's own, 128 MiB on v5e); see VMEM_NOTE."""
    if vmem_mib is not None:
        if vmem_mib <= 0:
            raise AotError(f"--vmem-mib must be positive, got {vmem_mib}")
        flags = os.environ.get("LIBTPU_INIT_ARGS", "")
        os.environ["LIBTPU_INIT_ARGS"] = f"{flags} --xla_tpu_override_vmem_size_kib={int(vmem_mib) * 1024}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compile-only processes at once


def libtpu_missing() -> str | None:
    """None when the TPU compiler is installed, else how to install it."""
    if importlib.util.find_spec("libtpu") is None:
        return f"the TPU compiler (libtpu) is not installed: {INSTALL}"
    return None


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU topology (one per chip)."""
    why = libtpu_missing()
    if why:
        raise AotError(why)
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(topology_name=canonical_topology(topology), platform="tpu").devices)


def tpu_mesh(topology: str, mesh_text: str | None = None):
    """A ("data", "model") mesh over a topology's compile-only devices (`parse_mesh` text)."""
    from jax.sharding import AxisType, Mesh

    from affjax.runtime.sharding import AXES, parse_mesh
    devices = topology_devices(topology)
    sizes = parse_mesh(mesh_text, len(devices))
    grid = np.array(devices, dtype=object).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


# ----------------------------------------------------------------------------------------------
# what one compiled program shows


_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute|"
                         r"ragged-all-to-all)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def _array_bytes(text: str) -> int:
    """Bytes of the last array type in `text` (an async start's tuple ends with its output)."""
    found = _ARRAY.findall(text)
    if not found:
        return 0
    dtype, dims = found[-1]
    return _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)


def collectives(hlo_text: str) -> dict[str, dict]:
    """{kind: {"count", "bytes"}} of the collectives in a compiled program's HLO (static count: a
    collective inside a loop body is counted once, like the body itself)."""
    out: dict[str, dict] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        c = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        c["count"] += 1
        c["bytes"] += _array_bytes(m.group(1))
    return out


def is_hbm_overflow(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


@dataclasses.dataclass
class ProgramReport:
    label: str
    fits: bool
    peak_bytes: int | None = None      # per chip, the compiler's peak (None when it did not fit)
    argument_bytes: int | None = None  # per chip: the parameters the program uses + its inputs
    input_bytes: int | None = None     # per chip: its inputs that are not parameters (activations, caches)
    flops: float | None = None          # per chip, loops counted trip-count times
    flops_raw: float | None = None      # XLA's own figure (loop bodies once)
    bytes_accessed: float | None = None # per chip, HBM bytes read + written by the ops, loops counted likewise
    loops: int = 0
    collectives: dict = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0
    layers: tuple[int, int] | None = None   # (compiled, full) layer count of the program's model part
    error: str | None = None

    def own_bytes(self) -> int | None:
        """What the program holds beyond the parameters it reads: activations, caches, temporaries."""
        return None if self.peak_bytes is None else self.peak_bytes - self.argument_bytes + self.input_bytes

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compile_program(label: str, jitted, args: tuple, kwargs: dict, mesh, *, dump_dir: str | None = None):
    """Lower and compile one program for the mesh's TPU devices -> (ProgramReport, compiled or None)."""
    import jax

    from affjax.runtime.flops import loop_corrected_cost
    t0 = time.perf_counter()
    # compile-only devices cannot load an executable back: the persistent cache would only write
    # entries that every later read fails on
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*args, **kwargs).compile()
    except Exception as e:  # the compiler's own verdict: HBM overflow, or a real error
        if is_hbm_overflow(e):
            return ProgramReport(label, fits=False, compile_seconds=time.perf_counter() - t0,
                                 error=str(e).splitlines()[0][:300]), None
        raise
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    text = compiled.as_text()
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / f"{re.sub(r'[^A-Za-z0-9_.@-]+', '_', label)}.hlo.txt").write_text(text)
    flops, raw, loops = loop_corrected_cost(compiled, "flops")
    moved, _, _ = loop_corrected_cost(compiled, "bytes accessed")
    mem = compiled.memory_analysis()
    return ProgramReport(label, fits=True, peak_bytes=int(mem.peak_memory_in_bytes),
                         argument_bytes=int(mem.argument_size_in_bytes), flops=flops, flops_raw=raw, loops=loops,
                         bytes_accessed=moved, collectives=collectives(text),
                         compile_seconds=time.perf_counter() - t0), compiled


def chip_bytes(tree) -> int:
    """Per-chip bytes of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "sharding") and x.sharding is not None))


# ----------------------------------------------------------------------------------------------
# abstract, sharded parameters and inputs


def _is_kimi(hf_config: dict) -> bool:
    from affjax.models.checkpoint import model_type_of
    return model_type_of(hf_config) == "kimi_audio"


def _depth_keys(hf_config: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Where a config keeps its decoder's and its audio encoder's layer counts: Kimi-Audio's
    config.json is the decoder's own, with the Whisper config embedded (kimi_audio.params.read_config)."""
    if _is_kimi(hf_config):
        return ("num_hidden_layers",), ("whisper_config", "encoder_layers")
    return ("text_config", "num_hidden_layers"), ("audio_config", "encoder_layers")


def _get(d: dict, keys: tuple[str, ...]):
    for k in keys:
        d = d[k]
    return d


def layer_counts(hf_config: dict) -> tuple[int, int]:
    """(decoder layers, audio encoder layers) of a Qwen2-Audio or Kimi-Audio config."""
    return tuple(int(_get(hf_config, k)) for k in _depth_keys(hf_config))


def abstract_model(hf_config: dict, dtype: str, mesh, *, text_layers: int | None = None,
                   audio_layers: int | None = None):
    """(graphdef, sharded abstract state, cfg) of a Qwen2-Audio or Kimi-Audio model built from shapes
    only; with `text_layers` / `audio_layers` a shallower model of the same widths (see module
    docstring), which for Kimi-Audio also leaves out the MIMO layers (no job program runs them)."""
    import copy

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from affjax.models.checkpoint import get_spec, model_type_of
    from affjax.runtime.sharding import param_sharding

    hf = copy.deepcopy(hf_config)
    text_keys, audio_keys = _depth_keys(hf)
    for keys, n in ((text_keys, text_layers), (audio_keys, audio_layers)):
        if n is not None:
            _get(hf, keys[:-1])[keys[-1]] = n
    if text_layers is not None and _is_kimi(hf):
        hf.update(kimia_mimo_layers=0, kimia_mimo_transformer_from_layer_index=0)
    spec = get_spec(model_type_of(hf))
    cfg = spec.config_from_hf(hf)
    graphdef, state = nnx.split(spec.abstract_model(cfg, jnp.dtype(dtype)))
    pure = nnx.to_pure_dict(state)
    shard = param_sharding(mesh, cfg)  # the table that places a restored checkpoint

    def place(path, x):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard(keys, x))
    return graphdef, jax.tree_util.tree_map_with_path(place, pure), cfg


def _rows(mesh, shape, dtype):
    """An input whose first axis is the batch: rows over the data axis, as `sharding.put_rows`."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    spec = PartitionSpec("data") if shape[0] % mesh.shape["data"] == 0 else PartitionSpec()
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _like(out_info, compiled):
    """A program's outputs as the next program's abstract inputs, with the compiler's shardings."""
    import jax
    return jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), out_info,
                        compiled.output_shardings)


# ----------------------------------------------------------------------------------------------
# the job's programs


@dataclasses.dataclass(frozen=True)
class JobShape:
    """What a job feeds the model: `batch` rows, each one clip of `audio_seconds` and `text_tokens`
    prompt tokens around it. Qwen2-Audio takes one 30 s window (longer clips are cut); Kimi-Audio
    ceil(audio_seconds / 30) windows, each padded to 30 s as the feature extractor does."""
    batch: int = 1
    audio_seconds: float = 30.0
    text_tokens: int = 40
    max_new_tokens: int = 128
    score_tokens: int = 0           # > 0: a scoring job with continuations of this many tokens
    dtype: str = "bfloat16"


def _piece(name: str, fn, static: tuple = ()):
    """`fn(model, ...)` jitted over the parameter state, as the engine's pieces are (the graphdef
    static), with its compile counter name."""
    import jax
    from flax import nnx

    from affjax.runtime.compiles import traced

    def wrapped(state, *args, graphdef, **kw):
        traced(f"aot_{name}")
        return fn(nnx.merge(graphdef, state), *args, **kw)
    wrapped.__name__ = name
    return jax.jit(wrapped, static_argnames=("graphdef",) + tuple(static))


def _compile_depth(hf_config: dict, mesh, job: JobShape, stages: tuple, rets: tuple, positions: str,
                   proportional: bool, per_group: int | None, dump_dir, log,
                   decode: bool = True) -> tuple[dict, dict, dict | None]:
    """Compile the job's programs once, each layer group with `per_group` layers (None: its real
    depth) -> ({label: ProgramReport}, layout, the decode loop's abstract inputs or None).
    `decode=False` leaves the decode loop out."""
    import jax.numpy as jnp

    from affjax.runtime import engine as E
    from affjax.runtime import shapes

    n_text, n_audio = layer_counts(hf_config)
    plan = job_layout(hf_config, job, stages, rets)
    groups = plan["groups"]
    kept = [b - a if per_group is None else min(per_group, b - a) for a, b in groups]
    c_bounds = np.concatenate([[0], np.cumsum(kept)]).astype(int).tolist()
    c_groups = tuple((c_bounds[i], c_bounds[i + 1]) for i in range(len(kept)))
    c_audio = n_audio if per_group is None else min(per_group, n_audio)
    graphdef, state, cfg = abstract_model(hf_config, job.dtype, mesh, text_layers=c_bounds[-1], audio_layers=c_audio)

    W, T, B = plan["windows"], plan["sequence_buffer"], job.batch
    rows = lambda shape, dt: _rows(mesh, shape, dt)  # noqa: E731
    ids = (B, T, 2) if _is_kimi(hf_config) else (B, T)  # Kimi: the (audio, text) streams
    batch = (rows(ids, jnp.int32), rows((B, T), jnp.bool_), rows((B, T), jnp.int32), rows((B, T), jnp.int32),
             rows((W, cfg.audio.num_mel_bins, cfg.audio.mel_frames), jnp.float32), rows((W,), jnp.int32))
    n_prompt = rows((B,), jnp.int32)
    extra = 0 if job.score_tokens else job.max_new_tokens
    reports: dict[str, ProgramReport] = {}
    run = _runner(reports, state, graphdef, mesh, dump_dir, log)
    dec = None

    seq = run("embed", _piece("embed", E.embed_seq), batch, {}, depth=(c_audio, n_audio))
    buffers, caches = [T], []
    for g, ((a, b), (ca, cb)) in enumerate(zip(groups, c_groups)):
        if seq is None:
            break
        if g > 0:
            st, cap = stages[g - 1], plan["stage_buffers"][g - 1]
            kw = dict(stage=st.static, positions=positions, capacity=cap, retention=float(rets[g - 1]))
            out = run(f"pool@{st.layer}", _piece("pool", _pool, tuple(kw)), (seq, jnp.float32(st.tau)), kw)
            if out is None:
                break
            seq = out[0]
            buffers.append(cap)
        if a == b:  # a stage before the first layer (input pooling): no layers in between
            continue
        kw = dict(start=ca, end=cb, extra=extra, proportional=proportional and g > 0, keep_cache=not job.score_tokens)
        out = run(f"layers[{a}:{b})", _piece("group", E.run_layers, tuple(kw)), (seq,), kw, depth=(cb - ca, b - a))
        seq = None if out is None else out[0]
        if out is not None:
            caches += out[1]
    if seq is not None and job.score_tokens:
        K = shapes.bucket(job.score_tokens, shapes.CONT_BUCKETS, "continuation")
        run("score_head", _piece("score_head", E._cont_logprobs),
            (seq, n_prompt, rows((B, K), jnp.int32), rows((B, K), jnp.bool_)), {})
    elif seq is not None:
        logits = run("last_head", _piece("last_head", E._last_logits), (seq, n_prompt), {})
        if logits is not None:
            lens = [rows((B,), jnp.int32)] * len(groups)
            bias = [rows((B, n + extra), jnp.float32) if proportional and g > 0 else None
                    for g, n in enumerate(buffers)]
            dec = dict(logits=logits, caches=caches, lens=lens, bias=bias, row_ok=rows((B,), jnp.bool_),
                       groups=c_groups)
            if decode:
                _run_decode(run, graphdef, dec, job, depth=(c_bounds[-1], n_text))
    layout = {**plan, "groups_compiled": list(c_groups), "audio_layers_compiled": c_audio}
    return reports, layout, dec


def job_layout(hf_config: dict, job: JobShape, stages: tuple = (), rets: tuple = ()) -> dict:
    """The buffers a job's programs run at, from arithmetic alone: the layer groups between stages,
    the sequence buffer (the bucket of audio + text positions) and each stage's output buffer (the
    bucket of its kept audio tokens at the retention cap, plus the text; never above the previous)."""
    from affjax.pooling.affinity import retention_fraction
    from affjax.runtime import shapes
    from affjax.runtime.plan import audio_span

    n_text = layer_counts(hf_config)[0]
    bounds = [0] + [s.layer for s in stages] + [n_text]
    groups = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    if any(b < a for a, b in groups):
        raise AotError(f"pooling stages at layers {[s.layer for s in stages]} are not in order")
    # Qwen2-Audio: one clip cut at 30 s; Kimi-Audio: ceil(N / 30) windows of 30 s, each a feature row
    span = audio_span(hf_config, job.audio_seconds)
    audio_tokens = audio_now = span["positions"]
    buffers = [shapes.bucket(audio_tokens + job.text_tokens)]
    for r in rets:
        p, q = retention_fraction(r)
        audio_now = max(1, math.ceil(audio_now * p / q))
        buffers.append(min(shapes.bucket(audio_now + job.text_tokens), buffers[-1]))
    return {"groups": groups, "sequence_buffer": buffers[0], "stage_buffers": buffers[1:],
            "audio_tokens": audio_tokens, "windows": job.batch * span["windows"]}


def _run_decode(run, graphdef, dec: dict, job: JobShape, depth, label: str = "decode"):
    """The greedy loop over every group's layers (`dec`: its abstract inputs)."""
    from affjax.runtime import engine as E
    kw = dict(groups=dec["groups"], max_new=job.max_new_tokens, eos=(0,), pad_id=0)
    return run(label, _piece("decode", E._decode_loop, tuple(kw)),
               (dec["logits"], dec["caches"], dec["lens"], dec["lens"], dec["bias"], dec["row_ok"]), kw, depth=depth)


def _decode_variant(hf_config: dict, mesh, job: JobShape, dec: dict, g: int, log) -> "ProgramReport | None":
    """The decode loop of a one-layer-per-group compile with group `g` at two layers (its cache
    entry repeated): the per-layer cost of that group alone, for the two-point rule."""
    groups = dec["groups"]
    grown, shift = [], 0
    for i, (a, b) in enumerate(groups):
        grown.append((a + shift, b + shift + (1 if i == g else 0)))
        shift += 1 if i == g else 0
    caches = list(dec["caches"])
    caches.insert(groups[g][0], caches[groups[g][0]])  # at depth 1, group g's one layer is cache groups[g][0]
    graphdef, state, _ = abstract_model(hf_config, job.dtype, mesh, text_layers=grown[-1][1], audio_layers=1)
    reports: dict[str, ProgramReport] = {}
    _run_decode(_runner(reports, state, graphdef, mesh, None, log, outputs=False), graphdef,
                {**dec, "caches": caches, "groups": tuple(grown)}, job, depth=None, label=f"decode (group {g} at 2)")
    return next(iter(reports.values()))


def _runner(reports: dict, state, graphdef, mesh, dump_dir, log, outputs: bool = True):
    """run(label, jitted, args, kw, depth): compile one program into `reports` (logged) and return
    its outputs as the next program's abstract inputs (None when it does not fit, or `outputs` is off)."""
    import jax

    def run(label, jitted, args, kw, depth=None):
        rep, compiled = compile_program(label, jitted, (state,) + args, {**kw, "graphdef": graphdef}, mesh,
                                        dump_dir=dump_dir)
        rep.layers = depth
        rep.input_bytes = chip_bytes(args)
        reports[label] = rep
        log(f"  {label}: " + (f"peak {rep.peak_bytes / GiB:.3f} GiB/chip, {rep.flops / 1e9:.2f} GFLOP/chip, "
                              f"compiled in {rep.compile_seconds:.0f} s" if rep.fits else "does not fit in HBM"))
        if compiled is None or not outputs:
            return None
        with jax.set_mesh(mesh):
            out = jax.eval_shape(lambda *a: jitted(*a, **{**kw, "graphdef": graphdef}), state, *args)
        return _like(out, compiled)
    return run


def _pool(model, seq, tau, **kw):
    """A pooling stage as a piece (the model is unused; the TPU build has no CPU compiler options)."""
    from affjax.runtime.engine import pool_seq
    return pool_seq(seq, tau=tau, **kw)


def plan_job(hf_config: dict, topology: str, mesh_text: str | None, job: JobShape, pooling=None, retention=None, *,
             depth: str = "full", dump_dir: str | None = None, attention: str = "xla", log=print) -> dict:
    """Compile every program of one job for a TPU topology (module docstring) -> a JSON-friendly
    report: per program and in total, per-chip peak memory, whether it fits, FLOPs and collectives.
    `attention`: the prefill attention the programs are traced with (affjax.models.layers): "xla"
    (default: every FLOP is in the compiler's count) or "auto" (the Pallas splash kernel where a
    TPU job runs it: the real memory, but XLA's cost analysis does not see inside the kernel, so
    its attention FLOPs and bytes are missing from the figures)."""
    from affjax.models.layers import attention_backend
    with attention_backend(attention):
        r = _plan_job(hf_config, topology, mesh_text, job, pooling, retention, depth=depth, dump_dir=dump_dir, log=log)
    return {**r, "attention": attention}


def _plan_job(hf_config: dict, topology: str, mesh_text: str | None, job: JobShape, pooling, retention, *,
              depth: str, dump_dir: str | None, log) -> dict:
    import jax

    if depth not in ("two-point", "full"):
        raise AotError(f"depth must be 'two-point' or 'full', got {depth!r}")
    mesh = tpu_mesh(topology, mesh_text)
    stages = tuple(pooling.stages) if pooling is not None else ()
    if stages and retention is None:
        raise AotError("a pooled plan needs the retention of each stage (it sizes the stage buffers)")
    rets = tuple(retention) if isinstance(retention, (tuple, list)) else (retention,) * len(stages)
    if len(rets) != len(stages):
        raise AotError(f"{len(stages)} pooling stages but {len(rets)} retentions")
    positions = pooling.positions if pooling is not None else "first"
    proportional = bool(pooling is not None and pooling.proportional)
    t0 = time.perf_counter()
    if depth == "full":
        reps, layout, _ = _compile_depth(hf_config, mesh, job, stages, rets, positions, proportional, None,
                                         dump_dir, log)
        programs = {k: {**r.to_json(), "peak_bytes_full": r.peak_bytes, "flops_full": r.flops,
                        "bytes_accessed_full": r.bytes_accessed, "own_bytes_full": r.own_bytes()} for k, r in reps.items()}
    else:
        log(" depth 1 (one layer per group):")
        r1, layout, dec = _compile_depth(hf_config, mesh, job, stages, rets, positions, proportional, 1, dump_dir,
                                         log)
        sizes = [b - a for a, b in layout["groups"]]
        filled = [g for g, n in enumerate(sizes) if n]
        per_group = dec is not None and "decode" in r1 and len(filled) > 1
        log(" depth 2:")
        r2, _, _ = _compile_depth(hf_config, mesh, job, stages, rets, positions, proportional, 2, None, log,
                                  decode=not per_group)
        # each program grows with its own layers; the decode loop with every group's, each at its
        # own per-layer cost (its cache length differs), from one compile per group
        variants = {label: [(r2.get(label), a.layers[1])] for label, a in r1.items() if a.layers is not None}
        if per_group:
            log(" decode, one group at a time at two layers:")
            variants["decode"] = [(_decode_variant(hf_config, mesh, job, dec, g, log), sizes[g]) for g in filled]
        programs = {label: _extrapolate(a, variants.get(label)) for label, a in r1.items()}
    hbm = chip(topology)["hbm"]
    # every parameter stays in HBM for the whole job (each program reads only its own): the job's
    # need is the resident parameters plus the largest program's own footprint
    params = chip_bytes(abstract_model(hf_config, job.dtype, mesh)[1])
    own_max = max((d["own_bytes_full"] or 0) for d in programs.values())
    for d in programs.values():
        d["fits"] = bool(d["fits"] and d["peak_bytes_full"] is not None and d["peak_bytes_full"] <= hbm)
    ok = [d for d in programs.values() if d["flops_full"] is not None]
    spec = chip(topology)
    # the analytic plan's figure for each program, beside the compiler's (affjax.runtime.plan.program_bytes)
    from affjax.runtime.plan import program_bytes
    est = program_bytes(hf_config, layout, batch=job.batch, data=int(mesh.shape["data"]), model=int(mesh.shape["model"]),
                        dtype=job.dtype, extra=0 if job.score_tokens else job.max_new_tokens,
                        score_tokens=job.score_tokens)
    for label, d in programs.items():
        d["roofline"] = roofline_seconds(d, spec)
        d["analytic_own_bytes"] = est.get(label)
    return {"topology": canonical_topology(topology), "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "chip": chip(topology), "depth": depth, "job": dataclasses.asdict(job),
            "pooling": None if pooling is None else [dataclasses.asdict(s) for s in stages],
            "retention": list(rets), "layout": layout, "programs": programs,
            "param_bytes": params, "job_bytes": params + own_max,
            "fits": all(d["fits"] for d in programs.values()) and params + own_max <= hbm,
            "peak_bytes_max": max((d["peak_bytes_full"] or 0) for d in programs.values()),
            "prefill_flops": sum(d["flops_full"] for k, d in programs.items() if k != "decode" and d["flops_full"]),
            "roofline": roofline(programs, job),
            "compile_seconds": round(time.perf_counter() - t0, 1), "jax": jax.__version__,
            "programs_compiled": len(programs) * (1 if depth == "full" else 2) if ok else 0}


def _extrapolate(a: "ProgramReport", variants) -> dict:
    """A depth-1 report and its two-layer variants [(report, full layer count n)] -> the report at
    full depth, each figure v(1) + sum over the variants of (n - 1) x (v(variant) - v(1))."""
    d = a.to_json()
    ok = a.fits and variants and all(b is not None and b.fits for b, _ in variants)
    if not ok:
        d["peak_bytes_full"], d["flops_full"], d["own_bytes_full"] = d["peak_bytes"], d["flops"], a.own_bytes()
        d["bytes_accessed_full"] = d["bytes_accessed"]
        return d

    def full(f):
        return f(a) + sum((n - 1) * (f(b) - f(a)) for b, n in variants)
    d["peak_bytes_full"] = int(round(full(lambda r: r.peak_bytes)))
    d["flops_full"] = full(lambda r: r.flops)
    d["bytes_accessed_full"] = full(lambda r: r.bytes_accessed)
    d["own_bytes_full"] = int(round(full(ProgramReport.own_bytes)))
    d["collectives"] = {k: {f: int(round(full(lambda r: r.collectives.get(k, {}).get(f, 0)))) for f in ("count", "bytes")}
                        for k in a.collectives}
    return d


# ----------------------------------------------------------------------------------------------
# Whisper transcription: the encoder and the greedy loop, data parallel


def _whisper_compile(hf_config: dict, mesh, job: JobShape, layers: int | None, prompt_tokens: int, log) -> dict:
    """Whisper's two transcription programs (affjax.models.whisper.decoding) compiled for the mesh:
    `encode` (B windows of 30 s -> encoder states) and `greedy` (cross-attention K/V, the prompt,
    then the lax.while_loop of up to max_new_tokens steps). Parameters are replicated and rows go
    over 'data', as whisper-jax runs it; with `layers`, encoder and decoder at that depth."""
    import copy

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    from flax import nnx

    from affjax.models.checkpoint import get_spec
    from affjax.models.whisper.decoding import greedy_decode
    from affjax.models.whisper.modeling import WhisperConfig

    hf = copy.deepcopy(hf_config)
    if layers is not None:
        hf.update(encoder_layers=min(layers, hf["encoder_layers"]), decoder_layers=min(layers, hf["decoder_layers"]))
    cfg = WhisperConfig.from_hf(hf)
    graphdef, state = nnx.split(get_spec("whisper").abstract_model(cfg, jnp.dtype(job.dtype)))
    whole = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), nnx.to_pure_dict(state))
    B = job.batch
    reports: dict[str, ProgramReport] = {}
    run = _runner(reports, state, graphdef, mesh, None, log)
    enc = run("encode", _piece("encode", lambda m, f: m.encoder(f)),
              (_rows(mesh, (B, cfg.encoder.num_mel_bins, cfg.encoder.mel_frames), jnp.float32),), {},
              depth=(cfg.encoder.layers, hf_config["encoder_layers"]))
    if enc is not None:
        def greedy(m, e, prompt, row_valid, *, max_new_tokens):
            return greedy_decode(m.decoder, e, prompt, row_valid, max_new_tokens=max_new_tokens)
        run("greedy", _piece("greedy", greedy, ("max_new_tokens",)),
            (enc, jax.ShapeDtypeStruct((prompt_tokens,), jnp.int32, sharding=whole), _rows(mesh, (B,), jnp.bool_)),
            {"max_new_tokens": job.max_new_tokens}, depth=(cfg.decoder_layers, hf_config["decoder_layers"]))
    return reports


def whisper_plan(hf_config: dict, topology: str, mesh_text: str | None, job: JobShape, *, prompt_tokens: int = 4,
                 depth: str = "full", attention: str = "xla", log=print) -> dict:
    """Whisper transcription compiled for a TPU topology (both programs, at `depth` as plan_job's),
    with its roofline as real-time factor: 30 s of audio per row, `job.max_new_tokens` greedy steps
    per window (the loop's bound: a real window stops at its end-of-text). `attention` as plan_job's."""
    from affjax.models.layers import attention_backend
    with attention_backend(attention):
        r = _whisper_plan(hf_config, topology, mesh_text, job, prompt_tokens=prompt_tokens, depth=depth, log=log)
    return {**r, "attention": attention}


def _whisper_plan(hf_config: dict, topology: str, mesh_text: str | None, job: JobShape, *, prompt_tokens: int,
                  depth: str, log) -> dict:
    import jax

    mesh = tpu_mesh(topology, mesh_text)
    if mesh.shape["model"] != 1:
        raise AotError("Whisper plans are data parallel (whisper-jax's layout): give --mesh data=N,model=1")
    t0 = time.perf_counter()
    if depth == "full":
        r1 = _whisper_compile(hf_config, mesh, job, None, prompt_tokens, log)
        programs = {k: _extrapolate(r, []) for k, r in r1.items()}
    else:
        log(" depth 1:")
        r1 = _whisper_compile(hf_config, mesh, job, 1, prompt_tokens, log)
        log(" depth 2:")
        r2 = _whisper_compile(hf_config, mesh, job, 2, prompt_tokens, log)
        programs = {k: _extrapolate(a, [(r2.get(k), a.layers[1])]) for k, a in r1.items()}
    spec = chip(topology)
    for d in programs.values():
        d["roofline"] = roofline_seconds(d, spec)
        d["fits"] = bool(d["fits"] and d["peak_bytes_full"] is not None and d["peak_bytes_full"] <= spec["hbm"])
    times = [d["roofline"] for d in programs.values()]
    seconds = sum(t[0] for t in times) if times and all(times) else None
    audio = 30.0 * job.batch
    return {"model": "whisper", "topology": canonical_topology(topology),
            "mesh": {k: int(v) for k, v in mesh.shape.items()}, "chip": spec, "depth": depth,
            "job": dataclasses.asdict(job), "prompt_tokens": prompt_tokens, "programs": programs,
            "fits": all(d["fits"] for d in programs.values()) and len(programs) == 2,
            "roofline": None if seconds is None else {
                "batch_s": seconds, "audio_s": audio, "real_time_factor": seconds / audio,
                "one_hour_s": 3600.0 * seconds / audio},
            "compile_seconds": round(time.perf_counter() - t0, 1), "jax": jax.__version__}


def format_whisper(r: dict) -> str:
    lines = [f"Whisper on {r['topology']} mesh {r['mesh']}, {r['job']['dtype']}, batch {r['job']['batch']} windows "
             f"of 30 s, up to {r['job']['max_new_tokens']} tokens each, depth {r['depth']}",
             f"{'program':<10}{'fits':>5}{'peak GiB/chip':>15}{'GFLOP/chip':>12}{'GB moved':>10}{'roofline ms':>13}"]
    for label, d in r["programs"].items():
        rl = "-" if not d.get("roofline") else f"{1e3 * d['roofline'][0]:.1f} {d['roofline'][1][:3]}"
        lines.append(f"{label:<10}{'yes' if d['fits'] else 'NO':>5}{d['peak_bytes_full'] / GiB:>15.3f}"
                     f"{d['flops_full'] / 1e9:>12.1f}{d['bytes_accessed_full'] / 1e9:>10.2f}{rl:>13}")
    rf = r["roofline"]
    if rf:
        lines.append(f"roofline: {1e3 * rf['batch_s']:.1f} ms for {rf['audio_s']:.0f} s of audio = real-time factor "
                     f"{rf['real_time_factor']:.2e}; 1 h of audio in {rf['one_hour_s']:.1f} s")
    lines.append(f"fits: {'yes' if r['fits'] else 'NO'}; compiled in {r['compile_seconds']:.0f} s")
    return "\n".join(lines)


def max_batch(hf_config: dict, topology: str, mesh_text: str | None, job: JobShape, pooling=None, retention=None,
              *, depth: str = "full", budget: int | None = None, attention: str = "xla", log=print) -> dict:
    """The largest batch whose job fits per chip, found by compiling. Two compiles (the job's batch
    and twice it, multiples of the data axis) give each program's bytes per row a chip holds; the
    batch where the first program reaches the budget by that line is compiled next, and from there
    the compiler decides: steps of one row per chip, doubling while its verdict stays the same,
    bracket the answer, and bisection narrows it to one row per chip (the batch found fits; one
    more row per chip was compiled and does not). `budget`: bytes per chip the job may use (default: the chip's HBM; less leaves
    headroom for the runtime). -> {"max_batch", "rows_per_chip", "budget", "tried": [{"batch",
    "fits", "job_bytes"}], "report" (the plan at max_batch)}."""
    data = tpu_mesh(topology, mesh_text).shape["data"]
    hbm = min(budget or chip(topology)["hbm"], chip(topology)["hbm"])
    tried: dict[int, dict] = {}

    def plan(b):
        if b not in tried:
            log(f"batch {b}:")
            r = plan_job(hf_config, topology, mesh_text, dataclasses.replace(job, batch=b), pooling, retention,
                         depth=depth, attention=attention, log=lambda s: None)
            tried[b] = r = {**r, "fits": bool(r["fits"] and r["job_bytes"] <= hbm)}
            log(f"  batch {b}: job {r['job_bytes'] / GiB:.2f} GiB/chip, fits: {'yes' if r['fits'] else 'no'}")
        return tried[b]

    b1 = max(data, -(-job.batch // data) * data)
    while not plan(b1)["fits"] and b1 > data:  # even the first batch is too large: halve
        b1 = max(data, b1 // 2 // data * data)
    if not plan(b1)["fits"]:
        return {"max_batch": 0, "rows_per_chip": 0, "budget": hbm, "tried": _tried(tried), "report": plan(b1)}
    r1, r2 = plan(b1), plan(2 * b1)
    # (a batch that does not fit stops at its first program over HBM: the line takes the programs
    # both batches compiled)
    own = lambda r: {k: d["own_bytes_full"] for k, d in r["programs"].items() if d["own_bytes_full"]}  # noqa: E731
    o1, o2 = own(r1), own(r2)
    per_row = {k: (o2[k] - o1[k]) / (b1 / data) for k in o1 if k in o2}
    room = [(hbm - r1["param_bytes"] - o1[k]) / per_row[k] for k in per_row if per_row[k] > 0]
    guess = max(2 * b1, b1 + int(min(room)) * data) if room else 4 * b1
    # the line is a guess (a few rows pad to the chip's tiles, so small batches understate a row):
    # from it, steps of one row per chip, doubling while the compiler's verdict stays the same,
    # bracket the answer; then bisection narrows the bracket to one row per chip
    lo = max(b for b, r in tried.items() if r["fits"])
    hi = min((b for b, r in tried.items() if not r["fits"]), default=None)
    step = data
    if hi is None or lo < guess < hi:
        if plan(guess)["fits"]:
            lo = guess
            while hi is None:
                if plan(lo + step)["fits"]:
                    lo, step = lo + step, 2 * step
                else:
                    hi = lo + step
        else:
            hi = guess
            while hi - step > lo and not plan(hi - step)["fits"]:
                hi, step = hi - step, 2 * step
            lo = max(lo, hi - step)
    while hi - lo > data:
        mid = (lo + hi) // 2 // data * data
        if plan(mid)["fits"]:
            lo = mid
        else:
            hi = mid
    best = max(b for b, r in tried.items() if r["fits"])
    return {"max_batch": best, "rows_per_chip": best // data, "budget": hbm, "tried": _tried(tried),
            "report": plan(best)}


def _tried(tried: dict) -> list[dict]:
    return [{"batch": b, "fits": r["fits"], "job_bytes": r["job_bytes"]} for b, r in sorted(tried.items())]


def roofline_seconds(program: dict, spec: dict) -> tuple[float, str] | None:
    """(seconds, "compute" or "memory"): a program's time on one chip by the roofline, its FLOPs at
    the chip's peak FLOP/s or its HBM traffic at the chip's bandwidth, whichever takes longer (no
    collective time, perfect overlap)."""
    if program.get("flops_full") is None or program.get("bytes_accessed_full") is None:
        return None
    compute, memory = program["flops_full"] / spec["flops"], program["bytes_accessed_full"] / spec["hbm_bw"]
    return (compute, "compute") if compute >= memory else (memory, "memory")


def roofline(programs: dict, job: "JobShape") -> dict | None:
    """Prefill (every program but the decode loop) and decode by the roofline, for the whole slice:
    the rows are split over the data axis, so a per-chip time is the slice's."""
    times = {k: d.get("roofline") for k, d in programs.items()}
    if any(t is None for t in times.values()):
        return None
    prefill = sum(t[0] for k, t in times.items() if k != "decode")
    out = {"prefill_s": prefill, "prefill_items_per_s": job.batch / prefill}
    if "decode" in times and not job.score_tokens:
        out["decode_s"] = times["decode"][0]
        out["decode_tokens_per_s"] = job.batch * job.max_new_tokens / times["decode"][0]
    return out


# ----------------------------------------------------------------------------------------------
# affjax plan --aot


def format_report(r: dict) -> str:
    gib = lambda b: "-" if b is None else f"{b / GiB:.3f}"  # noqa: E731
    hbm = r["chip"]["hbm"]
    lines = [f"{r['topology']} mesh {r['mesh']}, {r['job']['dtype']}, batch {r['job']['batch']}, "
             f"{r['job']['audio_seconds']:g} s audio, depth {r['depth']}, attention {r.get('attention', 'xla')}; "
             f"HBM {hbm / GiB:.0f} GiB per chip",
             f"{'program':<16}{'fits':>5}{'peak GiB/chip':>15}{'own MiB':>9}{'analytic':>9}{'GFLOP/chip':>12}"
             f"{'GB moved':>10}{'roofline ms':>13}  collectives (static count, MiB)"]
    for label, d in r["programs"].items():
        coll = ", ".join(f"{k} {c['count']} ({c['bytes'] / 2**20:.1f})" for k, c in sorted(d["collectives"].items()))
        fl = "-" if d["flops_full"] is None else f"{d['flops_full'] / 1e9:.1f}"
        mv = "-" if d.get("bytes_accessed_full") is None else f"{d['bytes_accessed_full'] / 1e9:.2f}"
        rl = "-" if not d.get("roofline") else f"{1e3 * d['roofline'][0]:.2f} {d['roofline'][1][:3]}"
        own, est = d.get("own_bytes_full"), d.get("analytic_own_bytes")
        mib = "-" if own is None else f"{own / 2**20:.1f}"
        ratio = "-" if not own or est is None else f"{est / own:.2f}x"
        lines.append(f"{label:<16}{'yes' if d['fits'] else 'NO':>5}{gib(d['peak_bytes_full']):>15}{mib:>9}{ratio:>9}"
                     f"{fl:>12}{mv:>10}{rl:>13}  {coll or '-'}")
    lines.append("own MiB: what a program holds beyond the parameters it reads (inputs, outputs, caches, "
                 "temporaries); analytic: affjax plan's arithmetic for it, as a ratio")
    vm = r.get("vmem_mib")
    lines.append(f"on-chip VMEM {'capped at ' + str(vm) + ' MiB' if vm else 'the chip default'}: {VMEM_NOTE}")
    lines.append(f"resident parameters {gib(r['param_bytes'])} GiB/chip + the largest program's activations and "
                 f"caches = {gib(r['job_bytes'])} GiB/chip of {hbm / GiB:.0f}")
    lines.append(f"fits: {'yes' if r['fits'] else 'NO'}; largest program peak {gib(r['peak_bytes_max'])} GiB/chip; "
                 f"prefill {r['prefill_flops'] / 1e9:.1f} GFLOP/chip; compiled in {r['compile_seconds']:.0f} s")
    rf = r.get("roofline")
    if rf:
        c = r["chip"]
        line = (f"roofline ({c['flops'] / 1e12:.0f} TFLOP/s, {c['hbm_bw'] / 1e9:.0f} GB/s per device; no collective "
                f"time): prefill {1e3 * rf['prefill_s']:.1f} ms = {rf['prefill_items_per_s']:.1f} items/s")
        if "decode_s" in rf:
            line += (f"; decode {r['job']['max_new_tokens']} steps {1e3 * rf['decode_s']:.1f} ms = "
                     f"{rf['decode_tokens_per_s']:.0f} tokens/s")
        lines.append(line)
    return "\n".join(lines)


def main_plan_aot(args) -> int:
    import json

    from affjax.pooling.spec import parse_pooling  # after prepare_env (the CLI calls it first): loads jax
    from affjax.runtime.plan import load_hf_config

    try:
        if not args.topology or len(args.topology) != 1:
            raise AotError("--aot takes one --topology, e.g. v5e:2x4")
        topology = canonical_topology(args.topology[0])
        cfg = load_hf_config(args.ckpt_config)
        if cfg.get("model_type") == "whisper":
            job = JobShape(batch=args.batch_size, max_new_tokens=args.max_new_tokens, dtype=args.dtype)
            r = whisper_plan(cfg, topology, args.mesh, job, depth=args.depth, attention=args.attention)
            print(format_whisper(r))
            if args.json:
                Path(args.json).write_text(json.dumps(r, indent=1, default=str))
            return 0 if r["fits"] else 3
        pooling = parse_pooling(args.pooling, layer_counts(cfg)[0]) if args.pooling else None
        n_stages = len(pooling.stages) if pooling else 0
        retention = args.retention or ([0.5] * n_stages if n_stages else None)
        if retention and len(retention) == 1 and n_stages > 1:  # one fraction for every stage
            retention = list(retention) * n_stages
        job = JobShape(batch=args.batch_size, audio_seconds=args.audio_seconds, text_tokens=args.text_tokens,
                       max_new_tokens=args.max_new_tokens, score_tokens=args.score_tokens, dtype=args.dtype)
        if args.max_batch:
            budget = None if args.hbm_budget is None else int(args.hbm_budget * GiB)
            found = max_batch(cfg, topology, args.mesh, job, pooling, retention, depth=args.depth, budget=budget,
                              attention=args.attention)
            r = {**found["report"], "max_batch": {k: v for k, v in found.items() if k != "report"}}
        else:
            r = plan_job(cfg, topology, args.mesh, job, pooling, retention, depth=args.depth, dump_dir=args.dump_hlo,
                         attention=args.attention)
    except (AotError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    r["vmem_mib"] = getattr(args, "vmem_mib", None)
    print(format_report(r))
    if args.max_batch:
        m = r["max_batch"]
        print(f"largest batch that fits: {m['max_batch']} ({m['rows_per_chip']} rows per chip); compiled: "
              + ", ".join(f"{t['batch']} ({t['job_bytes'] / GiB:.2f} GiB, {'fits' if t['fits'] else 'does not fit'})"
                          for t in m["tried"]))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    return 0 if r["fits"] else 3
