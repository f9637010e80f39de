"""Qwen2-Audio in Flax NNX: Whisper-large-v3 encoder + stride-2 average pool + LayerNorm, a linear
projector, and the Qwen2 decoder. Every shape comes from the Hugging Face config.json."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from affjax.models.layers import linear, map_rows
from affjax.models.qwen2.modeling import Qwen2ForCausalLM, TextConfig
from affjax.models.whisper.modeling import AudioEncoder, EncoderConfig


@dataclasses.dataclass(frozen=True)
class Qwen2AudioConfig:
    audio: EncoderConfig
    text: TextConfig
    audio_token_id: int

    @classmethod
    def from_hf(cls, c: dict) -> "Qwen2AudioConfig":
        if c.get("model_type") != "qwen2_audio":
            raise ValueError(f"model_type {c.get('model_type')!r} is not 'qwen2_audio'")
        token = c.get("audio_token_id", c.get("audio_token_index"))
        return cls(audio=EncoderConfig.from_hf(c["audio_config"], avg_pool=2),
                   text=TextConfig.from_hf(c["text_config"]), audio_token_id=int(token))


class Qwen2Audio(nnx.Module):
    def __init__(self, cfg: Qwen2AudioConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.audio_tower = AudioEncoder(cfg.audio, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = linear(cfg.audio.d_model, cfg.text.hidden, bias=True, dtype=dtype, rngs=rngs)
        self.language_model = Qwen2ForCausalLM(cfg.text, dtype=dtype, rngs=rngs)

    def encode_audio(self, features: jax.Array, feature_lengths: jax.Array) -> jax.Array:
        """features ['A n_mels F'], feature_lengths Int['A'] -> projected audio tokens ['A F/4 D_text']."""
        return map_rows(lambda f, n: self.multi_modal_projector(self.audio_tower(f, n)), features, feature_lengths)

    def embed_inputs(self, ids: jax.Array, audio: jax.Array, audio_index: jax.Array) -> jax.Array:
        """Text embeddings with the audio placeholders filled by a static-shape gather.

        ids ['B T']; audio ['A F D'] from encode_audio; audio_index Int['B T']: flat index a*F + k of
        the audio token that fills each placeholder slot (ignored elsewhere)."""
        x = self.language_model.embed(ids)
        flat = audio.reshape(-1, audio.shape[-1]).astype(x.dtype)
        placed = jnp.take(flat, audio_index, axis=0)
        return jnp.where((ids == self.cfg.audio_token_id)[..., None], placed, x)

    # -- what the engine (affjax.runtime.engine) asks of a model ----------------------------------------
    def embed_batch(self, ids, span, audio_index, features, feature_lengths) -> jax.Array:
        """The input embeddings ['B T D'] of an inputs.Batch's arrays (`span` is not needed here:
        the placeholder ids mark the audio)."""
        return self.embed_inputs(ids, self.encode_audio(features, feature_lengths), audio_index)

    def embed_next(self, ids: jax.Array) -> jax.Array:
        """The input embedding of generated or scored text tokens ids ['...']."""
        return self.language_model.embed(ids)
