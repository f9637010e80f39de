"""Building blocks shared by the models: norms, attention math, RoPE, convolution.

Norms, softmax and RoPE angles run in float32 whatever the parameter dtype, as the PyTorch
reference does; matrix products run in the parameter dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Additive mask value: finite, so a fully masked (padding) query row gives a uniform softmax
# instead of NaN, and padding rows never poison a batch.
MASK_VALUE = -1e30


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
              causal: bool = False, scale: float | None = None, block_elems: int = 1 << 20) -> jax.Array:
    """Grouped-query attention.

    q: ['B Tq H hd'], k/v: ['B Tk KVH hd']. Which keys a query sees is given either by
    `mask` Bool['B Tq Tk'] (True = attend; small inputs), or by `key_valid` Bool['B Tk'] plus
    `causal` (query i sees key j <= i). The second form never builds a (Tq, Tk) mask and loops over
    (row, kv head, query chunk) blocks so each score block stays in cache: on a CPU whose memory
    bandwidth is low, one (B, H, Tq, Tk) softmax through memory costs more than the matmuls.
    key_bias: Float['B Tk'] added to every query's logit for that key (log group size under
    `proportional` pooling). Returns ['B Tq H hd'].
    """
    b, tq, h, hd = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    scale = hd ** -0.5 if scale is None else scale
    q = q * jnp.asarray(scale, q.dtype)
    add = jnp.zeros((b, tk), jnp.float32) if key_bias is None else key_bias.astype(jnp.float32)
    if mask is not None:
        s = jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(b, tq, kvh, g, hd), k, preferred_element_type=jnp.float32)
        s = jnp.where(mask[:, None, None], s + add[:, None, None, None, :], MASK_VALUE)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", p, v, preferred_element_type=jnp.float32)
        return out.reshape(b, tq, h, hd).astype(q.dtype)
    if key_valid is not None:
        add = jnp.where(key_valid, add, MASK_VALUE)
    c = _chunk_size(tq, max(1, block_elems // (tk * g)))
    n_c = tq // c
    qb = q.reshape(b, n_c, c, kvh, g, hd).transpose(0, 3, 1, 2, 4, 5)  # ['B KVH nC C G hd']
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # ['B KVH Tk hd']

    def block(i):
        bi, ki, ci = i // (kvh * n_c), (i // n_c) % kvh, i % n_c
        s = jnp.einsum("cgd,sd->gcs", qb[bi, ki, ci], kt[bi, ki], preferred_element_type=jnp.float32)
        s = s + add[bi][None, None]
        if causal:
            keep = (ci * c + jnp.arange(c))[:, None] >= jnp.arange(tk)[None, :]
            s = jnp.where(keep[None], s, MASK_VALUE)
        s = s - s.max(-1, keepdims=True)
        p = jnp.exp(s)
        o = jnp.einsum("gcs,sd->cgd", p.astype(v.dtype), vt[bi, ki], preferred_element_type=jnp.float32)
        return o / p.sum(-1).T[..., None]

    out = jax.lax.map(block, jnp.arange(b * kvh * n_c)) if b * kvh * n_c > 1 else block(jnp.int32(0))[None]
    out = out.reshape(b, kvh, n_c, c, g, hd).transpose(0, 2, 3, 1, 4, 5)
    return out.reshape(b, tq, h, hd).astype(q.dtype)


def _chunk_size(t: int, most: int) -> int:
    """The largest divisor of t that is at most `most` (query rows per score block)."""
    if t <= most:
        return t
    return max(c for c in range(1, most + 1) if t % c == 0)
