"""Qwen2 decoder (the language model of Qwen2-Audio) in Flax NNX.

RMSNorm, SwiGLU, q/k/v biases, rotate-half RoPE with theta from config, multi-head or
grouped-query attention, tied or untied LM head. A Llama checkpoint is the same network with zero
q/k/v biases, which is how SmolLM2's real weights check this module.

Layers take explicit masks and positions so that Affinity Pooling can shorten the sequence between
layers (positions may be fractional under the `mean` policy) and add log group sizes to the logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from affjax.models.layers import RMSNorm, apply_rope, attention, linear, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    intermediate: int = 1376
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    qkv_bias: bool = True

    @classmethod
    def from_hf(cls, c: dict) -> "TextConfig":
        rope = c.get("rope_parameters") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        if (rope.get("rope_type") or "default") != "default" or c.get("rope_scaling"):
            raise ValueError(f"unsupported RoPE scaling {rope or c.get('rope_scaling')}: only default RoPE")
        if c.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported (use_sliding_window=true)")
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
            heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate=c["intermediate_size"], rms_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=c.get("model_type", "qwen2") == "qwen2" or bool(c.get("attention_bias", False)))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs):
        self.cfg = cfg
        d, hd = cfg.hidden, cfg.head_dim
        self.q_proj = linear(d, cfg.heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d, cfg.kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d, cfg.kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = linear(cfg.heads * hd, d, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, key_valid, key_bias=None, cache=None, write=None):
        """x: ['B T D']; key_valid: Bool['B S']. Without a cache S = T, attention is causal over the
        packed sequence and the new keys are returned; with cache=(K, V) ['B S KVH hd'] the T new
        keys are written at slots write ['B T'] first and every valid cache slot is visible."""
        b, t, _ = x.shape
        c = self.cfg
        q = apply_rope(self.q_proj(x).reshape(b, t, c.heads, c.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, c.kv_heads, c.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, c.kv_heads, c.head_dim)
        if cache is not None:
            rows = jnp.arange(b)[:, None]
            k = cache[0].at[rows, write].set(k.astype(cache[0].dtype))
            v = cache[1].at[rows, write].set(v.astype(cache[1].dtype))
        out = attention(q, k, v, key_bias=key_bias, key_valid=key_valid, causal=cache is None)
        return self.o_proj(out.reshape(b, t, c.heads * c.head_dim)), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs):
        self.gate_proj = linear(cfg.hidden, cfg.intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = linear(cfg.hidden, cfg.intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = linear(cfg.intermediate, cfg.hidden, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden, eps=cfg.rms_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, eps=cfg.rms_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, key_valid, key_bias=None, cache=None, write=None):
        a, kv = self.self_attn(self.input_layernorm(x), cos, sin, key_valid, key_bias, cache, write)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden), dtype) * 0.02)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.hidden, eps=cfg.rms_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden), dtype) * 0.02)

    def embed(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], ids, axis=0)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm + LM head. h: ['... D'] -> Float32['... V']."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return jnp.einsum("...d,vd->...v", self.norm(h), w[...], preferred_element_type=jnp.float32)

    def decode(self, x: jax.Array, valid: jax.Array, *, keep_after: int | None = None):
        """The layers over right-padded embeddings x ['B T D'] at positions 0..T-1, no cache ->
        (h before the final norm, the hidden state after layer `keep_after`, or None)."""
        pos = jnp.arange(x.shape[1], dtype=jnp.float32)[None].repeat(x.shape[0], 0)
        cos, sin = rope_for(self.cfg, pos, x.dtype)
        kept = None
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, cos, sin, valid)
            if i == keep_after:
                kept = x
        return x, kept

    def __call__(self, ids: jax.Array, valid: jax.Array) -> jax.Array:
        """Plain causal forward for right-padded ids ['B T'] -> logits ['B T V'] (tests, small inputs)."""
        return self.logits(self.decode(self.embed(ids), valid)[0])


def rope_for(cfg: TextConfig, pos, dtype):
    return rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, dtype)
