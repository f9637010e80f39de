"""Whisper decoding beside the model: greedy decoding as one jitted lax.while_loop over fixed
buffers (gemma's loop-state pattern), the jitted encoder, the decoder prompt, log-mel features and
short-form transcription. The modules and configs are in modeling.py."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.runtime.compiles import traced
from affjax.models.whisper.modeling import Whisper, WhisperConfig, WhisperDecoder

__all__ = ["GreedyState", "greedy_decode", "encode", "prompt_ids", "Transcription", "greedy_tokens",
           "whisper_features", "transcribe"]


# ----------------------------------------------------------------------------------------------
# Greedy decoding: one jitted lax.while_loop over fixed buffers


@dataclasses.dataclass
class GreedyState:
    """Loop state of `greedy_decode` (a pytree): `n` tokens generated so far (same for all rows),
    `tokens` ['B P+N'] (prompt, then generated tokens, eos-padded), `done` ['B'], `cache`."""
    n: jax.Array
    tokens: jax.Array
    done: jax.Array
    cache: tuple


jax.tree_util.register_dataclass(GreedyState, data_fields=["n", "tokens", "done", "cache"], meta_fields=[])


def greedy_decode(decoder: WhisperDecoder, enc: jax.Array, prompt: jax.Array, row_valid: jax.Array, *,
                  max_new_tokens: int, enc_valid: jax.Array | None = None,
                  enc_bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding (argmax; ties go to the lowest id) from `prompt` Int['P'] for every row.

    The config's `suppress_tokens` are never picked, nor its `begin_suppress_tokens` as the first
    generated token (transformers' SuppressTokens / SuppressTokensAtBegin logits processors).
    enc: ['B S D']; row_valid: Bool['B'] (False: a padding row, finished from the start).
    Stops when every row has emitted eos or after `max_new_tokens`; finished rows are padded with
    eos, as transformers does. Returns (tokens Int['B P+max_new_tokens'], done Bool['B']).
    """
    cfg = decoder.cfg
    b, p = enc.shape[0], prompt.shape[0]
    total = p + max_new_tokens
    if total > cfg.max_target_positions:
        raise ValueError(f"prompt ({p}) + max_new_tokens ({max_new_tokens}) exceeds the decoder's "
                         f"{cfg.max_target_positions} positions")
    eos = jnp.int32(cfg.eos_token_id)
    suppress = jnp.zeros((cfg.vocab_size,), jnp.float32).at[jnp.asarray(cfg.suppress_tokens, jnp.int32)].set(-jnp.inf)
    begin = suppress.at[jnp.asarray(cfg.begin_suppress_tokens, jnp.int32)].set(-jnp.inf)
    cross = decoder.cross_kv(enc)
    tokens = jnp.full((b, total), eos, jnp.int32).at[:, :p].set(prompt.astype(jnp.int32)[None])
    logits, cache = decoder.step(tokens[:, :p], 0, decoder.init_cache(b, total), cross, enc_valid, enc_bias)

    def emit(state: GreedyState, logits_last) -> GreedyState:
        nxt = jnp.where(state.done, eos, jnp.argmax(logits_last, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice(state.tokens, nxt[:, None], (0, p + state.n))
        return GreedyState(state.n + 1, tokens, state.done | (nxt == eos), state.cache)

    state = emit(GreedyState(jnp.int32(0), tokens, ~row_valid, cache), logits[:, -1] + begin)

    def cond(s: GreedyState):
        return (s.n < max_new_tokens) & ~jnp.all(s.done)

    def body(s: GreedyState) -> GreedyState:
        pos = p + s.n - 1  # the last emitted token
        last = jax.lax.dynamic_slice_in_dim(s.tokens, pos, 1, axis=1)
        lg, c = decoder.step(last, pos, s.cache, cross, enc_valid, enc_bias)
        return emit(GreedyState(s.n, s.tokens, s.done, c), lg[:, 0] + suppress)

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.done


@jax.jit
def _encode_jit(graphdef, params, features):
    traced("whisper_encode")
    return nnx.merge(graphdef, params)(features)


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _greedy_jit(graphdef, params, enc, enc_valid, enc_bias, prompt, row_valid, max_new_tokens):
    """The one greedy program (plain and pooled encoder outputs; enc_valid / enc_bias None when unpooled)."""
    traced("whisper_greedy")
    return greedy_decode(nnx.merge(graphdef, params), enc, prompt, row_valid, max_new_tokens=max_new_tokens,
                         enc_valid=enc_valid, enc_bias=enc_bias)


def encode(model: Whisper, features) -> jax.Array:
    """Jitted encoder: features ['B n_mels 3000'] -> ['B 1500 D'] (one compile per batch size)."""
    graphdef, params = nnx.split(model.encoder)
    return _encode_jit(graphdef, params, jnp.asarray(features, jnp.float32))


def prompt_ids(tokenizer, cfg: WhisperConfig, *, language: str = "en", task: str = "transcribe") -> list[int]:
    """`<|startoftranscript|><|en|><|transcribe|><|notimestamps|>` for multilingual models,
    `<|startoftranscript|><|notimestamps|>` for English-only ones; ids read from the tokenizer."""
    toks = ["<|startoftranscript|>"]
    if cfg.is_multilingual:
        toks += [f"<|{language}|>", f"<|{task}|>"]
    toks.append("<|notimestamps|>")
    ids = tokenizer.convert_tokens_to_ids(toks)
    unk = getattr(tokenizer, "unk_token_id", None)
    bad = [t for t, i in zip(toks, ids) if i is None or (i == unk and t != tokenizer.unk_token)]
    if bad:
        raise ValueError(f"tokenizer lacks {bad}")
    if ids[0] != cfg.decoder_start_token_id:
        raise ValueError(f"tokenizer's <|startoftranscript|> is {ids[0]}, the model's is {cfg.decoder_start_token_id}")
    return list(ids)


@dataclasses.dataclass
class Transcription:
    tokens: list[list[int]]  # generated ids per item, without the prompt and the final eos
    texts: list[str]         # decoded with skip_special_tokens, stripped
    finished: list[bool]     # False where max_new_tokens cut the item short


def greedy_tokens(model: Whisper, enc: jax.Array, n_valid: int, prompt, *, max_new_tokens: int = 128,
                  enc_valid: jax.Array | None = None, enc_bias: jax.Array | None = None
                  ) -> tuple[list[list[int]], list[bool]]:
    """Jitted greedy decoding from encoder outputs ['B S D'] whose first `n_valid` rows are real
    (the rest are batch padding); a pooled output brings its frame mask and key bias. Returns per
    real row the generated ids (no prompt, no final eos) and whether it ended with eos."""
    cfg = model.cfg
    prompt = jnp.asarray(prompt, jnp.int32)
    b = enc.shape[0]
    graphdef, params = nnx.split(model.decoder)
    toks, done = _greedy_jit(graphdef, params, enc, enc_valid, enc_bias, prompt, jnp.arange(b) < n_valid,
                             max_new_tokens)
    toks, done = np.asarray(toks), np.asarray(done)
    out = []
    for i in range(n_valid):
        gen = toks[i, prompt.shape[0]:].tolist()
        if cfg.eos_token_id in gen:
            gen = gen[:gen.index(cfg.eos_token_id)]
        out.append(gen)
    return out, [bool(x) for x in done[:n_valid]]


def whisper_features(processor, waveforms, batch_size: int, cfg: WhisperConfig,
                     sampling_rate: int = 16000) -> np.ndarray:
    """log-mel features ['batch_size n_mels 3000'] of up to `batch_size` waveforms, padded
    (or truncated) to 30 s, plus all-zero dummy rows up to `batch_size`."""
    n = len(waveforms)
    if not 0 < n <= batch_size:
        raise ValueError(f"need 1 to {batch_size} waveforms, got {n}")
    feats = processor.feature_extractor([np.asarray(w, np.float32) for w in waveforms],
                                        sampling_rate=sampling_rate, return_tensors="np").input_features
    if feats.shape[1:] != (cfg.encoder.num_mel_bins, cfg.encoder.mel_frames):
        raise ValueError(f"feature extractor gives {feats.shape[1:]}, the encoder expects "
                         f"({cfg.encoder.num_mel_bins}, {cfg.encoder.mel_frames})")
    return np.concatenate([feats, np.zeros((batch_size - n, *feats.shape[1:]), feats.dtype)])


def transcribe(model: Whisper, processor, waveforms, *, max_new_tokens: int = 128, batch_size: int = 8,
               language: str = "en", task: str = "transcribe", sampling_rate: int = 16000) -> Transcription:
    """Greedy short-form transcription (no timestamps) of float waveforms at `sampling_rate`.

    Features come from the processor's WhisperFeatureExtractor (padded, or truncated, to 30 s).
    Batches are padded to `batch_size` with dummy rows (finished from the start), so the encoder
    compiles once per `batch_size` and the greedy loop once per (`batch_size`, prompt length,
    `max_new_tokens`). The prompt is `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`
    (`<|startoftranscript|><|notimestamps|>` for English-only models).
    """
    prompt = prompt_ids(processor.tokenizer, model.cfg, language=language, task=task)
    waves = list(waveforms)
    tokens, finished = [], []
    for start in range(0, len(waves), batch_size):
        chunk = waves[start:start + batch_size]
        enc = encode(model, whisper_features(processor, chunk, batch_size, model.cfg, sampling_rate))
        t, f = greedy_tokens(model, enc, len(chunk), prompt, max_new_tokens=max_new_tokens)
        tokens += t
        finished += f
    texts = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return Transcription(tokens, texts, finished)
