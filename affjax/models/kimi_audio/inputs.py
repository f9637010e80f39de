"""Host-side inputs for Kimi-Audio: the prompt manager's two streams, Whisper features per 30 s
window, and padding into static-shape batches (affjax/runtime/shapes.py).

The streams, as kimia_infer/api/prompt_manager.py builds them for user messages followed by the
assistant's turn (text output). For an instruction of P text tokens then a clip of N speech codes:

    audio: user_start | blank x P | media_begin | code + offset x N | media_end | speech_ct | msg_end | assistant_start
    text:  blank      | prompt    | blank       | blank x N         | blank     | blank     | blank   | blank

(151670, 151666, 151661, 152064 + code, 151663, 151675, 151645, 151671; the code positions are
the "continuous" ones that also take the Whisper features). Each decode step then feeds
(audio blank, the sampled text token) until <|im_kimia_text_eos|> (151667): a scored
continuation is appended the same way.

Audio longer than 30 s is cut into consecutive 30 s windows, each encoded on its own and the
windows' tokens concatenated into one audio span (kimia_infer/models/tokenizer/whisper_Lv3
whisper.py `tokenize_waveform`); a window of L samples gives (L - 1) // 1280 + 1 tokens, the count
the GLM-4-Voice tokenizer gives for the same window, so codes and features pair up one to one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from affjax.data.audio import split_windows
from affjax.models.kimi_audio.tokenizer import KIMI_TOKENS, KimiTokens, encode_text
from affjax.runtime import shapes

SAMPLE_RATE = 16000
WINDOW_SECONDS = 30
SAMPLES_PER_TOKEN = 1280  # 160-sample mel hop x conv stride 2 x 4 stacked frames: 12.5 Hz
TOKEN_OFFSET = 152064     # kimia_token_offset of the release


def window_tokens(n_samples: int) -> int:
    """12.5 Hz tokens of one window of n_samples (>= 1) samples."""
    return (n_samples - 1) // SAMPLES_PER_TOKEN + 1


def code_count(wave: np.ndarray, sr: int = SAMPLE_RATE) -> int:
    """Speech codes (= continuous tokens) a clip gives: the sum over its 30 s windows."""
    return sum(window_tokens(len(w)) for w in split_windows(wave, sr, WINDOW_SECONDS))


def window_features(feature_extractor, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whisper log-mel features of each 30 s window: (Float32['w n_mels F'], valid frames Int32['w']),
    each window padded to the extractor's 30 s (F = 3000)."""
    wins = split_windows(np.asarray(wave, np.float32), feature_extractor.sampling_rate, WINDOW_SECONDS)
    out = feature_extractor(wins, sampling_rate=feature_extractor.sampling_rate, padding="max_length",
                            return_attention_mask=True, return_tensors="np")
    return out["input_features"].astype(np.float32), out["attention_mask"].sum(-1).astype(np.int32)


def prompt_streams(parts: Sequence[tuple[str, Sequence[int]]], tokens: KimiTokens = KIMI_TOKENS,
                   token_offset: int = TOKEN_OFFSET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (audio ids, text ids, continuous) streams Int32['n'], Int32['n'], Bool['n'] of one user
    turn of messages ("text", token ids) / ("audio", speech codes 0..), in order, followed by the
    assistant's start (get_prompt with output_type="text"): the role token once, then each
    message; the last message closes with <|im_kimia_speech_ct_id|> when it is audio, and
    <|im_msg_end|>."""
    if not parts:
        raise ValueError("a prompt needs at least one message")
    audio, text, cont = [], [], []

    def put(a: int, t: int, c: bool = False):
        audio.append(a)
        text.append(t)
        cont.append(c)

    blank = tokens.text_blank
    put(tokens.user_msg_start, blank)
    for i, (kind, ids) in enumerate(parts):
        last = i == len(parts) - 1
        if kind == "text":
            for t in ids:
                put(blank, int(t))
        elif kind == "audio":
            put(tokens.media_begin, blank)
            for c in ids:
                put(token_offset + int(c), blank, True)
            put(tokens.media_end, blank)
            if last:
                put(tokens.speech_ct, blank)
        else:
            raise ValueError(f"message kind {kind!r} is not 'text' or 'audio'")
        if last:
            put(tokens.msg_end, blank)
    put(tokens.assistant_msg_start, blank)
    return np.asarray(audio, np.int32), np.asarray(text, np.int32), np.asarray(cont, bool)


@dataclasses.dataclass
class Encoded:
    """One item: its unpadded streams and its windows' features."""
    ids: np.ndarray                # Int32['n 2'] the (audio, text) streams
    continuous: np.ndarray         # Bool['n'] speech-code positions
    features: np.ndarray           # Float32['w n_mels F'] one row per 30 s window, in order
    feature_lengths: np.ndarray    # Int32['w'] valid mel frames
    cont_ids: np.ndarray | None = None  # Int32['k'] continuation text ids (score)
    pending: np.ndarray | None = None   # the clip, while its speech codes are still to be filled (with_codes)


def with_codes(enc: Encoded, codes: Sequence[int], *, token_offset: int = TOKEN_OFFSET) -> Encoded:
    """`enc` with its speech codes (0.., one per continuous position, in order) in the audio stream."""
    codes = np.asarray(codes, np.int64)
    want = int(enc.continuous.sum())
    if len(codes) != want:
        raise ValueError(f"{len(codes)} speech codes for {want} speech positions")
    ids = enc.ids.copy()
    ids[enc.continuous, 0] = token_offset + codes
    return dataclasses.replace(enc, ids=ids, pending=None)


def encode(tokenizer, feature_extractor, instruction: str, wave: np.ndarray, codes: Sequence[int],
           continuation: str | None = None, *, tokens: KimiTokens = KIMI_TOKENS,
           token_offset: int = TOKEN_OFFSET, audio_first: bool = False, cont_eos: bool = False) -> Encoded:
    """An instruction and a clip (16 kHz samples, with its GLM-4-Voice codes 0.., one per 12.5 Hz
    token) as one user turn, instruction first unless audio_first; `continuation` (text) to score
    after the assistant's start, with <|im_kimia_text_eos|> appended when cont_eos. Raises
    ValueError when the codes do not number the clip's tokens."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1 or len(wave) == 0:
        raise ValueError("the clip must be a non-empty 1-D waveform")
    want = code_count(wave, feature_extractor.sampling_rate)
    codes = np.asarray(codes, np.int64)
    if len(codes) != want:
        raise ValueError(f"{len(codes)} speech codes for a clip of {len(wave)} samples, which gives {want} tokens")
    text = ("text", encode_text(tokenizer, instruction))
    parts = [("audio", codes), text] if audio_first else [text, ("audio", codes)]
    audio_ids, text_ids, cont = prompt_streams(parts, tokens, token_offset)
    feats, flen = window_features(feature_extractor, wave)
    cont_ids = None
    if continuation is not None:
        ids = encode_text(tokenizer, continuation) + ([tokens.text_eos] if cont_eos else [])
        if not ids:
            raise ValueError("continuation tokenizes to zero tokens")
        cont_ids = np.asarray(ids, np.int32)
    return Encoded(np.stack([audio_ids, text_ids], axis=-1), cont, feats, flen, cont_ids)


@dataclasses.dataclass
class Batch:
    """A padded batch with the fields of qwen2_audio.inputs.Batch, so the engine
    (affjax.runtime.engine) takes either; KimiAudio.embed_batch reads the arrays. B = fixed batch
    size, T = sequence bucket, W = window slots, K = continuation bucket."""
    ids: np.ndarray              # Int32['B T 2'] the (audio, text) streams
    valid: np.ndarray            # Bool['B T']
    n_prompt: np.ndarray         # Int32['B'] prompt length (without the continuation)
    span: np.ndarray             # Int32['B T'] 1 at the speech-code positions (the audio span pooling merges)
    audio_index: np.ndarray      # Int32['B T'] flat index w*F_tok + k of each code position's feature
    features: np.ndarray         # Float32['W n_mels F']
    feature_lengths: np.ndarray  # Int32['W'] (padding slots: a full window, never gathered)
    rows: int                    # real rows (the rest are padding)
    cont_ids: np.ndarray | None = None    # Int32['B K']
    cont_valid: np.ndarray | None = None  # Bool['B K']


def collate(items: list[Encoded], *, batch_size: int, tokens_per_window: int, tokens: KimiTokens = KIMI_TOKENS,
            seq_len: int | None = None, cont_len: int | None = None) -> Batch:
    """Pad encoded items into one Batch; `tokens_per_window` is the model's
    (KimiAudioConfig.tokens_per_window, 375); `seq_len`/`cont_len` force a bucket, else the
    smallest that fits. Padding positions hold blanks in both streams."""
    if not 0 < len(items) <= batch_size:
        raise ValueError(f"need 1..{batch_size} items, got {len(items)}")
    score = items[0].cont_ids is not None
    if any((e.cont_ids is not None) != score for e in items):
        raise ValueError("either every item has a continuation or none has")
    lengths = [len(e.ids) + (len(e.cont_ids) if score else 0) for e in items]
    T = seq_len or shapes.bucket(max(lengths))
    if max(lengths) > T:
        raise ValueError(f"an item of {max(lengths)} positions does not fit seq_len {T}")
    B = batch_size
    W = shapes.audio_slots(sum(len(e.features) for e in items), batch_size)
    n_mels, F = items[0].features.shape[1:]
    per = F // tokens_per_window  # mel frames per 12.5 Hz token (8)
    blank = tokens.text_blank
    ids = np.full((B, T, 2), blank, np.int32)
    valid = np.zeros((B, T), bool)
    span = np.zeros((B, T), np.int32)
    feat_index = np.zeros((B, T), np.int32)
    features = np.zeros((W, n_mels, F), np.float32)
    feature_lengths = np.full((W,), F, np.int32)
    n_prompt = np.zeros((B,), np.int32)
    w = 0
    for b, e in enumerate(items):
        n = len(e.ids)
        ids[b, :n], span[b, :n] = e.ids, e.continuous
        valid[b, :lengths[b]] = True
        n_prompt[b] = n
        if score:  # each continuation step: audio blank, text token
            ids[b, n:lengths[b], 1] = e.cont_ids
        # the code positions, in order, take the windows' tokens in order
        slots = np.concatenate([(w + i) * tokens_per_window + np.arange(int(k))
                                for i, k in enumerate((e.feature_lengths + per - 1) // per)]) \
            if len(e.features) else np.zeros(0, np.int64)
        pos = np.flatnonzero(e.continuous)
        if len(pos) != len(slots):
            raise ValueError(f"item {b}: {len(pos)} speech codes but its windows give {len(slots)} tokens")
        feat_index[b, pos] = slots
        features[w:w + len(e.features)] = e.features
        feature_lengths[w:w + len(e.features)] = e.feature_lengths
        w += len(e.features)
    batch = Batch(ids, valid, n_prompt, span, feat_index, features, feature_lengths, rows=len(items))
    if score:
        batch.cont_ids, batch.cont_valid = shapes.pad_continuations([e.cont_ids for e in items], B, cont_len)
    return batch
