"""GLM-4-Voice's speech tokenizer (THUDM/glm-4-voice-tokenizer) in Flax NNX: the discrete audio
stream of Kimi-Audio, 12.5 codes per second in [0, quantize_vocab_size).

The official model (GLM-4-Voice speech_tokenizer/modeling_whisper.py, WhisperVQEncoder) is a
Whisper-large-v3 encoder truncated at layer `quantize_position` (16 of 32), with
  - causal convolutions in the stem (`encoder_causal_convolution`: 2 zeros on the left, none on the right),
  - bidirectional layers under a block-causal mask (`quantize_causal_block_size`, 200 frames = 4 s:
    a frame sees every earlier frame and the rest of its block) that also hides padding keys,
  - average pooling by `pooling_kernel_size` (4) after layer `pooling_position` (16), the block
    shrinking by the same factor for any later layer,
  - after layer `quantize_position`, the nearest codebook row by squared Euclidean distance.
Kimi-Audio's Glm4Tokenizer calls GLM-4-Voice's utils.extract_speech_token: waveforms cut into
30 s pieces, features from the folder's WhisperFeatureExtractor padded to the batch's longest piece
rounded up to one code's worth of samples (1280), codes kept where the feature mask, sliced by 2
(conv2) and by 4 (pooling), is set. `extract_features` and `tokenize` do the same on the host;
the model runs with static shapes: a fixed batch of pieces, their frames cut to one of a few
buckets (FRAME_BUCKETS: 8, 16 or 30 s), so a new clip length compiles nothing new.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.models.layers import Conv1d, abstract_module, attention, map_rows
from affjax.models.whisper.modeling import EncoderConfig, EncoderLayer, _act, _gelu_exact
from affjax.models.whisper.params import ENCODER_KEYS
from affjax.runtime.compiles import traced

SEGMENT_SECONDS = 30  # extract_speech_token cuts audio into pieces of 30 s
FE_BATCH = 128  # ... and extracts features 128 pieces at a time (each batch padded to its longest)
# mel frames a batch of pieces is cut to (8, 16, 30 s; multiples of 8 mel frames = one code): the
# smallest that holds the batch's codes, so short clips skip most of the 30 s window
FRAME_BUCKETS = (800, 1600, 3000)
CONV_STRIDE = 2  # conv1 stride 1 times conv2 stride 2: mel frames per encoder frame


@dataclasses.dataclass(frozen=True)
class SpeechTokenizerConfig:
    """Defaults are the real checkpoint's. `encoder.layers` is `quantize_position`: the layers
    above the quantizer never change the codes, and the tokenizer checkpoint does not hold them."""
    encoder: EncoderConfig = EncoderConfig(num_mel_bins=128, d_model=1280, layers=16, heads=20, ffn_dim=5120)
    pooling_kernel_size: int = 4
    pooling_position: int = 16
    vocab_size: int = 16384
    block_size: int | None = 200  # encoder frames (before pooling); None: attention masks padding only

    @classmethod
    def from_hf(cls, c: dict) -> "SpeechTokenizerConfig":
        """From the tokenizer's config.json (a WhisperVQConfig). Training-only fields (dropouts,
        quantize_commit_coefficient, quantize_loss_scale, quantize_ema_decay, quantize_restart_interval)
        and scale_embedding (the VQ encoder never applies it) are ignored."""
        def bad(msg):
            raise ValueError(f"GLM-4-Voice speech tokenizer config: {msg}")

        if c.get("quantize_vocab_size") is None:
            bad("quantize_vocab_size is not set (a WhisperVQ model without a quantizer has no codes)")
        if c.get("pooling_type", "max") != "avg":
            bad(f"pooling_type {c.get('pooling_type', 'max')!r} is not supported (only 'avg', the real checkpoint's)")
        k = c.get("pooling_kernel_size")
        if not isinstance(k, int) or k < 1:
            bad(f"pooling_kernel_size must be a positive int, got {k!r}")
        q = c.get("quantize_position", 16)
        if not 1 <= q <= c["encoder_layers"]:
            bad(f"quantize_position {q} is not a layer of the {c['encoder_layers']}-layer encoder")
        p = c.get("pooling_position", 0)
        if not 1 <= p <= q:  # the official code asserts quantize_position >= pooling_position
            bad(f"pooling_position {p} must be in [1, quantize_position={q}]")
        if not c.get("encoder_causal_convolution", False):
            bad("encoder_causal_convolution must be true (only the causal stem of the real checkpoint is supported)")
        if c.get("encoder_causal_attention", False) or c.get("quantize_causal_encoder", False):
            bad("encoder_causal_attention / quantize_causal_encoder (strictly causal SDPA layers that drop the "
                "padding mask) are not supported; the real checkpoint uses neither")
        block = c.get("quantize_causal_block_size")
        if block is not None and (not isinstance(block, int) or block < k):
            bad(f"quantize_causal_block_size must be None or an int >= pooling_kernel_size={k}, got {block!r}")
        _act(c.get("activation_function", "gelu"))  # raises for an activation the layers lack
        return cls(encoder=dataclasses.replace(EncoderConfig.from_hf(c), layers=q), pooling_kernel_size=k,
                   pooling_position=p, vocab_size=c["quantize_vocab_size"], block_size=block)

    @property
    def quantize_position(self) -> int:
        return self.encoder.layers

    @property
    def frames_per_code(self) -> int:
        """Mel frames per code: conv2 halves them, pooling divides by the kernel (2 * 4 = 8, 80 ms)."""
        return CONV_STRIDE * self.pooling_kernel_size

    @property
    def max_frames(self) -> int:
        """The most mel frames the position table allows: 3000, one 30 s piece."""
        return self.encoder.mel_frames

    def num_codes(self, frames):
        """Codes of a piece with `frames` valid mel frames (int or integer array): the official
        mask slicing [::2][::4] keeps ceil(frames / 8) positions."""
        return -(-frames // self.frames_per_code)

    def num_codes_for_samples(self, n_samples: int, *, hop_length: int = 160, sampling_rate: int = 16000) -> int:
        """Codes `tokenize` (and the official extract_speech_token) gives a waveform of n_samples:
        per 30 s piece, ceil(samples / hop_length) valid frames (the feature extractor's mask)."""
        step = SEGMENT_SECONDS * sampling_rate
        return sum(self.num_codes(-(-min(step, n_samples - s) // hop_length)) for s in range(0, n_samples, step))


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, block: int | None
                           ) -> jax.Array:
    """q/k/v: ['B T H hd'], valid: Bool['B T'] (False: padding key) -> ['B T H hd'].

    The official mask (tril | block_diag) lets a query see every key before the end of its own
    block. So each block of queries is one row of `layers.attention` with a key mask: the keys up
    to its block's end. One call over B * blocks rows (keys repeated per block) keeps the key-mask
    form, which on XLA:CPU runs in cache-sized blocks: 8x faster at T = 1500 than one
    (H, T, T) masked softmax. block None: one block, padding keys hidden only."""
    b, t, h, hd = q.shape
    size = t if block is None else block
    n = -(-t // size)
    qb = jnp.pad(q, ((0, 0), (0, n * size - t), (0, 0), (0, 0))).reshape(b * n, size, h, hd)
    rep = lambda y: jnp.broadcast_to(y[:, None], (b, n, *y.shape[1:])).reshape(b * n, *y.shape[1:])
    ends = jnp.arange(1, n + 1) * size
    seen = valid[:, None, :] & (jnp.arange(t)[None, None, :] < ends[None, :, None])  # ['B n T']
    out = attention(qb, rep(k), rep(v), key_valid=seen.reshape(b * n, t))
    return out.reshape(b, n * size, h, hd)[:, :t]


class BlockCausalLayer(EncoderLayer):
    """Whisper's encoder layer (same parameters, same names) under the block-causal mask."""

    def __call__(self, x: jax.Array, valid: jax.Array, block: int | None) -> jax.Array:
        """x: ['B T D'], valid: Bool['B T'] (keys that are not padding), block: frames per block."""
        b, t, d = x.shape
        h = self.self_attn_layer_norm(x)
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        a = block_causal_attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), valid, block)
        x = x + self.out_proj(a.reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class SpeechCodes(NamedTuple):
    codes: jax.Array  # Int32['B N'], -1 past each row's count
    counts: jax.Array  # Int32['B'] valid codes per row
    hidden: jax.Array  # Float32['B N D'] the states the quantizer reads


class WhisperVQEncoder(nnx.Module):
    """mel features ['B n_mels F'] + valid frames Int['B'] -> codes. F must be a multiple of
    `frames_per_code` and at most `max_frames`; frames past a row's length do not change its codes
    (the convolutions are causal, padding keys are masked, and pooling windows start at 0)."""

    def __init__(self, cfg: SpeechTokenizerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        e = cfg.encoder
        # causal convolutions: the left padding is applied in `embed`, none inside the conv
        self.conv1 = Conv1d(e.num_mel_bins, e.d_model, kernel=3, stride=1, padding=0, dtype=dtype, rngs=rngs)
        self.conv2 = Conv1d(e.d_model, e.d_model, kernel=3, stride=CONV_STRIDE, padding=0, dtype=dtype, rngs=rngs)
        self.embed_positions = nnx.Param(jnp.zeros((e.max_source_positions, e.d_model), dtype))
        self.layers = nnx.List([BlockCausalLayer(e, dtype=dtype, rngs=rngs) for _ in range(e.layers)])
        self.codebook = nnx.Param(jnp.zeros((cfg.vocab_size, e.d_model), dtype))

    def embed(self, features: jax.Array) -> jax.Array:
        """Causal conv stem plus positions: ['B n_mels F'] -> ['B F/2 D']."""
        causal = lambda y: jnp.pad(y, ((0, 0), (2, 0), (0, 0)))  # (kernel - 1) zeros before the first frame
        x = jnp.swapaxes(features, 1, 2).astype(self.embed_positions.dtype)
        x = _gelu_exact(self.conv1(causal(x)))
        x = _gelu_exact(self.conv2(causal(x)))
        return x + self.embed_positions[...][: x.shape[1]]

    def hidden_states(self, features: jax.Array, lengths: jax.Array) -> jax.Array:
        """The pre-quantizer states ['B F/8 D'] (float32) of features ['B n_mels F'] with lengths Int['B']."""
        cfg, k = self.cfg, self.cfg.pooling_kernel_size
        f = features.shape[-1]
        if f % cfg.frames_per_code or f > cfg.max_frames:
            raise ValueError(f"{f} feature frames: need a multiple of {cfg.frames_per_code}, "
                             f"at most {cfg.max_frames}")
        x = self.embed(features)
        # the official masks are the feature mask sliced [::2] (then [::k]): position j is valid
        # when its first frame is, i.e. j < ceil(length / stride)
        valid_of = lambda stride: jnp.arange(f // stride)[None, :] < -(-lengths[:, None] // stride)
        valid, block = valid_of(CONV_STRIDE), cfg.block_size
        for i, layer in enumerate(self.layers):
            x = layer(x, valid, block)
            if i + 1 == cfg.pooling_position:
                b, t, d = x.shape
                x = x.reshape(b, t // k, k, d).astype(jnp.float32).mean(2).astype(x.dtype)
                valid, block = valid_of(cfg.frames_per_code), None if block is None else block // k
        return x.astype(jnp.float32)

    def quantize(self, hidden: jax.Array) -> jax.Array:
        """Nearest codebook row, Int32['B N'], by the official |x|^2 + |c|^2 - 2 x.c (first index on ties).
        HIGHEST precision: a TPU's default float32 matmul (bfloat16 passes) would move near-ties."""
        c = self.codebook[...].astype(jnp.float32)
        xc = jnp.einsum("bnd,vd->bnv", hidden, c, precision=jax.lax.Precision.HIGHEST)
        dist = (jnp.square(hidden).sum(-1, keepdims=True) + jnp.square(c).sum(-1)) - 2.0 * xc
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    def forward(self, features: jax.Array, lengths: jax.Array) -> SpeechCodes:
        lengths = lengths.astype(jnp.int32)
        hidden = map_rows(self.hidden_states, features, lengths)
        counts = self.cfg.num_codes(lengths)
        codes = jnp.where(jnp.arange(hidden.shape[1])[None, :] < counts[:, None], self.quantize(hidden), -1)
        return SpeechCodes(codes, counts, hidden)

    def __call__(self, features: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> codes Int32['B F/8'] (-1 past each row's count), counts Int32['B']."""
        out = self.forward(features, lengths)
        return out.codes, out.counts


@jax.jit
def _encode_jit(graphdef, params, features, lengths):
    traced("glm4_speech_tokenizer")
    return nnx.merge(graphdef, params).forward(features, lengths)


def encode(model: WhisperVQEncoder, features, lengths) -> SpeechCodes:
    """Jitted `model.forward`: one compile per (batch, frames) shape."""
    graphdef, params = nnx.split(model)
    return _encode_jit(graphdef, params, jnp.asarray(features, jnp.float32), jnp.asarray(lengths, jnp.int32))


# ----------------------------------------------------------------------------------------------
# weights

# Tokenizer checkpoint keys (no prefix) -> WhisperVQEncoder paths: Whisper's encoder rows without
# the final LayerNorm (the stack stops at the quantizer), plus the codebook.
SPEECH_TOKENIZER_KEYS: list[tuple[str, str, str]] = [
    *[row for row in ENCODER_KEYS if not row[0].startswith("layer_norm.")],
    ("codebook.weight", "codebook", "copy"),
]
# A whole WhisperVQ model (GLM-4-Voice's load_quantize_encoder reads `model.encoder.*` from one).
SPEECH_TOKENIZER_ALIASES: list[tuple[str, str]] = [("model.encoder.", "")]

_UNUSED = re.compile(
    r"^(embed_positions2\.weight"  # positions for layers after the quantizer: none in the tokenizer
    r"|ema_count|ema_weight"  # training-time EMA codebook buffers
    r"|layer_norm\.(weight|bias)|model\.decoder\..*|proj_out\.weight)$")  # a whole model's top and decoder


def speech_tokenizer_ignore(key: str, cfg: SpeechTokenizerConfig) -> bool:
    """Checkpoint tensors (canonical keys) the tokenizer does not use, skipped silently: the above,
    and layers at or past quantize_position (a whole model, or quantize_encoder_only false)."""
    m = re.match(r"^layers\.(\d+)\.", key)
    return bool(_UNUSED.match(key)) or (m is not None and int(m.group(1)) >= cfg.quantize_position)


def load_hf_folder(src: str | Path, *, dtype=jnp.float32) -> tuple[WhisperVQEncoder, SpeechTokenizerConfig]:
    """The tokenizer from its Hugging Face folder (config.json + safetensors), through the
    converter's reader and the streaming loader: every problem with the weights in one WeightError."""
    from affjax.models.checkpoint import open_weights  # deferred: checkpoint imports the model families
    from affjax.models.weights import KeyTable, load_streaming

    src = Path(src)
    cfg = SpeechTokenizerConfig.from_hf(json.loads((src / "config.json").read_text()))
    abstract = abstract_module(lambda rngs: WhisperVQEncoder(cfg, dtype=dtype, rngs=rngs))
    table = KeyTable(SPEECH_TOKENIZER_KEYS, SPEECH_TOKENIZER_ALIASES)
    state = load_streaming(abstract, table, open_weights(src), dtype=dtype,
                           ignore=lambda k: speech_tokenizer_ignore(table.canonical(k), cfg))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, state), cfg


# ----------------------------------------------------------------------------------------------
# host side: waveforms -> features -> codes


class SpeechFeatures(NamedTuple):
    features: np.ndarray  # Float32['S n_mels F'], one row per 30 s piece, zeros past the extractor's padding
    lengths: np.ndarray  # Int32['S'] valid frames (the extractor's attention mask)
    owner: np.ndarray  # Int32['S'] index of the waveform each piece comes from


def extract_features(fe, waves, cfg: SpeechTokenizerConfig, *, num_frames: int | None = None) -> SpeechFeatures:
    """16 kHz waveforms (any length) -> features as extract_speech_token computes them: 30 s pieces,
    FE_BATCH at a time through the WhisperFeatureExtractor `fe`, padded to the batch's longest piece
    rounded up to a code's worth of samples. Each piece's padding region (within its last code) is
    the extractor's, so codes equal the official ones for the same list of waveforms (Kimi-Audio
    tokenizes one waveform per call). Rows are then zero-padded to num_frames (default max_frames)."""
    if fe.feature_size != cfg.encoder.num_mel_bins:
        raise ValueError(f"feature extractor gives {fe.feature_size} mel bins, "
                         f"the model takes {cfg.encoder.num_mel_bins}")
    num_frames = cfg.max_frames if num_frames is None else num_frames
    step = SEGMENT_SECONDS * fe.sampling_rate
    pieces = [(i, np.asarray(w, np.float32)[s:s + step]) for i, w in enumerate(waves) for s in range(0, len(w), step)]
    feats, lengths = [], []
    for start in range(0, len(pieces), FE_BATCH):
        out = fe([p for _, p in pieces[start:start + FE_BATCH]], sampling_rate=fe.sampling_rate,
                 return_attention_mask=True, return_tensors="np", padding="longest",
                 pad_to_multiple_of=cfg.frames_per_code * fe.hop_length)
        x = out["input_features"]
        if x.shape[-1] > num_frames:
            raise ValueError(f"pieces need {x.shape[-1]} frames, more than num_frames={num_frames}")
        feats.append(np.pad(x, ((0, 0), (0, 0), (0, num_frames - x.shape[-1]))))
        lengths.append(out["attention_mask"].sum(1))
    if not pieces:
        return SpeechFeatures(np.zeros((0, cfg.encoder.num_mel_bins, num_frames), np.float32),
                              np.zeros(0, np.int32), np.zeros(0, np.int32))
    return SpeechFeatures(np.concatenate(feats).astype(np.float32), np.concatenate(lengths).astype(np.int32),
                          np.asarray([i for i, _ in pieces], np.int32))


def encode_pieces(model: WhisperVQEncoder, sf: SpeechFeatures, *, batch_size: int = 8,
                  buckets: tuple[int, ...] = FRAME_BUCKETS) -> SpeechCodes:
    """`encode` over every piece of `sf` -> numpy arrays in sf's order, F/8 code columns (-1 and
    zeros past each row's count). Pieces run `batch_size` at a time, shortest first so that similar
    lengths share a batch; a batch's frames are cut to the smallest bucket holding its longest
    piece's codes (later frames never change them: see WhisperVQEncoder) and the last batch is
    padded with rows of no frames. So any waveforms compile once per (batch_size, bucket)."""
    cfg, per = model.cfg, model.cfg.frames_per_code
    n, F = len(sf.lengths), sf.features.shape[-1]
    sizes = sorted({min(b, F) for b in buckets} | {F})
    if any(f % per for f in sizes):
        raise ValueError(f"frame buckets {sizes} must be multiples of {per}")
    codes = np.full((n, F // per), -1, np.int32)
    counts = np.zeros(n, np.int32)
    hidden = np.zeros((n, F // per, cfg.encoder.d_model), np.float32)
    order = np.argsort(sf.lengths, kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        need = int(cfg.num_codes(sf.lengths[idx].max())) * per
        f = next(s for s in sizes if s >= need)
        pad = batch_size - len(idx)
        out = encode(model, np.pad(sf.features[idx, :, :f], ((0, pad), (0, 0), (0, 0))),
                     np.pad(sf.lengths[idx], (0, pad)))
        c, k, h = (np.asarray(a)[:len(idx)] for a in out)
        codes[idx, :f // per], counts[idx], hidden[idx, :f // per] = c, k, h
    return SpeechCodes(codes, counts, hidden)


def tokenize(model: WhisperVQEncoder, fe, waves, *, batch_size: int = 8,
             buckets: tuple[int, ...] = FRAME_BUCKETS) -> list[np.ndarray]:
    """Codes (Int32, 12.5 per second) of each 16 kHz waveform, its 30 s pieces' codes in order, as
    Kimi-Audio's Glm4Tokenizer gives them: one extract_speech_token call per waveform (features
    of its pieces padded together, to its longest piece). The pieces of all the waveforms then run
    through the model together (encode_pieces), `batch_size` pieces per call: the codes are those
    of one clip per call."""
    parts = [extract_features(fe, [w], model.cfg) for w in waves]
    if not parts:
        return []
    owner = np.concatenate([np.full(len(p.lengths), i, np.int32) for i, p in enumerate(parts)])
    sf = SpeechFeatures(np.concatenate([p.features for p in parts]), np.concatenate([p.lengths for p in parts]), owner)
    out = encode_pieces(model, sf, batch_size=batch_size, buckets=buckets)
    pieces = [out.codes[i, :out.counts[i]] for i in range(len(owner))]
    return [np.concatenate([pieces[i] for i in np.flatnonzero(owner == w)] or [np.zeros(0, np.int32)])
            for w in range(len(waves))]
