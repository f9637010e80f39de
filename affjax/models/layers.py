"""Building blocks shared by the models: norms, attention math, RoPE, convolution.

Norms, softmax and RoPE angles run in float32 whatever the parameter dtype, as the PyTorch
reference does; matrix products run in the parameter dtype.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Additive mask value: finite, so a fully masked (padding) query row gives a uniform softmax
# instead of NaN, and padding rows never poison a batch.
MASK_VALUE = -1e30


def abstract_module(build, seed: int = 0):
    """``build(rngs)`` under ``nnx.eval_shape``: the module with ShapeDtypeStruct leaves, no memory.

    The Rngs' counters are host (numpy) arrays, so each ``rngs.params()`` bumps a numpy counter
    instead of a traced one (the draws are the same: ``fold_in(key, count)`` with the same counts).
    With a traced counter, flax's Variable update compares the shardings of two tracers, and each
    failed lookup builds its error message by scanning the whole trace so far: quadratic in the
    number of parameters, about 35 s for the 7B model against 1 s this way.
    """
    def host_counted():
        rngs = nnx.Rngs(seed)
        for _, node in nnx.iter_graph(rngs):
            if isinstance(node, nnx.RngStream):
                node.count.set_raw_value(np.zeros(node.count.shape, np.uint32))
        return build(rngs)
    return nnx.eval_shape(host_counted)


def linear(d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the weight multiply
        return self.scale[...] * y.astype(x.dtype)


class Conv1d(nnx.Module):
    """Conv over time on (B, T, C) inputs; kernel stored (K, C_in, C_out)."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int, stride: int, padding: int, dtype, rngs):
        k = jax.random.normal(rngs.params(), (kernel, c_in, c_out), dtype) * (c_in * kernel) ** -0.5
        self.kernel = nnx.Param(k)
        self.bias = nnx.Param(jnp.zeros((c_out,), dtype))
        self.stride, self.padding = stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], window_strides=(self.stride,), padding=[(self.padding, self.padding)],
            dimension_numbers=("NWC", "WIO", "NWC"))
        return y + self.bias[...]


def map_rows(fn, *xs: jax.Array, rows_per_step: int | None = None) -> jax.Array:
    """fn over the leading (batch) axis of xs. On one CPU device, one row at a time (lax.map), so a
    row's activations stay in cache: the 4-clip audio encoder ran about 15 % faster so, while the
    decoder, whose weights dominate, is faster batched. Elsewhere (accelerators, or under a mesh
    that shards the rows) the rows go through together, or, with `rows_per_step`, in sequential
    steps of at most that many rows per data shard (map_groups): what the program holds at once is
    then one step's activations (the audio encoder over many 30 s windows)."""
    n = xs[0].shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    if n == 1:
        return fn(*xs)
    if jax.default_backend() == "cpu" and mesh.empty:
        return jax.lax.map(lambda row: fn(*(x[None] for x in row))[0], xs)
    if rows_per_step is None:
        return fn(*xs)
    shards = 1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes)).get("data", 1)
    if n % shards:
        return fn(*xs)
    return map_groups(fn, xs, row_steps(n // shards, rows_per_step))


def row_steps(rows: int, rows_per_step: int) -> int:
    """The fewest equal sequential steps of at most `rows_per_step` rows that `rows` splits into."""
    steps = -(-rows // rows_per_step)
    while rows % steps:
        steps += 1
    return steps


def map_groups(fn, xs: tuple, steps: int):
    """fn over the leading axis of xs in `steps` sequential calls (lax.map), step j taking rows j,
    j + steps, j + 2 steps, ...: where a mesh splits the rows in contiguous blocks over 'data',
    every step takes an equal share of each block, so the split is kept and no rows move."""
    if steps <= 1:
        return fn(*xs)

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), 0, 1)

    out = jax.lax.map(lambda parts: fn(*parts), tuple(split(x) for x in xs))
    return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:]), out)


def rope_cos_sin(pos: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """pos: Float['B T'] (fractional positions allowed) -> cos, sin: ['B T head_dim'] (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = pos.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: ['B T H hd'], cos/sin: ['B T hd']."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
              key_bias: jax.Array | None = None, *, key_valid: jax.Array | None = None,
              causal: bool = False, scale: float | None = None, block_elems: int = 5 << 19) -> jax.Array:
    """Grouped-query attention.

    q: ['B Tq H hd'], k/v: ['B Tk KVH hd']. Which keys a query sees is given either by
    `mask` Bool['B Tq Tk'] (True = attend; small inputs), or by `key_valid` Bool['B Tk'] plus
    `causal` (query i sees key j <= i; needs Tq == Tk). On one CPU device the second form never
    builds a (Tq, Tk) mask: it runs query chunks of every head at once, one row at a time, so each score block
    (about `block_elems` floats) stays in cache (on a CPU whose memory bandwidth is low, one
    (B, H, Tq, Tk) softmax through memory costs more than the matmuls), and under `causal` each
    chunk reads only the keys up to its last query (about half the work of the full square).
    key_bias: Float['B Tk'] added to every query's logit for that key (log group size under
    `proportional` pooling). Elsewhere (`_blocked` false) both forms run as one batched softmax.
    On TPU the prefill form (Tq == Tk, no `mask`, no `key_bias`) runs the Pallas splash kernel
    instead (`prefill_route`, `_splash`).
    Returns ['B Tq H hd'].
    """
    b, tq, h, hd = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = hd ** -0.5 if scale is None else scale
    q = q * jnp.asarray(scale, q.dtype)
    if prefill_route(q.shape, k.shape, mask=mask, key_bias=key_bias)[0] == "splash":
        return _splash(q, k, v, key_valid, causal)
    add = jnp.zeros((b, tk), jnp.float32) if key_bias is None else key_bias.astype(jnp.float32)
    if mask is not None:
        s = jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(b, tq, kvh, g, hd), k, preferred_element_type=jnp.float32)
        s = jnp.where(mask[:, None, None], s + add[:, None, None, None, :], MASK_VALUE)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", p, v, preferred_element_type=jnp.float32)
        return out.reshape(b, tq, h, hd).astype(q.dtype)
    if causal and tq != tk:
        raise ValueError(f"causal attention needs as many queries as keys, got {tq} and {tk}")
    if not _blocked():  # one batched softmax: the mask form above
        ok = jnp.ones((b, tk), bool) if key_valid is None else key_valid
        mask = ok[:, None, :] & (jnp.tril(jnp.ones((tq, tk), bool))[None] if causal else True)
        return attention(q, k, v, mask, key_bias, scale=1.0)  # q is scaled already
    if key_valid is not None:
        add = jnp.where(key_valid, add, MASK_VALUE)
    n = max(1, -(-h * tq * tk // block_elems))  # query chunks
    if causal:
        n = max(n, min(tq // 128, 8))  # smaller chunks skip more of the masked triangle
    c = -(-tq // n)
    n = -(-tq // c)
    pad = n * c - tq
    # queries ['B n KVH G*C hd'] (chunk-major, each block one matmul per kv head), keys ['B KVH hd Tk']
    qb = jnp.pad(q.reshape(b, tq, kvh, g, hd), ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    qb = qb.reshape(b, n, c, kvh, g, hd).transpose(0, 1, 3, 4, 2, 5).reshape(b, n, kvh, g * c, hd)
    kt, vt = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)

    def block(bi, ci, end):
        s = jnp.einsum("kmd,kds->kms", qb[bi, ci], kt[bi, :, :, :end], preferred_element_type=jnp.float32)
        s = s + add[bi, :end]
        if causal:
            qpos = jnp.tile(ci * c + jnp.arange(c), g)
            s = jnp.where(qpos[:, None] >= jnp.arange(end)[None, :], s, MASK_VALUE)
        s = s - s.max(-1, keepdims=True)
        p = jnp.exp(s)
        o = jnp.einsum("kms,ksd->kmd", p.astype(v.dtype), vt[bi, :, :end], preferred_element_type=jnp.float32)
        return o / p.sum(-1)[..., None]

    # a loop (lax.map) over blocks, not unrolled copies: XLA:CPU runs the looped blocks faster
    if not causal:
        out = _map(lambda i: block(i // n, i % n, tk), b * n).reshape(b, n, kvh, g * c, hd)
    else:  # chunk ci sees keys [0, (ci + 1) c): one loop over rows per chunk
        out = jnp.stack([_map(lambda bi, ci=ci: block(bi, ci, min(tk, (ci + 1) * c)), b) for ci in range(n)], 1)
    out = out.reshape(b, n, kvh, g, c, hd).transpose(0, 1, 4, 2, 3, 5).reshape(b, n * c, h, hd)
    return out[:, :tq].astype(q.dtype)


def _blocked() -> bool:
    """Whether attention runs the CPU blocking (loops over rows and query chunks): on a CPU backend
    outside a mesh only. Under a mesh a loop over batch rows makes the partitioner gather every data
    shard's rows (each chip would compute the whole batch's attention; seen in the TPU compiler's
    HLO, tests/test_aot.py), and accelerators want one large fused softmax."""
    return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty


def _map(f, count: int) -> jax.Array:
    """f(i) stacked over i < count, as one loop (a single call when count is 1)."""
    return jax.lax.map(f, jnp.arange(count)) if count > 1 else f(jnp.int32(0))[None]


# ----------------------------------------------------------------------------------------------
# Prefill attention on TPU: the Pallas splash-attention kernel


# "auto": splash on TPU, XLA elsewhere; "xla": always XLA; "splash": splash wherever it applies (off
# TPU in Pallas interpret mode: slow, for tests). Read when a program is traced, so a jitted function
# keeps the backend of its first trace.
BACKENDS = ("auto", "xla", "splash")
ATTENTION_BACKEND = os.environ.get("AFFJAX_ATTENTION", "auto")
if ATTENTION_BACKEND not in BACKENDS:
    raise ValueError(f"AFFJAX_ATTENTION={ATTENTION_BACKEND!r}: give one of {', '.join(BACKENDS)}")


@contextlib.contextmanager
def attention_backend(name: str):
    """Trace under another ATTENTION_BACKEND (tests, benchmarks)."""
    global ATTENTION_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: give one of {', '.join(BACKENDS)}")
    old, ATTENTION_BACKEND = ATTENTION_BACKEND, name
    try:
        yield
    finally:
        ATTENTION_BACKEND = old


def _platform() -> str:
    """The platform a program is traced for: the mesh's devices under `jax.set_mesh` (compile-only
    TPU devices have a CPU default backend), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = None if mesh.empty else mesh.abstract_device
    return dev.platform if dev is not None else jax.default_backend()


def prefill_route(q_shape, k_shape, *, mask=None, key_bias=None) -> tuple[str, str]:
    """("splash" | "xla", why): the one place the attention backend is chosen.

    Splash runs self-attention over a whole sequence with a static mask (causal or full) and
    segment ids (key padding). Everything else stays on XLA: an explicit `mask`, decode steps and
    cross-attention (Tq != Tk), and a `key_bias` (the `proportional` option's log group sizes:
    splash adds no bias to its logits, so such layers run the XLA softmax)."""
    if ATTENTION_BACKEND == "xla" or (ATTENTION_BACKEND == "auto" and _platform() != "tpu"):
        return "xla", f"backend {ATTENTION_BACKEND} on {_platform()}"
    if mask is not None:
        return "xla", "explicit (Tq, Tk) mask"
    if q_shape[1] != k_shape[1]:
        return "xla", "not a prefill (Tq != Tk: decode step, cache or cross-attention)"
    if key_bias is not None:
        return "xla", "key bias (proportional pooling): splash takes no additive bias"
    if q_shape[2] % k_shape[2]:
        return "xla", "query heads not a multiple of KV heads"
    if q_shape[3] % 64:
        return "xla", f"head_dim {q_shape[3]} (splash wants a multiple of 64 on TPU)"
    return "splash", "prefill on TPU"


SPLASH_BLOCK = 128  # sequence lengths are padded to a multiple of this (splash's smallest block)


def _splash(q, k, v, key_valid, causal: bool) -> jax.Array:
    """Splash attention for q ['B T H hd'] (scaled already), k/v ['B T KVH hd'] -> ['B T H hd'].

    Key padding is a segment id: every query has id 1, valid keys 1, padding keys 0, so a query
    sees exactly the valid keys (and, under `causal`, those up to itself), as on the XLA path. A
    query that sees no valid key (a dummy row) gets an average of the masked values instead of
    XLA's uniform softmax over every key: finite either way, and never read. T is padded to a
    multiple of SPLASH_BLOCK with padding keys (our buckets are multiples of 4, not of 128).
    Under a mesh the kernel runs per shard (`shard_map`: rows over data, heads over model), since
    the partitioner cannot split a custom call and would gather every row onto each chip."""
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    valid = jnp.ones((b, t), bool) if key_valid is None else key_valid
    seg_kv = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, tp - t)))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # ['B H T hd']
    interpret = _platform() != "tpu"  # a Pallas TPU kernel runs elsewhere only interpreted

    def rows(q, k, v, seg_kv):
        kernel = _splash_kernel(q.shape[1], tp, causal, interpret)
        seg = lambda s: _sa().SegmentIds(jnp.ones_like(s), s)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=seg(s)))(q, k, v, seg_kv)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        from jax.sharding import PartitionSpec as P

        from affjax.runtime.sharding import LOGICAL_RULES
        axis = lambda name, *sizes: (LOGICAL_RULES[name] if LOGICAL_RULES[name] in mesh.shape and
                                     all(n % mesh.shape[LOGICAL_RULES[name]] == 0 for n in sizes) else None)
        data, model = axis("batch", b), axis("heads", h, kvh)
        spec = P(data, model, None, None)
        rows = jax.shard_map(rows, in_specs=(spec, spec, spec, P(data, None)), out_specs=spec, check_vma=False)
    out = rows(pad(q), pad(k), pad(v), seg_kv)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _sa():
    from jax.experimental.pallas.ops.tpu import splash_attention
    return splash_attention


def _splash_kernel(heads: int, t: int, causal: bool, interpret: bool):
    """One row's kernel: q ['H T hd'], k/v ['KVH T hd'] (grouped heads: head i reads KV head
    i // (H / KVH)). The block is the largest of 512, 256, 128 dividing T; backward blocks are set
    so that the kernel also differentiates (training)."""
    sa = _sa()
    blk = next(n for n in (512, 256, 128) if t % n == 0)
    one = sa.CausalMask((t, t)) if causal else sa.FullMask((t, t))
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
