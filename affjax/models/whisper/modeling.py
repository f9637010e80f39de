"""Whisper audio encoder in Flax NNX.

The same module serves Whisper (no pool) and Qwen2-Audio's audio tower (Whisper-large-v3 encoder
followed by a stride-2 average pool before the final LayerNorm): `avg_pool=2` switches it on.
Every shape comes from the config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from affjax.layers import Conv1d, LayerNorm, attention, linear


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    num_mel_bins: int = 80
    d_model: int = 384
    layers: int = 4
    heads: int = 6
    ffn_dim: int = 1536
    max_source_positions: int = 1500
    avg_pool: int = 0  # 2 for Qwen2-Audio's audio tower, 0 for Whisper
    activation: str = "gelu"

    @classmethod
    def from_hf(cls, c: dict, *, avg_pool: int = 0) -> "EncoderConfig":
        return cls(
            num_mel_bins=c["num_mel_bins"], d_model=c["d_model"], layers=c["encoder_layers"],
            heads=c["encoder_attention_heads"], ffn_dim=c["encoder_ffn_dim"],
            max_source_positions=c["max_source_positions"], avg_pool=avg_pool,
            activation=c.get("activation_function", "gelu"))

    @property
    def mel_frames(self) -> int:
        """Feature frames the encoder expects (conv2 halves them)."""
        return self.max_source_positions * 2

    @property
    def out_frames(self) -> int:
        return self.max_source_positions // self.avg_pool if self.avg_pool else self.max_source_positions

    def output_lengths(self, feature_frames):
        """Valid encoder output frames for a clip of `feature_frames` mel frames (ints or arrays)."""
        after_conv = (feature_frames - 1) // 2 + 1
        if self.avg_pool:
            return (after_conv - 2) // 2 + 1
        return after_conv


def _act(name: str):
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unsupported activation {name!r}")


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.d_model
        self.heads = cfg.heads
        self.self_attn_layer_norm = LayerNorm(d, dtype=dtype)
        self.q_proj = linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d, d, bias=False, dtype=dtype, rngs=rngs)  # Whisper has no k bias
        self.v_proj = linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, dtype=dtype)
        self.fc1 = linear(d, cfg.ffn_dim, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = linear(cfg.ffn_dim, d, bias=True, dtype=dtype, rngs=rngs)
        self.act = _act(cfg.activation)

    def __call__(self, x: jax.Array, mask: jax.Array, key_bias: jax.Array | None = None) -> jax.Array:
        b, t, d = x.shape
        h = self.self_attn_layer_norm(x)
        split = lambda y: y.reshape(b, -1, self.heads, d // self.heads)
        a = attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), mask, key_bias)
        x = x + self.out_proj(a.reshape(b, t, d))
        h = self.final_layer_norm(x)
        return x + self.fc2(self.act(self.fc1(h)))


class AudioEncoder(nnx.Module):
    """mel features ['B n_mels F'] (channels first, as the feature extractor gives them) -> ['B T D']."""

    def __init__(self, cfg: EncoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = Conv1d(cfg.num_mel_bins, d, kernel=3, stride=1, padding=1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv1d(d, d, kernel=3, stride=2, padding=1, dtype=dtype, rngs=rngs)
        self.embed_positions = nnx.Param(jnp.zeros((cfg.max_source_positions, d), dtype))
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.layers)])
        self.layer_norm = LayerNorm(d, dtype=dtype)

    def embed(self, features: jax.Array) -> jax.Array:
        """Conv stem plus the stored position table. features: ['B n_mels F'] -> ['B F/2 D']."""
        dtype = self.embed_positions.dtype
        x = jnp.swapaxes(features, 1, 2).astype(dtype)
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        return x + self.embed_positions[...][: x.shape[1]]

    def key_mask(self, feature_lengths: jax.Array | None, frames: int, batch: int) -> jax.Array:
        """Bool['B T T']: Qwen2-Audio masks keys past each clip's length; Whisper masks nothing."""
        if feature_lengths is None:
            return jnp.ones((batch, frames, frames), bool)
        valid = jnp.arange(frames)[None, :] < ((feature_lengths - 1) // 2 + 1)[:, None]
        return jnp.broadcast_to(valid[:, None, :], (batch, frames, frames))

    def run_layers(self, x, mask, start: int = 0, end: int | None = None, key_bias=None):
        for layer in self.layers[start:end]:
            x = layer(x, mask, key_bias)
        return x

    def finish(self, x: jax.Array) -> jax.Array:
        if self.cfg.avg_pool:
            b, t, d = x.shape
            p = self.cfg.avg_pool
            x = x[:, : t // p * p].reshape(b, t // p, p, d).astype(jnp.float32).mean(2).astype(x.dtype)
        return self.layer_norm(x)

    def __call__(self, features: jax.Array, feature_lengths: jax.Array | None = None) -> jax.Array:
        x = self.embed(features)
        mask = self.key_mask(feature_lengths, x.shape[1], x.shape[0])
        return self.finish(self.run_layers(x, mask))
