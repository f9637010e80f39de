"""Whisper speech recognition with Affinity Pooling on the encoder: pooled encoding, greedy
transcription (its analytic FLOPs: affjax.runtime.flops.whisper_encoder_flops / whisper_decoder_flops).

Where stages sit (docs/pooling.md section 2, with LAYER meaning an *encoder* layer of a model with
L of them):

- ``0``: on the conv stem output plus positions, before encoder layer 1;
- ``1 <= l < L`` ("deep"): on the residual stream after encoder layer l; layers l+1 .. L run on
  the shortened sequence and the final LayerNorm follows;
- ``L`` ("encoder output"): after the final LayerNorm, on the sequence the decoder cross-attends to.

Several stages chain as in docs/pooling.md section 2. Presets are the Qwen2-Audio ones, placed by
the same rule with ``L + 1`` stage positions (``dap-*`` put their deep stage at ``L - 2``).

Spans. The feature extractor pads every clip to 30 s; encoder frame j covers samples
``[320 j, 320 (j + 1))`` (hop 160, conv stride 2). Frames ``[0, ceil(n_samples / 320))`` hold the
clip: they form one audio span (span id 1) and are the only frames pooled. The frames after them
encode the zero padding; they are kept as they are (span 0, never merged, like text tokens in
docs/pooling.md section 1), because Whisper's decoder relies on them: masking them out of the
cross-attention, with no pooling at all, breaks transcription (see ``drop_padding`` and docs in
``affjax/eval/whisper.py``).

Positions. Whisper's encoder adds absolute position embeddings once, before layer 1, and has no
RoPE, so the ``positions`` policy (docs/pooling.md section 3) does not apply; it is ignored for
Whisper.

Proportional. Under ``PoolingConfig.proportional`` every attention after a stage adds
``log(size)`` to the logit of each key that stands for ``size`` frames: the self-attention of the
encoder layers after a deep stage, and the decoder's cross-attention (``enc_bias``).

Steps. ``pooled_encode`` is ``encoder_start`` -> (``encoder_advance`` to a stage's layer ->
``encoder_stage``)* -> ``encoder_finish``; states are immutable, so a sweep runs the encoder once
up to a stage position and starts every setting of that stage from the same state.

Fixed-rate controls (``encoder_stage(control=...)``, affjax.pooling.uniform): uniform average pooling
(the clip's frames cut into k contiguous groups of near-equal size, each averaged) and uniform
dropping (k evenly spaced frames kept), with k given per row, e.g. the count a similarity stage
kept for that item (equal retention). They yield the same packed buffers as ``pool_stage``, so
everything after a stage (proportional included) treats them alike; padding frames are kept.

Static shapes (bucketed mode, docs/pooling.md section 4). The encoder runs as jitted pieces: the
stem, each group of layers between two stages, the pooling stages (``pool_stage_jit``) and the
greedy loop. After a stage the host reads the batch's largest valid length and slices the packed
buffer to the smallest bucket of ``shapes.encoder_buckets`` that holds it, so thresholds are exact and
each (piece, bucket, batch size) compiles once. Padding rows of a batch are marked invalid from the
start, so they never hold a bucket open.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.runtime.compiles import TRACES, traced
from affjax.models.whisper.decoding import greedy_tokens, prompt_ids, whisper_features
from affjax.models.whisper.modeling import EncoderConfig, Whisper, WhisperConfig
from affjax.pooling.affinity import pool_stage_jit
from affjax.pooling.uniform import uniform_stage_jit
from affjax.runtime import shapes
from affjax.pooling.spec import PoolingConfig, Stage, parse_pooling

__all__ = [
    "SAMPLES_PER_FRAME", "TRACES", "audio_frames", "parse_whisper_pooling", "default_pooling", "EncoderState",
    "encoder_start", "encoder_advance", "encoder_stage", "encoder_finish", "EncodeOut", "pooled_encode",
    "batch_frames", "decode_encoded", "AsrOut", "transcribe_pooled",
]

SAMPLES_PER_FRAME = 320  # feature hop (160 samples) x conv2 stride (2)

def audio_frames(n_samples: int, cfg: EncoderConfig) -> int:
    """Encoder frames that cover a clip of ``n_samples`` (16 kHz): ``ceil(n / 320)``, at most 1500,
    at least 1 (a clip always has a frame)."""
    return int(min(max(1, math.ceil(n_samples / SAMPLES_PER_FRAME)), cfg.max_source_positions))


def parse_whisper_pooling(text: str | None, cfg: WhisperConfig, proportional: bool = False) -> PoolingConfig:
    """The text form of docs/pooling.md section 2, with LAYER = encoder layer, 0 .. L (L = the
    encoder output)."""
    return parse_pooling(text, cfg.encoder.layers + 1, positions="first", proportional=proportional)


def default_pooling(cfg: WhisperConfig) -> PoolingConfig:
    """The main job's pooled setting: the encoder output, tau 0.95, window 1, proportional."""
    return parse_whisper_pooling(f"{cfg.encoder.layers}:tau=0.95,window=1", cfg, proportional=True)


# ----------------------------------------------------------------------------------------------
# Jitted pieces (graphdef is static: one compile per shapes and settings)


@jax.jit
def _embed_jit(graphdef, params, features):
    traced("whisper_embed")
    return nnx.merge(graphdef, params).embed(features)


@functools.partial(jax.jit, static_argnames=("start", "end", "finish"))
def _group_jit(graphdef, params, x, key_valid, key_bias, *, start, end, finish):
    traced("whisper_layers")
    enc = nnx.merge(graphdef, params)
    x = enc.run_layers(x, key_valid, start, end, key_bias)
    return enc.layer_norm(x) if finish else x


@jax.jit
def _log_size(size):
    return jnp.log(jnp.maximum(size, 1.0))




# ----------------------------------------------------------------------------------------------
# Pooled encoding, in steps: start -> advance to a layer -> a stage -> ... -> finish


@dataclasses.dataclass
class EncoderState:
    """The encoder of one padded batch at some point: ``layer`` layers run (and the final
    LayerNorm once ``finished``), with the packed buffers and counts of the stages so far.
    States are never changed in place, so one state can be the start of many settings (the
    bench pools the same layer-3 state at every threshold)."""
    x: jax.Array                  # ['B N D'] the residual stream (N = buffer length)
    valid: jax.Array              # Bool['B N'] slots that hold a frame
    span: jax.Array               # Int['B N'] 1 for the clip's frames, 0 for padding frames
    size: jax.Array               # Float['B N'] original frames each slot stands for
    pos: jax.Array                # Float['B N'] original frame index (first member's)
    key_valid: jax.Array | None   # what attention masks from here on (None: every slot)
    bias: jax.Array | None        # Float['B N'] log(size) under proportional, else None
    present: np.ndarray           # Int['B'] frames present now
    layer_tokens: np.ndarray      # Int['B L'] frames present in each encoder layer run so far
    audio_tokens: list            # [Int['B']] audio frames before pooling, then after each stage
    buffers: list                 # buffer length of each layer group run so far
    layer: int = 0
    finished: bool = False

    def evolve(self, **kw) -> "EncoderState":
        """A copy with some fields replaced; the host-side counts are copied, never shared."""
        kw.setdefault("layer_tokens", self.layer_tokens.copy())
        kw.setdefault("audio_tokens", list(self.audio_tokens))
        kw.setdefault("buffers", list(self.buffers))
        return dataclasses.replace(self, **kw)


def encoder_start(model: Whisper, features, n_frames, n_valid_rows: int, *,
                  drop_padding: bool = False) -> EncoderState:
    """Conv stem and positions of one padded batch (see :func:`pooled_encode` for the arguments)."""
    graphdef, params = nnx.split(model.encoder)
    x = _embed_jit(graphdef, params, jnp.asarray(features, jnp.float32))
    b, n = x.shape[:2]
    n_frames = np.minimum(np.asarray(n_frames, np.int64), n)
    row_ok = np.arange(b) < n_valid_rows
    audio = row_ok[:, None] & (np.arange(n)[None, :] < n_frames[:, None])
    valid_np = audio if drop_padding else np.broadcast_to(row_ok[:, None], (b, n))
    return EncoderState(
        x=x, valid=jnp.asarray(valid_np), span=jnp.asarray(audio.astype(np.int32)),
        size=jnp.ones((b, n), jnp.float32), pos=jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (b, n)),
        key_valid=jnp.asarray(valid_np) if drop_padding else None,  # unpooled: every frame, as Whisper
        bias=None, present=valid_np.sum(1).astype(np.int64),
        layer_tokens=np.zeros((b, model.cfg.encoder.layers), np.int64),
        audio_tokens=[audio.sum(1).astype(np.int64)], buffers=[])


def encoder_advance(model: Whisper, st: EncoderState, layer: int) -> EncoderState:
    """Run encoder layers ``st.layer + 1 .. layer``; ``layer = L`` adds the final LayerNorm."""
    big = model.cfg.encoder.layers
    if st.finished or layer < st.layer or layer > big:
        raise ValueError(f"cannot advance an encoder state at layer {st.layer} (finished={st.finished}) "
                         f"to layer {layer} of {big}")
    if layer == st.layer and layer < big:
        return st
    graphdef, params = nnx.split(model.encoder)
    x = _group_jit(graphdef, params, st.x, st.key_valid, st.bias, start=st.layer, end=layer, finish=layer == big)
    out = st.evolve(x=x, layer=layer, finished=layer == big)
    out.layer_tokens[:, st.layer:layer] = st.present[:, None]
    out.buffers.append(int(x.shape[1]))
    return out


def encoder_stage(st: EncoderState, stage: Stage, *, proportional: bool = False, control: str | None = None,
                  groups=None, buckets: Sequence[int] | None = None) -> EncoderState:
    """Pool ``st`` with one stage: the Affinity Pooling ``stage`` (its tau and window), or, with
    ``control`` ("avg" / "drop"), the fixed-rate control keeping ``groups[row]`` audio groups
    (Int['B']; the stage's tau and window are then unused). The packed result is sliced to the
    smallest bucket that holds the batch's longest row. ``proportional``: attention after this
    stage adds log(size) to each key's logit."""
    n = int(st.x.shape[1])
    buckets = buckets or shapes.encoder_buckets(n)
    if control is None:
        # tau is traced (float32): every threshold of a (window, weighted, shape) shares one program
        out = pool_stage_jit(st.x, st.span, st.valid, st.pos, st.size, tau=np.float32(stage.tau),
                             window=stage.window, capacity=n, weighted=stage.weighted, positions="first")
    else:
        if groups is None:
            raise ValueError("a control stage needs groups (audio groups to keep per row)")
        out = uniform_stage_jit(st.x, st.span, st.valid, st.pos, st.size, jnp.asarray(groups, jnp.int32),
                                kind=control, capacity=n)
    n_valid, a_out = jax.device_get((out.n_valid, out.audio_out))
    cap = min(shapes.bucket(max(int(n_valid.max()), 1), tuple(buckets), "encoder frames"), n)
    x, valid, size, span, pos = (a[:, :cap] for a in (out.h, out.valid, out.size, out.span, out.pos))
    return st.evolve(x=x, valid=valid, size=size, span=span, pos=pos, key_valid=valid,
                     bias=_log_size(size) if proportional else None, present=np.asarray(n_valid, np.int64),
                     audio_tokens=st.audio_tokens + [np.asarray(a_out, np.int64)])


def encoder_finish(model: Whisper, st: EncoderState) -> EncodeOut:
    """Run what is left of the encoder and return what the decoder needs."""
    if not st.finished:
        st = encoder_advance(model, st, model.cfg.encoder.layers)
    return EncodeOut(enc=st.x, valid=st.key_valid, bias=st.bias, audio_tokens=np.stack(st.audio_tokens, 1),
                     layer_tokens=st.layer_tokens, enc_len=st.present, buffers=st.buffers)


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
    big = model.cfg.encoder.layers
    for s in pooling.stages:
        if not 0 <= s.layer <= big:
            raise ValueError(f"pooling stage at layer {s.layer}: Whisper stages lie in 0 .. {big} "
                             f"(encoder layers; {big} = the encoder output)")
    st = encoder_start(model, features, n_frames, n_valid_rows, drop_padding=drop_padding)
    buckets = shapes.encoder_buckets(int(st.x.shape[1]))
    for stage in pooling.stages:
        st = encoder_stage(encoder_advance(model, st, stage.layer), stage, proportional=pooling.proportional,
                           buckets=buckets)
    return encoder_finish(model, st)


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


def batch_frames(waves, batch_size: int, cfg: WhisperConfig) -> np.ndarray:
    """Int['batch_size']: audio frames of each waveform (only the first 30 s are heard), 0 for
    the padding rows after them."""
    chunk_samples = cfg.encoder.mel_frames * SAMPLES_PER_FRAME // 2
    frames = [audio_frames(min(len(w), chunk_samples), cfg.encoder) for w in waves]
    return np.asarray(frames + [0] * (batch_size - len(waves)), np.int64)


def decode_encoded(model: Whisper, e: EncodeOut, prompt: Sequence[int], n_valid_rows: int,
                   max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Jitted greedy decoding over a (pooled) encoder output: per real row, the generated ids (no
    prompt, no final eos) and whether it ended with eos before ``max_new_tokens``."""
    return greedy_tokens(model, e.enc, n_valid_rows, prompt, max_new_tokens=max_new_tokens, enc_valid=e.valid,
                         enc_bias=e.bias)


def transcribe_pooled(model: Whisper, processor, waveforms, pooling: PoolingConfig | None = None, *,
                      drop_padding: bool = False, max_new_tokens: int = 128, batch_size: int = 8,
                      language: str = "en", task: str = "transcribe", sampling_rate: int = 16000) -> AsrOut:
    """Greedy short-form transcription (as `modeling.transcribe`) with pooling stages on the encoder.

    Batches are padded to ``batch_size`` with dummy rows. ``pooling=None`` or no stages (and no
    ``drop_padding``) gives the unpooled model's tokens.
    """
    pooling = pooling or PoolingConfig()
    cfg = model.cfg
    prompt = prompt_ids(processor.tokenizer, cfg, language=language, task=task)
    waves = [np.asarray(w, np.float32) for w in waveforms]
    out = AsrOut([], [], [], [], [], [], len(prompt))
    for start in range(0, len(waves), batch_size):
        chunk = waves[start:start + batch_size]
        feats = whisper_features(processor, chunk, batch_size, cfg, sampling_rate)
        frames = batch_frames(chunk, batch_size, cfg)
        e = pooled_encode(model, feats, frames, len(chunk), pooling, drop_padding=drop_padding)
        tokens, finished = decode_encoded(model, e, prompt, len(chunk), max_new_tokens)
        for i in range(len(chunk)):
            out.tokens.append(tokens[i])
            out.finished.append(finished[i])
            out.audio_tokens.append([int(v) for v in e.audio_tokens[i]])
            out.layer_tokens.append([int(v) for v in e.layer_tokens[i]])
            out.enc_len.append(int(e.enc_len[i]))
    out.texts = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
    return out
