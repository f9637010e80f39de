"""Scaling through JAX's own sharding: one device mesh with axes ("data", "model"), and one table of
logical-axis rules that places parameters and activations on it.

Nothing here moves data by hand: parameters are restored onto their shards by orbax
(`checkpoint.load(sharding=param_sharding(mesh, cfg))`), inputs become global arrays with
`jax.make_array_from_process_local_data`, and everything in between is jit's sharding propagation,
steered by `jax.lax.with_sharding_constraint` at a few named activations (`constrain`).

Logical axes. Every parameter dimension and every placed activation dimension has a logical name
(PARAM_AXES, ACTIVATION_AXES); LOGICAL_RULES maps each name to a mesh axis or None (replicated):
data parallelism over the batch, tensor parallelism over attention heads (q/k/v output dim, o input
dim, KV-cache heads), MLP width and vocabulary (embedding rows, LM-head rows). A dimension whose size
is not divisible by its mesh axis's size is replicated on that axis instead; so is a head dimension
whose head count (from the model config, when given) is not divisible, so that no head is split
across chips (Qwen2-Audio-7B's audio encoder has 20 heads: replicated attention on model=8).

Mesh. `make_mesh("data=4,model=2")` over all devices (`parse_mesh`: None = every device on data,
-1 = the rest). The same code runs on one CPU, one chip, a TPU VM or a multi-host pod slice.

Multi-host flow (one process per host, every process runs the same program):
  1. `initialize_distributed()` first, before any other JAX call: `jax.distributed.initialize()` when
     launched as one of several processes (JAX_COORDINATOR_ADDRESS, a multi-host TPU / SLURM / Open
     MPI environment, or AFFJAX_DISTRIBUTED=1), a no-op otherwise.
  2. `mesh = make_mesh(...)` over the devices of every host; the model axis must stay inside a host
     (model <= local device count) so that each host owns whole rows of the data axis.
  3. `load(ckpt, mesh)`: every process restores only the parameter shards its own devices hold.
  4. `host_share(rows)`: this host's rows of the manifest (rows[process_index::process_count]).
  5. Batches of `batch_multiple(mesh)`-multiple local rows go to `Engine(model, mesh=mesh)`: the
     engine pads each process's batch to shapes agreed across processes (`agree_max`), builds global
     arrays with `jax.make_array_from_process_local_data`, takes host-side decisions (pooled buckets,
     fixed capacities) from global maxima and hands each process back its own rows (`local_rows`).
     Every process must make the same number of engine calls: a host that runs out of rows pads
     with `empty_batch` (see `agree_max` for the count).
  6. `gather_to_host0(records)`: every host's records, in host order, on process 0 (None elsewhere);
     process 0 writes the output.
affjax.eval.lslm.run_lslm (`affjax score/generate/eval --mesh`) follows these steps; tests/test_sharding.py runs the
engine part with 2 processes x 4 CPU devices (jax.distributed on localhost).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from affjax.models.qwen2_audio.inputs import Batch
from affjax.runtime import shapes

AXES = ("data", "model")

# The one table: logical axis -> mesh axis (None = replicated).
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",        # rows of a batch, audio clips
    "heads": "model",       # attention heads: q output / o input dims, query heads
    "kv_heads": "model",    # key/value heads: k, v output dims, KV cache
    "mlp": "model",         # MLP width (gate/up output, down input; Whisper fc1/fc2)
    "vocab": "model",       # token embedding rows, LM-head rows (logits' last dim)
    "embed": None,          # model width / residual stream
    "length": None,         # sequence positions
    "head_dim": None,
}

# Parameter path (joined with '/') -> logical axes, first match wins; anything else is replicated
# (norms, output biases, conv stem, position tables, the audio projector: a small fraction).
# nnx.Linear kernels are (in, out); embeddings and the LM head are (vocab, embed).
# `/base`: the frozen layer inside a LoRA adapter (affjax.train.lora); the adapters stay replicated
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)q_proj(/base)?/kernel$", ("embed", "heads")),
    (r"(^|/)q_proj(/base)?/bias$", ("heads",)),
    (r"(^|/)(k_proj|v_proj)(/base)?/kernel$", ("embed", "kv_heads")),
    (r"(^|/)(k_proj|v_proj)(/base)?/bias$", ("kv_heads",)),
    (r"(^|/)(o_proj|out_proj)(/base)?/kernel$", ("heads", "embed")),
    (r"(^|/)(gate_proj|up_proj|fc1)(/base)?/kernel$", ("embed", "mlp")),
    (r"(^|/)fc1/bias$", ("mlp",)),
    (r"(^|/)(down_proj|fc2)(/base)?/kernel$", ("mlp", "embed")),
    (r"(^|/)(embed_tokens|lm_head|mimo_output)$", ("vocab", "embed")),
)

# Named activations -> logical axes (leading dims; the rest whole).
ACTIVATION_AXES: dict[str, tuple[str | None, ...]] = {
    "inputs": ("batch",),                                     # every engine input: rows (or audio clips) first
    "hidden": ("batch", "length", "embed"),                   # residual stream ['B T D']
    "kv_cache": ("batch", "length", "kv_heads", "head_dim"),  # ['B S KVH hd']
}


# ----------------------------------------------------------------------------------------------
# mesh


def parse_mesh(text: str | None, n_devices: int | None = None) -> dict[str, int]:
    """"data=4,model=2" -> {"data": 4, "model": 2}. None or "" puts every device on data; one axis may
    be -1 (the rest of the devices), and an axis left out is the rest ("model=2" = "data=-1,model=2").
    The sizes must multiply to the device count (`n_devices`, default jax.device_count())."""
    n = jax.device_count() if n_devices is None else int(n_devices)
    sizes: dict[str, int] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            if text and text.strip():
                raise ValueError(f"mesh {text!r}: empty entry (expected e.g. 'data=4,model=2')")
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"mesh {text!r}: {part!r} is not AXIS=SIZE (expected e.g. 'data=4,model=2')")
        if name not in AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {name!r} (axes: {', '.join(AXES)})")
        if name in sizes:
            raise ValueError(f"mesh {text!r}: axis {name!r} given twice")
        try:
            size = int(value.strip())
        except ValueError:
            raise ValueError(f"mesh {text!r}: size {value.strip()!r} of {name!r} is not an integer") from None
        if size == 0 or size < -1:
            raise ValueError(f"mesh {text!r}: size of {name!r} must be >= 1 or -1 (the rest), got {size}")
        sizes[name] = size
    if not sizes:
        sizes = {"data": -1, "model": 1}
    for a in AXES:
        sizes.setdefault(a, -1)
    rest = [a for a in AXES if sizes[a] == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh {text!r}: at most one axis may be -1 (the rest)")
    known = int(np.prod([sizes[a] for a in AXES if sizes[a] != -1]))
    if rest:
        if n % known:
            raise ValueError(f"mesh {text!r}: {known} does not divide the {n} devices")
        sizes[rest[0]] = n // known
    if sizes["data"] * sizes["model"] != n:
        raise ValueError(f"mesh {text!r}: data {sizes['data']} x model {sizes['model']} = "
                         f"{sizes['data'] * sizes['model']} devices, but there are {n}")
    return {a: sizes[a] for a in AXES}


def make_mesh(spec: str | Mapping[str, int] | None = None) -> Mesh:
    """A ("data", "model") mesh over every device (all hosts), from `parse_mesh` text or a dict.
    Axes are Auto: jit propagates shardings, `constrain` steers it."""
    if isinstance(spec, Mapping):
        spec = ",".join(f"{k}={v}" for k, v in spec.items())
    sizes = parse_mesh(spec)
    mesh = jax.make_mesh((sizes["data"], sizes["model"]), AXES, axis_types=(AxisType.Auto,) * len(AXES))
    _check_hosts(mesh)
    return mesh


def _check_hosts(mesh: Mesh) -> None:
    """Every model-axis group on one process: each process then owns whole rows of the data axis."""
    for group in np.asarray(mesh.devices):
        if len({d.process_index for d in group}) > 1:
            raise ValueError(f"mesh {dict(mesh.shape)}: a model-axis group spans several hosts; keep the "
                             f"model axis within one host (model <= {jax.local_device_count()})")


def mesh_or_none(spec: str | Mapping[str, int] | None) -> Mesh | None:
    """The mesh a run asked for; with none asked, every device on data when there are several and
    None (plain one-device arrays) when there is one."""
    if spec is None and jax.device_count() == 1:
        return None
    return make_mesh(spec)


def padded_batch_size(batch_size: int, mesh: Mesh | None) -> int:
    """`batch_size` rounded up to a multiple of `batch_multiple(mesh)` (the extra rows are padding)."""
    m = batch_multiple(mesh)
    return -(-batch_size // m) * m


def mesh_text(mesh: Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in AXES)


# ----------------------------------------------------------------------------------------------
# logical axes -> shardings


def logical_spec(axes, shape=None, mesh: Mesh | None = None, rules: Mapping[str, str | None] = LOGICAL_RULES,
                 divisible: Callable[[str, int], bool] | None = None) -> PartitionSpec:
    """PartitionSpec of logical `axes` under `rules`. With `shape` and `mesh`, a dimension not
    divisible by its mesh axis's size (or rejected by `divisible(logical name, axis size)`) is
    replicated on that axis; a mesh axis is used at most once."""
    out, used = [], set()
    for i, name in enumerate(axes):
        axis = rules.get(name) if name is not None else None
        if axis is not None and mesh is not None:
            size = mesh.shape[axis]
            if axis in used or (shape is not None and shape[i] % size) or (divisible and not divisible(name, size)):
                axis = None
        if axis is not None:
            used.add(axis)
        out.append(axis)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def param_axes(path) -> tuple[str | None, ...] | None:
    """Logical axes of the parameter at `path` (tuple of keys, or 'a/b/c'); None = replicated."""
    key = path if isinstance(path, str) else "/".join(str(p) for p in path)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, key):
            return axes
    return None


def _head_counts(cfg, path: tuple) -> tuple[int | None, int | None]:
    """(query heads, KV heads) of the attention block a parameter path belongs to, from the config."""
    if cfg is None:
        return None, None
    top = str(path[0]) if path else ""
    if hasattr(cfg, "audio") and hasattr(cfg, "text"):  # Qwen2-Audio
        if top == "audio_tower":
            return cfg.audio.heads, cfg.audio.heads
        return cfg.text.heads, cfg.text.kv_heads
    if hasattr(cfg, "decoder_heads"):  # Whisper
        if top == "encoder":
            return cfg.encoder.heads, cfg.encoder.heads
        return cfg.decoder_heads, cfg.decoder_heads
    if hasattr(cfg, "kv_heads"):  # a bare Qwen2 / Llama decoder
        return cfg.heads, cfg.kv_heads
    return None, None


def param_spec(path, shape, mesh, cfg=None) -> PartitionSpec:
    """PartitionSpec of the parameter at `path` (tuple of keys) with `shape` on `mesh` (a Mesh or an
    AbstractMesh): PARAM_AXES through LOGICAL_RULES, a dimension not divisible by its mesh axis's
    size replicated; with `cfg`, a head dimension replicated unless its block's head count is
    divisible by the axis size (no head split across chips)."""
    axes = param_axes(path)
    if axes is None or len(axes) != len(shape):
        return PartitionSpec()
    heads, kv_heads = _head_counts(cfg, tuple(path))
    counts = {"heads": heads, "kv_heads": kv_heads}
    return logical_spec(axes, shape, mesh,
                        divisible=lambda name, size: counts.get(name) is None or counts[name] % size == 0)


def param_sharding(mesh: Mesh, cfg=None) -> Callable[[tuple, jax.ShapeDtypeStruct], NamedSharding]:
    """The function `checkpoint.load(sharding=...)` takes: (parameter path tuple, ShapeDtypeStruct)
    -> NamedSharding (`param_spec`).

    Works for Qwen2-Audio (audio_tower / multi_modal_projector / language_model), Whisper
    (encoder / decoder) and a bare Qwen2 decoder. A dimension whose size is not divisible by its
    mesh axis's size is replicated on that axis. With `cfg` (the model config), a head dimension is
    also replicated unless its block's head count is divisible by the model axis (no head split
    across chips); without it only the dimension size is checked."""
    return lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, mesh, cfg))


def load(ckpt: str | os.PathLike, mesh: Mesh | None, *, dtype=None):
    """`checkpoint.load` with every parameter restored directly onto its shard of `mesh` (None: one
    device) -> (model, cfg, meta)."""
    # deferred: runner.validate imports this module for --mesh; model code (flax, orbax) loads only here
    from affjax.models import checkpoint

    if mesh is None:
        return checkpoint.load(ckpt, dtype=dtype)
    meta = json.loads((Path(ckpt) / checkpoint.CONFIG_NAME).read_text())
    cfg = checkpoint.get_spec(meta["model_type"]).config_from_hf(meta["hf_config"])
    return checkpoint.load(ckpt, dtype=dtype, sharding=param_sharding(mesh, cfg))


def place_params(pure_state, mesh: Mesh, cfg=None):
    """device_put a pure parameter dict (nnx.to_pure_dict) onto `mesh` by the rules."""
    fn = param_sharding(mesh, cfg)
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, x: fn(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), x), pure_state)
    return jax.device_put(pure_state, shardings)


def on_mesh(x, mesh: Mesh) -> bool:
    """Whether array `x` already lives on exactly the devices of `mesh`."""
    s = getattr(x, "sharding", None)
    return s is not None and set(s.device_set) == set(mesh.devices.flat)


def constrain(x, name: str):
    """`with_sharding_constraint` of activation `x` to ACTIVATION_AXES[name] on the mesh in context
    (`jax.set_mesh`); unchanged outside a mesh. Non-divisible dimensions are replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x is None:
        return x
    spec = logical_spec(ACTIVATION_AXES[name], x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


# ----------------------------------------------------------------------------------------------
# batches: process-local rows <-> global arrays


def batch_multiple(mesh: Mesh | None) -> int:
    """Rows per process per batch must be a multiple of this (callers pad with dummy rows): the
    data-axis positions this process's devices hold (the data axis size on one process)."""
    if mesh is None:
        return 1
    return len(_local_data_positions(mesh))


def _local_data_positions(mesh: Mesh) -> list[int]:
    me = jax.process_index()
    devs = np.asarray(mesh.devices).reshape(mesh.shape["data"], -1)
    return [i for i in range(devs.shape[0]) if any(d.process_index == me for d in devs[i])]


def row_sharding(mesh: Mesh, ndim: int, global_rows: int | None = None) -> NamedSharding:
    """ACTIVATION_AXES["inputs"]: rows over data, the rest whole (all whole when the rows do not
    divide)."""
    axes = ACTIVATION_AXES["inputs"] + (None,) * (ndim - 1)
    return logical_sharding(mesh, axes, None if global_rows is None else (global_rows,) + (1,) * (ndim - 1))


def put_rows(mesh: Mesh, local) -> jax.Array:
    """A global array from this process's rows (dim 0 split over the data axis); on one process the
    rows are the whole array."""
    local = np.asarray(local)
    n_proc = jax.process_count()
    if n_proc == 1:
        return jax.device_put(local, row_sharding(mesh, local.ndim, local.shape[0]))
    if local.shape[0] % batch_multiple(mesh):
        raise ValueError(f"{local.shape[0]} local rows: not a multiple of {batch_multiple(mesh)} (the data-axis "
                         "positions of this host)")
    return jax.make_array_from_process_local_data(row_sharding(mesh, local.ndim), local)


def global_rows(mesh: Mesh, n_local: int) -> np.ndarray:
    """Global row index of each of this process's `n_local` rows in a `put_rows` array."""
    if jax.process_count() == 1:
        return np.arange(n_local)
    pos = _local_data_positions(mesh)
    per = n_local // len(pos)
    return np.concatenate([np.arange(p * per, (p + 1) * per) for p in pos])


def local_count(mesh: Mesh | None, n_global: int) -> int:
    """How many of `n_global` rows of a `put_rows` array are this process's."""
    if mesh is None or jax.process_count() == 1:
        return n_global
    return n_global * batch_multiple(mesh) // mesh.shape["data"]


def local_rows(x, mesh: Mesh | None = None) -> np.ndarray:
    """This process's rows of a global array (all of it on one process) as numpy."""
    if x is None:
        return None
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return full[global_rows(mesh, local_count(mesh, full.shape[0]))]


def host_value(x) -> np.ndarray:
    """The whole of a (possibly multi-host) array on every process, as numpy."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agree_max(values) -> np.ndarray:
    """Elementwise maximum of an int vector over all processes (the value itself on one process):
    for host-side decisions every process must take alike (shapes, buckets, capacities, how many
    batches to run)."""
    v = np.atleast_1d(np.asarray(values, np.int64))
    if jax.process_count() == 1:
        return v
    return np.asarray(multihost_utils.process_allgather(v)).reshape(-1, v.size).max(0)


def globalize_batch(batch, mesh: Mesh | None, out_frames: int):
    """Several processes: this process's Batch padded to the sequence / continuation / audio-slot
    sizes agreed by every process, its audio indices pointing into the global audio array (whose
    rows come from every process; `out_frames` audio tokens per clip slot). Unchanged on one process.
    Every process must bring the same number of rows."""
    if mesh is None or jax.process_count() == 1:
        return batch
    b, t = batch.ids.shape
    a = batch.features.shape[0]
    k = 0 if batch.cont_ids is None else batch.cont_ids.shape[1]
    most = agree_max([b, -b, t, a, k])
    if most[0] != -most[1]:
        raise ValueError(f"processes bring different batch sizes ({-most[1]} to {most[0]} rows)")
    gt, ga, gk = (int(v) for v in most[2:])
    pad = lambda x, n, axis, fill=0: x if x.shape[axis] == n else np.concatenate(  # noqa: E731
        [x, np.full(x.shape[:axis] + (n - x.shape[axis],) + x.shape[axis + 1:], fill, x.dtype)], axis)
    rows = global_rows(mesh, ga)  # local audio slot -> global audio slot
    slot, tok = np.divmod(batch.audio_index, out_frames)
    out = dataclasses.replace(
        batch, ids=pad(batch.ids, gt, 1), valid=pad(batch.valid, gt, 1),
        span=pad(batch.span, gt, 1), audio_index=pad((rows[slot] * out_frames + tok).astype(np.int32), gt, 1),
        features=pad(batch.features, ga, 0), feature_lengths=pad(batch.feature_lengths, ga, 0, 1))
    if batch.cont_ids is not None:
        out.cont_ids, out.cont_valid = pad(batch.cont_ids, gk, 1), pad(batch.cont_valid, gk, 1)
    return out


def empty_batch(batch_size: int, *, n_mels: int, frames: int, score: bool, pad_id: int = 0):
    """An all-padding Batch (rows=0): what a host with no rows left runs so that every process makes
    the same engine calls."""
    b, t = batch_size, shapes.SEQ_BUCKETS[0]
    z = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    batch = Batch(np.full((b, t), pad_id, np.int32), np.zeros((b, t), bool), z(b), z(b, t), z(b, t),
                  np.zeros((b, n_mels, frames), np.float32), np.ones((b,), np.int32), rows=0)
    if score:
        k = shapes.CONT_BUCKETS[0]
        batch.cont_ids, batch.cont_valid = z(b, k), np.zeros((b, k), bool)
    return batch


# ----------------------------------------------------------------------------------------------
# multi-host


_MULTI_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


def _launched_multiprocess() -> str | None:
    """Why the environment says this is one of several processes, or None."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    for k in _MULTI_ENV:
        if len([h for h in env.get(k, "").split(",") if h.strip()]) > 1:
            return k
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(k, "1").isdigit() and int(env.get(k, "1")) > 1:
            return k
    if env.get("AFFJAX_DISTRIBUTED", "") not in ("", "0"):
        return "AFFJAX_DISTRIBUTED"
    return None


def initialize_distributed(*, log_fn=None, **kwargs) -> bool:
    """`jax.distributed.initialize()` when launched as one of several processes: explicit keyword
    arguments (coordinator_address=, num_processes=, process_id=), JAX_COORDINATOR_ADDRESS (with
    JAX_NUM_PROCESSES / JAX_PROCESS_ID when JAX cannot detect them), a multi-host TPU slice
    (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with several hosts), SLURM or Open MPI with
    several tasks, or AFFJAX_DISTRIBUTED=1 (JAX's own cluster detection, e.g. a GCE TPU pod slice).
    A no-op otherwise. Call it before any other JAX call. Returns whether JAX runs distributed."""
    say = log_fn or (lambda m: print(m, file=sys.stderr, flush=True))
    if jax.distributed.is_initialized():
        return True
    why = "arguments" if kwargs else _launched_multiprocess()
    if why is None:
        say("affjax: single process (jax.distributed not initialised)")
        return False
    if not kwargs and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if os.environ.get(env):
                kwargs[key] = int(os.environ[env])
    jax.distributed.initialize(**kwargs)
    say(f"affjax: jax.distributed initialised ({why}): process {jax.process_index()} of "
        f"{jax.process_count()}, {jax.local_device_count()} local / {jax.device_count()} devices")
    return True


def process_count() -> int:
    return jax.process_count()


def process_index() -> int:
    return jax.process_index()


def host_share(rows: list) -> list:
    """This process's share of the manifest rows: rows[process_index::process_count]."""
    return list(rows)[jax.process_index()::jax.process_count()]


def gather_to_host0(records: list[dict]) -> list[dict] | None:
    """Every process's records (JSON-serialisable dicts) on process 0, process 0's first, then
    process 1's, ...; None on the other processes. On one process: the records themselves. Every
    process must call it (a collective: `multihost_utils.process_allgather` of the serialised
    records)."""
    if jax.process_count() == 1:
        return list(records)
    blob = np.frombuffer(json.dumps(records).encode(), np.uint8)
    n = int(agree_max([blob.size])[0])
    padded = np.zeros(n + 8, np.uint8)
    padded[:8] = np.frombuffer(np.int64(blob.size).tobytes(), np.uint8)
    padded[8:8 + blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
    if jax.process_index() != 0:
        return None
    out = []
    for row in every:
        size = int(np.frombuffer(row[:8].tobytes(), np.int64)[0])
        out += json.loads(row[8:8 + size].tobytes().decode())
    return out
