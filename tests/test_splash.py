"""Splash attention (Pallas, TPU) for the prefill: numerics on CPU in Pallas interpret mode against
the XLA path, and compilation by the real TPU compiler on compile-only devices (libtpu)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import need_module
from affjax.models.layers import attention, attention_backend, prefill_route

TOL = 2e-5  # float32: the kernel's online softmax against one softmax; observed max error ~1e-6


def _qkv(b, t, h, kvh, hd, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (b, t, h, hd), dtype), jax.random.normal(ks[1], (b, t, kvh, hd), dtype),
            jax.random.normal(ks[2], (b, t, kvh, hd), dtype))


def _both(q, k, v, valid, causal):
    """(XLA, splash in interpret mode) outputs of the same call."""
    outs = []
    for name in ("xla", "splash"):
        with attention_backend(name):
            f = lambda q, k, v, valid: attention(q, k, v, key_valid=valid, causal=causal)
            kernels = str(jax.make_jaxpr(f)(q, k, v, valid)).count("pallas_call")
            assert kernels == (name == "splash"), (name, kernels)  # the kernel runs, interpreted
            outs.append(np.asarray(jax.jit(f)(q, k, v, valid)))
    return outs


def test_splash_matches_xla_causal_gqa_padded():
    """Decoder prefill: causal, GQA (4 query heads on 2 KV heads), rows of 200 and 77 valid
    positions in T = 200 (padded to 256 inside, the kernel's block multiple)."""
    q, k, v = _qkv(2, 200, 4, 2, 128)
    valid = jnp.arange(200)[None] < jnp.array([[200], [77]])
    ref, got = _both(q, k, v, valid, causal=True)
    for row, n in enumerate((200, 77)):  # padding queries are never read
        np.testing.assert_allclose(got[row, :n], ref[row, :n], atol=TOL, rtol=0)
    assert np.isfinite(got).all()


def test_splash_matches_xla_full_mask_and_dummy_row():
    """Encoder form (Whisper's head_dim 64): no causal mask, padding keys hidden; a dummy row (no
    valid key) stays finite."""
    q, k, v = _qkv(3, 256, 2, 2, 64)
    valid = jnp.arange(256)[None] < jnp.array([[256], [130], [0]])
    ref, got = _both(q, k, v, valid, causal=False)
    np.testing.assert_allclose(got[:2], ref[:2], atol=TOL, rtol=0)
    assert np.isfinite(got).all()


def test_splash_gradient_matches_xla():
    """Training differentiates through the kernel (its dq and dkv kernels): gradients of a loss
    over the valid queries match the XLA path's."""
    q, k, v = _qkv(2, 128, 2, 1, 128)
    n = jnp.array([128, 77])
    valid = jnp.arange(128)[None] < n[:, None]
    w = valid[:, :, None, None].astype(jnp.float32)
    grads = []
    for name in ("xla", "splash"):
        with attention_backend(name):
            loss = lambda q, k, v: (attention(q, k, v, key_valid=valid, causal=True) * w).sum()
            grads.append(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    for ref, got in zip(*grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=5 * TOL, rtol=0)  # |grad| up to ~10


def test_route():
    """The one place the backend is chosen: splash only for a bias-free prefill; XLA on CPU by default."""
    qs, ks = (2, 256, 4, 128), (2, 256, 2, 128)
    assert prefill_route(qs, ks)[0] == "xla"  # auto on CPU
    with attention_backend("splash"):
        assert prefill_route(qs, ks) == ("splash", "prefill on TPU")
        assert "bias" in prefill_route(qs, ks, key_bias=jnp.zeros((2, 256)))[1]
        assert "decode" in prefill_route((2, 1, 4, 128), ks)[1]
        assert prefill_route(qs, ks, mask=jnp.ones((2, 256, 256), bool))[0] == "xla"
        assert "head_dim" in prefill_route((2, 256, 4, 40), (2, 256, 2, 40))[1]
    with pytest.raises(ValueError):
        with attention_backend("flash"):
            pass


# ----------------------------------------------------------------------------------------------
# TPU compile (compile-only devices)


@pytest.fixture(scope="module")
def aot():
    from affjax.runtime import aot
    need_module("libtpu", aot.INSTALL)
    return aot


def _compile(aot, mesh, fn, *shapes):
    rep, compiled = aot.compile_program("attn", jax.jit(fn), shapes, {}, mesh)
    assert rep.fits, rep.error
    return rep, compiled.as_text()


def _rows(mesh, shape, dtype, spec=("data",)):
    from jax.sharding import NamedSharding, PartitionSpec as P
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))


def test_splash_compiles_for_tpu(aot):
    """Auto backend under a v5e mesh: the prefill is the Pallas kernel (tpu_custom_call), run per
    shard (no all-gather at data=2,model=2; heads split over model), and fits VMEM at T = 1024 (block
    512) with head_dim 128 and 64. With a key bias (proportional) the same call is XLA's."""
    mesh = aot.tpu_mesh("v5e:2x2", "data=2,model=2")
    for t, hd in ((1024, 128), (200, 64)):
        q = _rows(mesh, (4, t, 8, hd), jnp.bfloat16, ("data", None, "model"))
        kv = _rows(mesh, (4, t, 2, hd), jnp.bfloat16, ("data", None, "model"))
        valid = _rows(mesh, (4, t), jnp.bool_)
        prefill = lambda q, k, v, m: attention(q, k, v, key_valid=m, causal=True)
        rep, text = _compile(aot, mesh, prefill, q, kv, kv, valid)
        assert "tpu_custom_call" in text, (t, hd)
        assert "all-gather" not in rep.collectives, rep.collectives
    bias = _rows(mesh, (4, 200), jnp.float32)
    _, text = _compile(aot, mesh, lambda q, k, v, m, b: attention(q, k, v, key_bias=b, key_valid=m, causal=True),
                       q, kv, kv, valid, bias)
    assert "tpu_custom_call" not in text


def test_decoder_layer_uses_splash_on_tpu(aot):
    """One Qwen2 decoder layer (head_dim 128, GQA 4/2), prefill, bf16, data=4 on v5e:2x2."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from affjax.models.layers import abstract_module
    from affjax.models.qwen2.modeling import DecoderLayer, TextConfig, rope_for
    cfg = TextConfig(hidden=512, heads=4, kv_heads=2, head_dim=128, intermediate=1024)
    graphdef, state = nnx.split(abstract_module(lambda rngs: DecoderLayer(cfg, dtype=jnp.bfloat16, rngs=rngs)))
    mesh = aot.tpu_mesh("v5e:2x2", "data=4,model=1")
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), state)

    def prefill(state, x, valid):
        pos = jnp.arange(x.shape[1], dtype=jnp.float32)[None].repeat(x.shape[0], 0)
        cos, sin = rope_for(cfg, pos, x.dtype)
        return nnx.merge(graphdef, state)(x, cos, sin, valid)[0]
    x = _rows(mesh, (8, 384, cfg.hidden), jnp.bfloat16)
    rep, text = _compile(aot, mesh, prefill, state, x, _rows(mesh, (8, 384), jnp.bool_))
    assert "tpu_custom_call" in text
    assert "all-gather" not in rep.collectives, rep.collectives
