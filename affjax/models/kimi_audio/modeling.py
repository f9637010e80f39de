"""Kimi-Audio (understanding path, text output) in Flax NNX.

What the official code does (MoonshotAI/Kimi-Audio kimia_infer/ and the remote code
modeling_moonshot_kimia.py of moonshotai/Kimi-Audio-7B-Instruct), and so this module:

- Two input streams of equal length: an audio stream (control tokens and GLM-4-Voice speech codes
  offset by `kimia_token_offset`) and a text stream (text tokens, `<|im_kimia_text_blank|>` where
  the audio stream speaks). The host builds them (inputs.py).
- Continuous audio: the Whisper-large-v3 encoder of the `whisper-large-v3/` subfolder runs on each
  30 s window (3000 mel frames, no attention mask: the padded tail is attended too); of its 1500
  output frames a window keeps 4 per 12.5 Hz token, the 4 are stacked into one vector
  (4 x 1280 = `kimia_adaptor_input_dim` = 5120) and `vq_adaptor` (Linear, SiLU, Linear,
  LayerNorm with eps = rms_norm_eps) maps it to the LLM width.
- Fused input embedding: at speech-code positions (is_continuous) (E(code) + adaptor(feature)) *
  sqrt(2); elsewhere E(audio id); then + E(text id) everywhere.
- A Qwen2 decoder (q/k/v biases, RoPE theta from config.json); text logits = lm_head(norm(h)) of
  the last of the `num_hidden_layers` layers, over the whole vocabulary.
- MIMO: `kimia_mimo_layers` more Qwen2 layers take the hidden state after layer
  `kimia_mimo_transformer_from_layer_index` (21 of 28) and, through `mimo_norm` and
  `mimo_output`, give the audio-stream logits (speech generation). They never feed the text
  logits: this module loads them, and runs them only when audio logits are asked for
  (`with_audio=True`); the text path leaves them out.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from affjax.models.kimi_audio.tokenizer import KIMI_TOKENS
from affjax.models.layers import LayerNorm, RMSNorm, linear, map_rows
from affjax.models.qwen2.modeling import DecoderLayer, Qwen2ForCausalLM, TextConfig, rope_for
from affjax.models.whisper.modeling import AudioEncoder, EncoderConfig

MODEL_TYPES = ("kimi_audio", "moonshot_kimia")
ARCHITECTURE = "MoonshotKimiaForCausalLM"
CONV_STRIDE = 2  # Whisper's conv2 halves the mel frames


@dataclasses.dataclass(frozen=True)
class KimiAudioConfig:
    audio: EncoderConfig
    text: TextConfig
    adaptor_input_dim: int       # kimia_adaptor_input_dim: frames_per_token stacked encoder frames
    mimo_layers: int             # kimia_mimo_layers
    mimo_from_layer: int         # kimia_mimo_transformer_from_layer_index
    token_offset: int            # kimia_token_offset: speech code c has id token_offset + c
    media_begin: int             # kimia_media_begin
    media_end: int               # kimia_media_end

    @property
    def frames_per_token(self) -> int:
        return self.adaptor_input_dim // self.audio.d_model

    @property
    def tokens_per_window(self) -> int:
        """12.5 Hz tokens of one full encoder window (375 for 30 s)."""
        return self.audio.max_source_positions // self.frames_per_token

    def window_tokens(self, feature_frames):
        """Tokens a window of `feature_frames` valid mel frames gives (ints or arrays): the
        official ((samples - 1) // 1280 + 1), as ceil(frames / 8) of the frames' ceil(samples / 160)."""
        per = CONV_STRIDE * self.frames_per_token
        return (feature_frames + per - 1) // per

    @classmethod
    def from_hf(cls, c: dict, whisper: dict | None = None) -> "KimiAudioConfig":
        """From the release's config.json and its whisper-large-v3/config.json (`whisper`; by
        default the copy the converter embeds as c["whisper_config"])."""
        archs = c.get("architectures") or []
        if c.get("model_type") not in MODEL_TYPES and ARCHITECTURE not in archs:
            raise ValueError(f"model_type {c.get('model_type')!r} / architectures {archs} is not Kimi-Audio")
        whisper = whisper if whisper is not None else c.get("whisper_config")
        if whisper is None:
            raise ValueError("Kimi-Audio needs the whisper-large-v3/config.json of its release")
        if not c.get("use_whisper_feature", True):
            raise ValueError("use_whisper_feature=false is not supported")
        # Kimi's decoder is Qwen2 with q/k/v biases whatever model_type the config carries
        text = TextConfig.from_hf({**c, "model_type": "qwen2"})
        audio = EncoderConfig.from_hf(whisper, avg_pool=0)
        cfg = cls(audio=audio, text=text, adaptor_input_dim=int(c["kimia_adaptor_input_dim"]),
                  mimo_layers=int(c["kimia_mimo_layers"]),
                  mimo_from_layer=int(c["kimia_mimo_transformer_from_layer_index"]),
                  token_offset=int(c["kimia_token_offset"]), media_begin=int(c["kimia_media_begin"]),
                  media_end=int(c["kimia_media_end"]))
        if cfg.adaptor_input_dim % audio.d_model or audio.max_source_positions % cfg.frames_per_token:
            raise ValueError(f"kimia_adaptor_input_dim {cfg.adaptor_input_dim} is not a whole number of Whisper "
                             f"frames ({audio.d_model}) dividing {audio.max_source_positions} positions")
        if cfg.mimo_layers and not 0 <= cfg.mimo_from_layer < text.layers:
            raise ValueError(f"kimia_mimo_transformer_from_layer_index {cfg.mimo_from_layer} "
                             f"outside 0..{text.layers - 1}")
        return cfg


class VQAdaptor(nnx.Module):
    """Linear, SiLU, Linear, LayerNorm (the release's vq_adaptor.layers.0 / .3 / .4)."""

    def __init__(self, d_in: int, d: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.fc1 = linear(d_in, d, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(d, eps=eps, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.fc2(jax.nn.silu(self.fc1(x))))


# Windows the audio encoder runs at once per data shard on accelerators (layers.map_rows): long
# audio makes many windows, and encoding them all in one step made the encoder the job's largest
# program (64 windows per chip at 60 s, 6.2 GiB on v5e), ahead of the decoder that pooling shrinks.
AUDIO_WINDOWS_PER_STEP = 8


class KimiAudio(nnx.Module):
    def __init__(self, cfg: KimiAudioConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        t = cfg.text
        self.audio_tower = AudioEncoder(cfg.audio, dtype=dtype, rngs=rngs)
        self.vq_adaptor = VQAdaptor(cfg.adaptor_input_dim, t.hidden, t.rms_eps, dtype=dtype, rngs=rngs)
        self.language_model = Qwen2ForCausalLM(t, dtype=dtype, rngs=rngs)
        # the audio-output branch (see the module docstring): loaded, off the text path
        self.mimo_layers = nnx.List([DecoderLayer(t, dtype=dtype, rngs=rngs) for _ in range(cfg.mimo_layers)])
        self.mimo_norm = RMSNorm(t.hidden, eps=t.rms_eps, dtype=dtype)
        self.mimo_output = nnx.Param(jax.random.normal(rngs.params(), (t.vocab_size, t.hidden), dtype) * 0.02)

    # -- inputs ------------------------------------------------------------------------------------
    def encode_audio(self, features: jax.Array, feature_lengths: jax.Array) -> jax.Array:
        """Adaptor outputs at 12.5 Hz for each 30 s window.

        features ['W n_mels F'] (F = 3000 mel frames, the feature extractor's padded window);
        feature_lengths Int['W'] valid mel frames of each window. Returns ['W F/8 D']: the encoder
        sees the whole padded window (as the official code), and the tokens past a window's valid
        count (`cfg.window_tokens`) are zero."""
        k = self.cfg.frames_per_token

        def window(f):
            x = self.audio_tower(f)  # ['w 1500 d']
            w, t, d = x.shape
            return self.vq_adaptor(x.reshape(w, t // k, k * d))  # k consecutive frames -> one token

        out = map_rows(window, features, rows_per_step=AUDIO_WINDOWS_PER_STEP)
        keep = jnp.arange(out.shape[1])[None, :] < self.cfg.window_tokens(feature_lengths)[:, None]
        return jnp.where(keep[..., None], out, 0).astype(out.dtype)

    def embed_inputs(self, audio_ids: jax.Array, text_ids: jax.Array, audio_feats: jax.Array,
                     feat_index: jax.Array, continuous: jax.Array) -> jax.Array:
        """The fused input embeddings ['B T D'].

        audio_ids, text_ids Int['B T'] (the two streams); audio_feats ['W F D'] from encode_audio;
        feat_index Int['B T']: flat index w*F + k of the 12.5 Hz token whose feature goes with each
        speech code (ignored elsewhere); continuous Bool['B T']: the speech-code positions."""
        embed = self.language_model.embed
        a = embed(audio_ids)
        flat = audio_feats.reshape(-1, audio_feats.shape[-1]).astype(a.dtype)
        fused = (a + jnp.take(flat, feat_index, axis=0)) * jnp.asarray(math.sqrt(2.0), a.dtype)
        a = jnp.where(continuous[..., None], fused, a)
        return a + embed(text_ids)

    # -- decoder -----------------------------------------------------------------------------------
    def decode(self, x: jax.Array, valid: jax.Array, *, with_audio: bool = False):
        """The decoder stack over right-padded embeddings x ['B T D'] at positions 0..T-1; valid
        Bool['B T'] masks padding keys. Returns (h ['B T D'] before the final norm, the MIMO
        branch's output or None): the MIMO layers run only with_audio."""
        h, branch = self.language_model.decode(x, valid, keep_after=self.cfg.mimo_from_layer if with_audio else None)
        if with_audio:
            b, t, _ = x.shape
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32)[None], (b, t))
            cos, sin = rope_for(self.cfg.text, pos, x.dtype)
            for layer in self.mimo_layers:
                branch, _ = layer(branch, cos, sin, valid)
        return h, branch

    def text_logits(self, h: jax.Array) -> jax.Array:
        """h ['... D'] from decode -> Float32['... V'] (final norm + lm_head)."""
        return self.language_model.logits(h)

    def audio_logits(self, branch: jax.Array) -> jax.Array:
        """The MIMO branch's output ['... D'] -> Float32['... V'] (mimo_norm + mimo_output)."""
        return jnp.einsum("...d,vd->...v", self.mimo_norm(branch), self.mimo_output[...],
                          preferred_element_type=jnp.float32)

    # -- what the engine (affjax.runtime.engine) asks of a model ----------------------------------------
    def embed_batch(self, ids, span, audio_index, features, feature_lengths) -> jax.Array:
        """The fused input embeddings ['B T D'] of an inputs.Batch's arrays: ids ['B T 2'] holds
        the (audio, text) streams, span > 0 marks the speech codes (the continuous positions)."""
        feats = self.encode_audio(features, feature_lengths)
        return self.embed_inputs(ids[..., 0], ids[..., 1], feats, audio_index, span > 0)

    def embed_next(self, ids: jax.Array) -> jax.Array:
        """The input of generated or scored text tokens ids ['...']: each decode step feeds (audio
        blank, token), E(blank) + E(token), as the official generation loop does."""
        embed = self.language_model.embed
        return embed(jnp.full_like(ids, KIMI_TOKENS.text_blank)) + embed(ids)

    def hidden(self, ids, valid, span, audio_index, features, feature_lengths, *, with_audio: bool = False):
        """Whole forward of an inputs.Batch's arrays to the decoder's hidden states: (h, MIMO
        branch or None), see decode."""
        x = self.embed_batch(ids, span, audio_index, features, feature_lengths)
        return self.decode(x, valid, with_audio=with_audio)

    def __call__(self, ids, valid, span, audio_index, features, feature_lengths) -> jax.Array:
        """Text logits ['B T V'] (small inputs: the whole vocabulary at every position)."""
        h, _ = self.hidden(ids, valid, span, audio_index, features, feature_lengths)
        return self.text_logits(h)

    def continuation_logprobs(self, h: jax.Array, n_prompt: jax.Array, cont_ids: jax.Array) -> jax.Array:
        """Log-probabilities Float32['B K'] of the continuation text tokens cont_ids Int['B K']
        appended after each row's n_prompt Int['B'] prompt positions: position n_prompt - 1 + k
        predicts token k (each decode step feeds (blank, token), so the text stream carries them)."""
        at = n_prompt[:, None] - 1 + jnp.arange(cont_ids.shape[1])[None, :]
        hk = jnp.take_along_axis(h, at[..., None], axis=1)
        logp = jax.nn.log_softmax(self.text_logits(hk), axis=-1)
        return jnp.take_along_axis(logp, cont_ids[..., None], axis=-1)[..., 0]
