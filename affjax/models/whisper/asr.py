"""Whisper speech recognition with Affinity Pooling on the encoder: pooled encoding, greedy
transcription, and the analytic FLOPs count.

Where stages sit (spec section 2, with LAYER meaning an *encoder* layer of a model with L of them):

- ``0``: on the conv stem output plus positions, before encoder layer 1;
- ``1 <= l < L`` ("deep"): on the residual stream after encoder layer l; layers l+1 .. L run on
  the shortened sequence and the final LayerNorm follows;
- ``L`` ("encoder output"): after the final LayerNorm, on the sequence the decoder cross-attends to.

Several stages chain as in the spec. Presets are the Qwen2-Audio ones, placed by the same rule with
``L + 1`` stage positions (``dap-*`` put their deep stage at ``L - 2``).

Spans. The feature extractor pads every clip to 30 s; encoder frame j covers samples
``[320 j, 320 (j + 1))`` (hop 160, conv stride 2). Frames ``[0, ceil(n_samples / 320))`` hold the
clip: they form one audio span (span id 1) and are the only frames pooled. The frames after them
encode the zero padding; they are kept as they are (span 0, never merged, like text tokens in the
spec), because Whisper's decoder relies on them: masking them out of the cross-attention, with no
pooling at all, breaks transcription (see ``drop_padding`` and docs in ``affjax/eval_asr.py``).

Positions. Whisper's encoder adds absolute position embeddings once, before layer 1, and has no
RoPE, so the ``positions`` policy of the spec does not apply; it is ignored for Whisper.

Proportional. Under ``PoolingConfig.proportional`` every attention after a stage adds
``log(size)`` to the logit of each key that stands for ``size`` frames: the self-attention of the
encoder layers after a deep stage, and the decoder's cross-attention (``enc_bias``).

Static shapes (bucketed mode, spec section 4). The encoder runs as jitted pieces: the stem, each
group of layers between two stages, the pooling stages (``pool_stage_jit``) and the greedy loop.
After a stage the host reads the batch's largest valid length and slices the packed buffer to the
smallest bucket of :func:`encoder_buckets` that holds it, so thresholds are exact and each
(piece, bucket, batch size) compiles once. Padding rows of a batch are marked invalid from the
start, so they never hold a bucket open.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.models.whisper.modeling import (
    EncoderConfig, Whisper, WhisperConfig, greedy_decode, prompt_ids, whisper_features)
from affjax.pooling.affinity import pool_stage_jit
from affjax.pooling.spec import PoolingConfig, parse_pooling

__all__ = [
    "SAMPLES_PER_FRAME", "BUCKET_STEP", "TRACES", "encoder_buckets", "audio_frames", "parse_whisper_pooling",
    "default_pooling", "EncodeOut", "pooled_encode", "AsrOut", "transcribe_pooled", "encoder_flops",
    "decoder_flops",
]

SAMPLES_PER_FRAME = 320  # feature hop (160 samples) x conv2 stride (2)
BUCKET_STEP = 128
TRACES: collections.Counter = collections.Counter()  # traces (= compilations) per jitted piece


def encoder_buckets(max_frames: int, step: int = BUCKET_STEP) -> tuple[int, ...]:
    """Buffer lengths after a stage: multiples of ``step`` below ``max_frames``, then ``max_frames``."""
    return tuple(range(step, max_frames, step)) + (max_frames,)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} frames exceed the largest encoder bucket {buckets[-1]}")


def audio_frames(n_samples: int, cfg: EncoderConfig) -> int:
    """Encoder frames that cover a clip of ``n_samples`` (16 kHz): ``ceil(n / 320)``, at most 1500,
    at least 1 (a clip always has a frame)."""
    return int(min(max(1, math.ceil(n_samples / SAMPLES_PER_FRAME)), cfg.max_source_positions))


def parse_whisper_pooling(text: str | None, cfg: WhisperConfig, proportional: bool = False) -> PoolingConfig:
    """The spec's text form with LAYER = encoder layer, 0 .. L (L = the encoder output)."""
    return parse_pooling(text, cfg.encoder.layers + 1, positions="first", proportional=proportional)


def default_pooling(cfg: WhisperConfig) -> PoolingConfig:
    """The main job's pooled setting: the encoder output, tau 0.95, window 1, proportional."""
    return parse_whisper_pooling(f"{cfg.encoder.layers}:tau=0.95,window=1", cfg, proportional=True)


# ----------------------------------------------------------------------------------------------
# Jitted pieces (graphdef is static: one compile per shapes and settings)


@jax.jit
def _embed_jit(graphdef, params, features):
    TRACES["embed"] += 1
    return nnx.merge(graphdef, params).embed(features)


@functools.partial(jax.jit, static_argnames=("start", "end", "finish"))
def _group_jit(graphdef, params, x, key_valid, key_bias, *, start, end, finish):
    TRACES["layers"] += 1
    enc = nnx.merge(graphdef, params)
    x = enc.run_layers(x, key_valid, start, end, key_bias)
    return enc.layer_norm(x) if finish else x


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _greedy_jit(graphdef, params, enc, enc_valid, enc_bias, prompt, row_valid, max_new_tokens):
    TRACES["greedy"] += 1
    return greedy_decode(nnx.merge(graphdef, params), enc, prompt, row_valid, max_new_tokens=max_new_tokens,
                         enc_valid=enc_valid, enc_bias=enc_bias)


@jax.jit
def _log_size(size):
    return jnp.log(jnp.maximum(size, 1.0))


# ----------------------------------------------------------------------------------------------
# Pooled encoding


@dataclasses.dataclass
class EncodeOut:
    """Encoder output for one batch. S = buffer length after the last stage (a bucket)."""
    enc: jax.Array              # ['B S D'] what the decoder cross-attends to
    valid: jax.Array | None     # Bool['B S'], None = every frame (the unpooled model)
    bias: jax.Array | None      # Float['B S'] log(group size) under proportional, else None
    audio_tokens: np.ndarray    # Int['B 1+stages'] audio frames before, then after each stage
    layer_tokens: np.ndarray    # Int['B L'] frames present in each encoder layer 1 .. L
    enc_len: np.ndarray         # Int['B'] frames present in the decoder's cross-attention
    buffers: list[int]          # buffer length of each layer group (the compiled shapes)


def pooled_encode(model: Whisper, features, n_frames, n_valid_rows: int, pooling: PoolingConfig, *,
                  drop_padding: bool = False) -> EncodeOut:
    """Encoder with Affinity Pooling stages (module docstring) over one padded batch.

    features: ['B n_mels 3000']; n_frames: Int['B'] audio frames of each row (see
    :func:`audio_frames`); rows ``>= n_valid_rows`` are batch padding.
    drop_padding: diagnostic only: the frames after the clip are removed from the sequence (masked
    out of every attention, dropped at the first stage). Breaks Whisper even unpooled.
    With no stages and ``drop_padding=False`` this is exactly the unpooled encoder.
    """
    ecfg = model.cfg.encoder
    big = ecfg.layers
    for s in pooling.stages:
        if not 0 <= s.layer <= big:
            raise ValueError(f"pooling stage at layer {s.layer}: Whisper stages lie in 0 .. {big} "
                             f"(encoder layers; {big} = the encoder output)")
    graphdef, params = nnx.split(model.encoder)
    x = _embed_jit(graphdef, params, jnp.asarray(features, jnp.float32))
    b, n = x.shape[:2]
    n_frames = np.minimum(np.asarray(n_frames, np.int64), n)
    row_ok = np.arange(b) < n_valid_rows
    frame = np.arange(n)[None, :]
    audio = row_ok[:, None] & (frame < n_frames[:, None])
    valid_np = audio if drop_padding else np.broadcast_to(row_ok[:, None], (b, n))
    span = jnp.asarray(audio.astype(np.int32))
    valid = jnp.asarray(valid_np)
    size = jnp.ones((b, n), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (b, n))
    key_valid = valid if drop_padding else None  # before any stage: every frame, as unpooled
    bias = None
    present = valid_np.sum(1).astype(np.int64)  # frames present per row, now
    layer_tokens = np.zeros((b, big), np.int64)
    audio_tokens = [audio.sum(1).astype(np.int64)]
    buffers = []
    buckets = encoder_buckets(n)
    cur, finished = 0, False

    def run(start, end, finish):
        nonlocal x
        x = _group_jit(graphdef, params, x, key_valid, bias, start=start, end=end, finish=finish)
        layer_tokens[:, start:end] = present[:, None]
        buffers.append(int(x.shape[1]))

    for stage in pooling.stages:
        if stage.layer > cur or stage.layer == big:
            run(cur, stage.layer, finish=stage.layer == big)
            cur, finished = stage.layer, stage.layer == big
        out = pool_stage_jit(x, span, valid, pos, size, tau=stage.tau, window=stage.window,
                             capacity=int(x.shape[1]), weighted=stage.weighted, positions="first")
        n_valid, a_out = jax.device_get((out.n_valid, out.audio_out))
        cap = min(_bucket(max(int(n_valid.max()), 1), buckets), int(x.shape[1]))
        x, valid, size, span, pos = (a[:, :cap] for a in (out.h, out.valid, out.size, out.span, out.pos))
        key_valid = valid
        bias = _log_size(size) if pooling.proportional else None
        present = np.asarray(n_valid, np.int64)
        audio_tokens.append(np.asarray(a_out, np.int64))
    if not finished:
        run(cur, big, finish=True)
    return EncodeOut(enc=x, valid=key_valid, bias=bias, audio_tokens=np.stack(audio_tokens, 1),
                     layer_tokens=layer_tokens, enc_len=present, buffers=buffers)


# ----------------------------------------------------------------------------------------------
# Transcription


@dataclasses.dataclass
class AsrOut:
    """Per item: generated ids (no prompt, no final eos), text, finished, and the counts behind
    retention and FLOPs."""
    tokens: list[list[int]]
    texts: list[str]
    finished: list[bool]
    audio_tokens: list[list[int]]   # [audio frames, after stage 1, ...]
    layer_tokens: list[list[int]]   # frames present in encoder layers 1 .. L
    enc_len: list[int]              # frames the decoder cross-attends to
    prompt_len: int


def transcribe_pooled(model: Whisper, processor, waveforms, pooling: PoolingConfig | None = None, *,
                      drop_padding: bool = False, max_new_tokens: int = 128, batch_size: int = 8,
                      language: str = "en", task: str = "transcribe", sampling_rate: int = 16000) -> AsrOut:
    """Greedy short-form transcription (as `modeling.transcribe`) with pooling stages on the encoder.

    Batches are padded to ``batch_size`` with dummy rows. ``pooling=None`` or no stages (and no
    ``drop_padding``) gives the unpooled model's tokens.
    """
    pooling = pooling or PoolingConfig()
    cfg = model.cfg
    prompt = jnp.asarray(prompt_ids(processor.tokenizer, cfg, language=language, task=task), jnp.int32)
    p = int(prompt.shape[0])
    dec_graph, dec_params = nnx.split(model.decoder)
    eos = cfg.eos_token_id
    waves = [np.asarray(w, np.float32) for w in waveforms]
    chunk_samples = cfg.encoder.mel_frames * SAMPLES_PER_FRAME // 2
    out = AsrOut([], [], [], [], [], [], p)
    for start in range(0, len(waves), batch_size):
        chunk = waves[start:start + batch_size]
        feats = whisper_features(processor, chunk, batch_size, cfg, sampling_rate)
        frames = [audio_frames(min(len(w), chunk_samples), cfg.encoder) for w in chunk]
        frames += [0] * (batch_size - len(chunk))
        e = pooled_encode(model, feats, np.asarray(frames), len(chunk), pooling, drop_padding=drop_padding)
        row_valid = jnp.arange(batch_size) < len(chunk)
        toks, done = _greedy_jit(dec_graph, dec_params, e.enc, e.valid, e.bias, prompt, row_valid,
                                 max_new_tokens)
        toks, done = np.asarray(toks), np.asarray(done)
        for i in range(len(chunk)):
            gen = toks[i, p:].tolist()
            if eos in gen:
                gen = gen[:gen.index(eos)]
            out.tokens.append(gen)
            out.finished.append(bool(done[i]))
            out.audio_tokens.append([int(v) for v in e.audio_tokens[i]])
            out.layer_tokens.append([int(v) for v in e.layer_tokens[i]])
            out.enc_len.append(int(e.enc_len[i]))
    out.texts = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
    return out


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs (2 per multiply-add; attention scores and values over the full square)


def encoder_flops(cfg: EncoderConfig, layer_tokens: Sequence[int]) -> int:
    """Encoder FLOPs with ``layer_tokens[i]`` frames present in layer i+1: the conv stem (on the
    full 30 s input), then per layer the q/k/v/o projections, scores and weighted values over the
    n x n square, and the two MLP matrices. The final LayerNorm and activations are not counted."""
    d, f = cfg.d_model, cfg.ffn_dim
    n0 = cfg.max_source_positions
    total = 2 * cfg.mel_frames * 3 * cfg.num_mel_bins * d + 2 * n0 * 3 * d * d
    for n in layer_tokens:
        total += 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * f
    return int(total)


def decoder_flops(cfg: WhisperConfig, enc_len: int, prompt_len: int, generated: int) -> int:
    """Decoder FLOPs of one greedy transcription: the prompt (``prompt_len`` tokens, self-attention
    over the full square) and each generated token fed back (``generated - 1`` of them: the last
    one, eos or the limit, is never fed). Per layer: self-attention projections and scores, the
    cross-attention's q/o projections and its scores and values over ``enc_len`` frames, the
    cross k/v projections of the ``enc_len`` frames (once), the MLP; the logits of every position
    that yields a token (the prompt's last one and each fed token)."""
    d, f, v = cfg.d_model, cfg.decoder_ffn_dim, cfg.vocab_size
    s = enc_len

    def tokens(t, keys):  # t query tokens, each seeing `keys` self-attention keys
        return t * (2 * 4 * d * d + 2 * 2 * keys * d + 2 * 2 * d * d + 2 * 2 * s * d + 2 * 2 * d * f)

    per_layer = 2 * 2 * s * d * d + tokens(prompt_len, prompt_len)
    for k in range(max(generated - 1, 0)):
        per_layer += tokens(1, prompt_len + k + 1)
    return int(cfg.decoder_layers * per_layer + 2 * d * v * max(generated, 1))
