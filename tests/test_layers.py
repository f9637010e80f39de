"""The shared attention and activation code against PyTorch (float32).

`layers.attention` blocks the work (query chunks of every head at once, padded to whole chunks, a
loop over rows and chunks, causal chunks reading only the keys up to their last query): each shape
below takes a different path through that blocking, and all must equal PyTorch's
`scaled_dot_product_attention` with the same additive mask. Rows whose query sees no valid key are
padding (their output is never read) and are left out of the comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from affjax.models.layers import attention, map_rows
from affjax.models.whisper.modeling import _gelu_exact

ATOL = 1e-5


def _torch_attention(q, k, v, key_valid, key_bias, causal):
    """PyTorch SDPA with the same visibility: float mask = bias on visible keys, -inf elsewhere."""
    b, tq, h, hd = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    tq_, tk_, tv_ = (torch.from_numpy(np.asarray(x)).transpose(1, 2) for x in (q, k, v))
    tk_ = tk_.repeat_interleave(h // kvh, dim=1)
    tv_ = tv_.repeat_interleave(h // kvh, dim=1)
    see = np.broadcast_to(key_valid[:, None, :], (b, tq, tk)).copy()
    if causal:
        see &= np.tril(np.ones((tq, tk), bool))[None]
    bias = np.broadcast_to(key_bias[:, None, :], (b, tq, tk))
    mask = torch.from_numpy(np.where(see, bias, -np.inf).astype(np.float32))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(tq_, tk_, tv_, attn_mask=mask)
    return out.transpose(1, 2).numpy(), see.any(-1)


@pytest.mark.parametrize("b,t,h,kvh,causal,block_elems", [
    (1, 300, 6, 6, False, 5 << 19),     # one chunk, one row: no loop
    (3, 300, 6, 6, False, 100_000),     # several chunks (300 = 6 x 50 queries), loop over rows x chunks
    (2, 257, 4, 2, False, 60_000),      # grouped-query, a chunk size that pads the last chunk
    (1, 333, 8, 8, True, 5 << 19),      # causal: the 128-query minimum makes 2 chunks
    (3, 700, 4, 1, True, 5 << 19),      # causal, multi-query, 5 chunks of 140, loop over rows
    pytest.param(2, 517, 8, 4, True, 40_000,  # causal, many small chunks, the last one padded
                 marks=pytest.mark.slow),
])
def test_attention_matches_torch_sdpa(b, t, h, kvh, causal, block_elems):
    rng = np.random.default_rng(b * 1000 + t)
    q = rng.standard_normal((b, t, h, 64)).astype(np.float32)
    k = rng.standard_normal((b, t, kvh, 64)).astype(np.float32)
    v = rng.standard_normal((b, t, kvh, 64)).astype(np.float32)
    lengths = rng.integers(t // 2, t + 1, b)
    lengths[0] = t
    key_valid = np.arange(t)[None] < lengths[:, None]
    key_valid[:, 5] = False  # a hole inside the valid run too
    key_bias = np.log(rng.integers(1, 6, (b, t))).astype(np.float32)  # proportional pooling's log sizes
    ours = np.asarray(jax.jit(lambda q, k, v: attention(
        q, k, v, key_bias=jnp.asarray(key_bias), key_valid=jnp.asarray(key_valid), causal=causal,
        block_elems=block_elems))(q, k, v))
    ref, seen = _torch_attention(q, k, v, key_valid, key_bias, causal)
    assert seen.sum() > 0.9 * seen.size
    np.testing.assert_allclose(ours[seen], ref[seen], atol=ATOL, rtol=0)


def test_causal_attention_needs_square_inputs():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(q, jnp.zeros((1, 6, 2, 8)), jnp.zeros((1, 6, 2, 8)), key_valid=jnp.ones((1, 6), bool), causal=True)


def test_map_rows_equals_the_batched_call():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 4)).astype(np.float32))
    n = jnp.asarray([5, 2, 4])
    fn = lambda x, n: jnp.cumsum(x, axis=1) * (jnp.arange(5)[None, :, None] < n[:, None, None])
    got = jax.jit(lambda x, n: map_rows(fn, x, n))(x, n)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(fn(x, n)))


def test_map_groups_equals_the_batched_call():
    """Sequential steps of strided rows (map_rows' rows_per_step) give the rows back in order."""
    from affjax.models.layers import map_groups
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((12, 5, 4)).astype(np.float32))
    n = jnp.asarray(rng.integers(1, 6, 12))
    fn = lambda x, n: (jnp.cumsum(x, axis=1) * (jnp.arange(5)[None, :, None] < n[:, None, None]),  # noqa: E731
                       x.sum((1, 2)) * n)
    want = fn(x, n)
    for steps in (1, 3, 4, 12):
        got = jax.jit(lambda x, n: map_groups(fn, (x, n), steps))(x, n)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_gelu_matches_torch_exact_gelu():
    x = np.linspace(-12, 12, 20001, dtype=np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(_gelu_exact(jnp.asarray(x))), ref, atol=2e-6, rtol=0)


def test_abstract_module_is_eval_shape_of_the_model():
    """The host-counted abstract build gives the same tree, shapes and dtypes as nnx.eval_shape
    with a plain nnx.Rngs, and every leaf is abstract."""
    from flax import nnx

    from affjax.models.layers import abstract_module
    from affjax.models.qwen2_audio.modeling import Qwen2Audio, Qwen2AudioConfig
    from affjax.runtime.plan import tiny_config

    cfg = Qwen2AudioConfig.from_hf(tiny_config())
    got = abstract_module(lambda rngs: Qwen2Audio(cfg, dtype=jnp.bfloat16, rngs=rngs))
    want = nnx.eval_shape(lambda: Qwen2Audio(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert nnx.graphdef(got) == nnx.graphdef(want)
    leaves = lambda m: [(x.shape, x.dtype, type(x)) for x in jax.tree.leaves(nnx.state(m))]  # noqa: E731
    assert leaves(got) == leaves(want) and len(leaves(got)) > 20
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(got)))
