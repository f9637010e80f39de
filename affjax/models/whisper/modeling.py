"""Whisper in Flax NNX: the audio encoder and the text decoder, with their configs (decoding and
transcription are in decoding.py, the CTranslate2 reader in ct2.py).

The encoder also serves Qwen2-Audio's audio tower (Whisper-large-v3 encoder followed by a stride-2
average pool before the final LayerNorm): `avg_pool=2` switches it on. Every shape comes from the
config. Static-shape policy for decoding: batches are padded to a fixed batch size, the encoder
sees 30 s of features, and the greedy loop is one jitted `lax.while_loop` over fixed buffers
(`decoding.greedy_decode`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from affjax.models.layers import MASK_VALUE, Conv1d, LayerNorm, attention, linear


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


def _gelu_exact(x):
    # PyTorch's exact GELU, 0.5 x (1 + erf(x / sqrt 2)); jax.nn.gelu's erfc form is 2x slower on XLA:CPU
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


def _act(name: str):
    # a module-level function, not a fresh lambda: it is part of the graphdef, and an equal graphdef
    # on every load is what lets a reloaded checkpoint reuse the compiled programs
    if name == "gelu":
        return _gelu_exact
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

    def __call__(self, x: jax.Array, key_valid: jax.Array | None, key_bias: jax.Array | None = None) -> jax.Array:
        """x: ['B T D']; key_valid: Bool['B T'] or None (all keys); key_bias: Float['B T'] or None."""
        b, t, d = x.shape
        h = self.self_attn_layer_norm(x)
        split = lambda y: y.reshape(b, -1, self.heads, d // self.heads)
        a = attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), key_bias=key_bias,
                      key_valid=key_valid)
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
        x = _gelu_exact(self.conv1(x))
        x = _gelu_exact(self.conv2(x))
        return x + self.embed_positions[...][: x.shape[1]]

    def key_valid(self, feature_lengths: jax.Array | None, frames: int) -> jax.Array | None:
        """Bool['B T']: Qwen2-Audio masks keys past each clip's length; Whisper masks nothing (None)."""
        if feature_lengths is None:
            return None
        return jnp.arange(frames)[None, :] < ((feature_lengths - 1) // 2 + 1)[:, None]

    def run_layers(self, x, key_valid, start: int = 0, end: int | None = None, key_bias=None):
        for layer in self.layers[start:end]:
            x = layer(x, key_valid, key_bias)
        return x

    def finish(self, x: jax.Array) -> jax.Array:
        if self.cfg.avg_pool:
            b, t, d = x.shape
            p = self.cfg.avg_pool
            x = x[:, : t // p * p].reshape(b, t // p, p, d).astype(jnp.float32).mean(2).astype(x.dtype)
        return self.layer_norm(x)

    def __call__(self, features: jax.Array, feature_lengths: jax.Array | None = None) -> jax.Array:
        x = self.embed(features)
        return self.finish(self.run_layers(x, self.key_valid(feature_lengths, x.shape[1])))


# ==============================================================================================
# Whisper: encoder + text decoder, greedy transcription


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """The whole Whisper model: the audio encoder plus the text decoder and its special ids."""
    encoder: EncoderConfig = EncoderConfig()
    vocab_size: int = 51864
    decoder_layers: int = 4
    decoder_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_target_positions: int = 448
    activation: str = "gelu"
    eos_token_id: int = 50256
    decoder_start_token_id: int = 50257
    # Greedy decoding never picks these (as transformers' generate with the checkpoint's generation
    # config): `suppress_tokens` at every step, `begin_suppress_tokens` at the first generated one.
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()

    @property
    def d_model(self) -> int:
        return self.encoder.d_model

    @property
    def is_multilingual(self) -> bool:
        """Transformers' rule: multilingual vocabularies have a language and task slot in the prompt."""
        return self.vocab_size >= 51865

    @classmethod
    def from_hf(cls, c: dict) -> "WhisperConfig":
        """From an HF `WhisperConfig` dict (`config.to_dict()` or `ct2_hf_config`)."""
        if c.get("scale_embedding"):
            raise ValueError("scale_embedding=True is not supported (no Whisper checkpoint uses it)")
        eos = c["eos_token_id"]
        return cls(
            encoder=EncoderConfig.from_hf(c, avg_pool=0), vocab_size=c["vocab_size"],
            decoder_layers=c["decoder_layers"], decoder_heads=c["decoder_attention_heads"],
            decoder_ffn_dim=c["decoder_ffn_dim"], max_target_positions=c["max_target_positions"],
            activation=c.get("activation_function", "gelu"),
            eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
            decoder_start_token_id=c["decoder_start_token_id"],
            suppress_tokens=tuple(int(i) for i in c.get("suppress_tokens") or ()),
            begin_suppress_tokens=tuple(int(i) for i in c.get("begin_suppress_tokens") or ()))


class Attention(nnx.Module):
    """Whisper multi-head attention projections: q, v and out have biases, k has none."""

    def __init__(self, d: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.q_proj = linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d, d, bias=False, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = linear(d, d, bias=True, dtype=dtype, rngs=rngs)

    def _split(self, y: jax.Array) -> jax.Array:
        b, t, d = y.shape
        return y.reshape(b, t, self.heads, d // self.heads)

    def kv(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """['B T D'] -> k, v: ['B T H hd']."""
        return self._split(self.k_proj(h)), self._split(self.v_proj(h))

    def kv_heads_first(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """['B S D'] -> k, v: ['B H S hd'], the layout `cross` reads (see there)."""
        k, v = self.kv(h)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, h: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                 key_bias: jax.Array | None = None) -> jax.Array:
        b, t, d = h.shape
        a = attention(self._split(self.q_proj(h)), k, v, mask, key_bias)
        return self.out_proj(a.reshape(b, t, d))

    def cross(self, h: jax.Array, kt: jax.Array, vt: jax.Array, key_valid: jax.Array | None,
              key_bias: jax.Array | None = None, *, with_weights: bool = False):
        """Cross-attention over keys stored heads first, kt/vt: ['B H S hd'] (from `kv_heads_first`).

        Same arithmetic as `affjax.models.layers.attention` (q scaled in its dtype, bias added to the
        logits, masked keys at MASK_VALUE, float32 softmax). The layout is for speed: a decoding
        step has one query per row against ~1500 encoder frames, and with keys stored ['B S H hd']
        XLA:CPU transposes all of them at every step (10x slower on this kind of machine).
        key_valid: Bool['B S'] or None (every key); key_bias: Float['B S'] or None.
        with_weights: also return the attention weights, float32 ['B H T S'] (word alignment,
        affjax.eval.alignment); off by default, and then nothing extra is kept.
        """
        b, t, d = h.shape
        hd = d // self.heads
        q = self._split(self.q_proj(h))
        q = q * jnp.asarray(hd ** -0.5, q.dtype)
        s = jnp.einsum("bthd,bhsd->bhts", q, kt, preferred_element_type=jnp.float32)
        if key_bias is not None:
            s = s + key_bias.astype(jnp.float32)[:, None, None, :]
        if key_valid is not None:
            s = jnp.where(key_valid[:, None, None, :], s, MASK_VALUE)
        w = jax.nn.softmax(s, axis=-1)
        a = jnp.einsum("bhts,bhsd->bthd", w.astype(vt.dtype), vt, preferred_element_type=jnp.float32).astype(q.dtype)
        out = self.out_proj(a.reshape(b, t, d))
        return (out, w) if with_weights else out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.d_model
        self.self_attn_layer_norm = LayerNorm(d, dtype=dtype)
        self.self_attn = Attention(d, cfg.decoder_heads, dtype=dtype, rngs=rngs)
        self.encoder_attn_layer_norm = LayerNorm(d, dtype=dtype)
        self.encoder_attn = Attention(d, cfg.decoder_heads, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, dtype=dtype)
        self.fc1 = linear(d, cfg.decoder_ffn_dim, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = linear(cfg.decoder_ffn_dim, d, bias=True, dtype=dtype, rngs=rngs)
        self.act = _act(cfg.activation)

    def __call__(self, x, self_mask, cross_kv, cross_valid, cross_bias=None, cache=None, pos=None,
                 with_weights: bool = False):
        """x: ['B T D']; self_mask: Bool['B T Tk']; cross_kv: (k, v) ['B H S hd'] (heads first);
        cross_valid: Bool['B S'] or None (every frame); cache: (k, v) ['B Tmax H hd'] written at
        `pos`, or None (full pass). Returns (x, cache), and with_weights the cross-attention weights
        float32 ['B H T S'] third."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.kv(h)
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, pos, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, pos, 0, 0))
            cache = (k, v)
        x = x + self.self_attn(h, k, v, self_mask)
        h = self.encoder_attn_layer_norm(x)
        out = self.encoder_attn.cross(h, *cross_kv, cross_valid, cross_bias, with_weights=with_weights)
        a, w = out if with_weights else (out, None)
        x = x + a
        h = self.final_layer_norm(x)
        x = x + self.fc2(self.act(self.fc1(h)))
        return (x, cache, w) if with_weights else (x, cache)


class WhisperDecoder(nnx.Module):
    """Text decoder: tokens ['B T'] + encoder output ['B S D'] -> float32 logits ['B T V'].

    Token embedding tied to the output projection, learned positions, pre-LN layers (causal
    self-attention, cross-attention, GELU MLP), final LayerNorm. Cross-attention takes a key-valid
    mask Bool['B S'] and an optional additive key bias Float['B S'] (log group size for pooled
    encoder outputs), so the encoder output may be shortened or pooled.
    """

    def __init__(self, cfg: WhisperConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        self.embed_tokens = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, d), dtype) * 0.02)
        self.embed_positions = nnx.Param(jnp.zeros((cfg.max_target_positions, d), dtype))
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.decoder_layers)])
        self.layer_norm = LayerNorm(d, dtype=dtype)

    # -- pieces ---------------------------------------------------------------------------------
    def embed(self, tokens: jax.Array, start) -> jax.Array:
        """tokens ['B T'] at positions start .. start+T-1 (start: int or traced scalar)."""
        t = tokens.shape[1]
        pos = jax.lax.dynamic_slice_in_dim(self.embed_positions[...], start, t, axis=0)
        return jnp.take(self.embed_tokens[...], tokens, axis=0) + pos[None]

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.layer_norm(x)
        return jnp.einsum("btd,vd->btv", x, self.embed_tokens[...], preferred_element_type=jnp.float32)

    def cross_kv(self, enc: jax.Array) -> tuple:
        """Per-layer cross-attention (k, v) ['B H S hd'] of the encoder output, computed once."""
        enc = enc.astype(self.embed_tokens.dtype)
        return tuple(layer.encoder_attn.kv_heads_first(enc) for layer in self.layers)

    def init_cache(self, batch: int, length: int, dtype=None) -> tuple:
        """Zeroed self-attention KV cache: per layer (k, v) ['B length H hd']."""
        dtype = dtype or self.embed_tokens.dtype
        hd = self.cfg.d_model // self.cfg.decoder_heads
        z = lambda: jnp.zeros((batch, length, self.cfg.decoder_heads, hd), dtype)
        return tuple((z(), z()) for _ in self.layers)

    # -- forward modes --------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, enc: jax.Array, enc_valid: jax.Array | None = None,
                 enc_bias: jax.Array | None = None, *, cross_weights: bool = False):
        """Teacher-forced pass over the whole token sequence ['B T'] -> logits ['B T V'].
        cross_weights: return (logits, per-layer cross-attention weights float32 ['B H T S'])."""
        b, t = tokens.shape
        cross = self.cross_kv(enc)
        smask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b, t, t))
        x = self.embed(tokens, 0)
        weights = []
        for layer, kv in zip(self.layers, cross):
            x, _, *w = layer(x, smask, kv, enc_valid, enc_bias, with_weights=cross_weights)
            weights += w
        return (self.logits(x), tuple(weights)) if cross_weights else self.logits(x)

    def step(self, tokens: jax.Array, pos, cache: tuple, cross: tuple, enc_valid: jax.Array | None = None,
             enc_bias: jax.Array | None = None) -> tuple[jax.Array, tuple]:
        """Incremental decoding: tokens ['B T'] at positions pos .. pos+T-1 (same for every row),
        attending to the cache's first pos entries and to themselves causally.
        Returns (logits ['B T V'], updated cache)."""
        b, t = tokens.shape
        tmax = cache[0][0].shape[1]
        q_pos = pos + jnp.arange(t)
        smask = jnp.broadcast_to((jnp.arange(tmax)[None, :] <= q_pos[:, None])[None], (b, t, tmax))
        x = self.embed(tokens, pos)
        new_cache = []
        for layer, kv, c in zip(self.layers, cross, cache):
            x, c = layer(x, smask, kv, enc_valid, enc_bias, cache=c, pos=pos)
            new_cache.append(c)
        return self.logits(x), tuple(new_cache)


class Whisper(nnx.Module):
    """Whisper: `encoder` (AudioEncoder, no pool) + `decoder` (WhisperDecoder)."""

    def __init__(self, cfg: WhisperConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.encoder.avg_pool:
            raise ValueError("Whisper's encoder has no average pool (avg_pool must be 0)")
        self.cfg = cfg
        self.encoder = AudioEncoder(cfg.encoder, dtype=dtype, rngs=rngs)
        self.decoder = WhisperDecoder(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, features: jax.Array, tokens: jax.Array) -> jax.Array:
        """mel features ['B n_mels F'] + tokens ['B T'] -> logits ['B T V'] (teacher forced)."""
        return self.decoder(tokens, self.encoder(features))
