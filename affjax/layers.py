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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              key_bias: jax.Array | None = None, scale: float | None = None) -> jax.Array:
    """Grouped-query attention with an explicit mask.

    q: ['B Tq H hd'], k/v: ['B Tk KVH hd'], mask: Bool['B Tq Tk'] (True = attend),
    key_bias: Float['B Tk'] added to every query's logit for that key (log group size under
    `proportional` pooling), or None. Returns ['B Tq H hd'].
    """
    b, tq, h, hd = q.shape
    kvh = k.shape[2]
    scale = hd ** -0.5 if scale is None else scale
    qg = q.reshape(b, tq, kvh, h // kvh, hd)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, None, :].astype(jnp.float32)
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, hd).astype(q.dtype)


def causal_mask(valid: jax.Array) -> jax.Array:
    """Bool['B T T'] for a packed (right-padded) sequence: key j <= query i and key j valid."""
    t = valid.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    return causal[None] & valid[:, None, :]
