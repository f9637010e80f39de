"""Host-side input building for Qwen2-Audio: the Hugging Face processor makes the token ids and
mel features (so token counts match transformers exactly), then items are padded into one
static-shape batch (see affjax/runtime/shapes.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from affjax.data.audio import split_windows
from affjax.runtime import shapes


@dataclasses.dataclass
class Encoded:
    """One item after the processor: unpadded ids and its audio clips' features."""
    ids: np.ndarray                 # Int['n'] prompt ids (audio placeholders expanded)
    features: np.ndarray            # Float['a n_mels F']
    feature_lengths: np.ndarray     # Int['a']
    cont_ids: np.ndarray | None = None  # Int['k'] continuation ids (score)
    words: np.ndarray | None = None     # Float['w 2'] [start, end) seconds of the clip's words (oracle runs)
    seed: int = 0                       # the item's seed for random oracle interventions


@dataclasses.dataclass
class Batch:
    """A padded batch. B = fixed batch size, T = sequence bucket, A = audio slots, K = continuation bucket."""
    ids: np.ndarray            # Int32['B T']
    valid: np.ndarray          # Bool['B T']
    n_prompt: np.ndarray       # Int32['B'] unpooled prompt length (without continuation)
    span: np.ndarray           # Int32['B T'] audio span id (0 = text)
    audio_index: np.ndarray    # Int32['B T'] flat index a*F_out + k of the audio token for each placeholder
    features: np.ndarray       # Float32['A n_mels F']
    feature_lengths: np.ndarray  # Int32['A']
    rows: int                  # real rows (the rest are padding)
    cont_ids: np.ndarray | None = None    # Int32['B K']
    cont_valid: np.ndarray | None = None  # Bool['B K']
    words: np.ndarray | None = None       # Float32['B W 2'] word [start, end) seconds, empty past each row's words
    seeds: np.ndarray | None = None       # Int32['B'] per-row seeds (affjax.pooling.oracle)


WINDOW_SECONDS = 30  # Qwen2-Audio's feature window; window_prompt takes the processor's own


def audio_block(processor) -> str:
    """The text that stands for one clip in a prompt: ``<|audio_bos|><|AUDIO|><|audio_eos|>``."""
    return processor.audio_bos_token + processor.audio_token + processor.audio_eos_token


def window_prompt(processor, prompt: str, audios: list[np.ndarray], sr: int,
                  seconds: float | None = None) -> tuple[str, list[np.ndarray]]:
    """Split clips longer than ``seconds`` (default: the processor's own feature window,
    ``feature_extractor.chunk_length``, 30 s for Qwen2-Audio) into windows, each its own clip: the
    prompt's block for that clip is repeated once per window, so the windows become consecutive
    audio spans (never merged across by pooling). Raises ValueError when blocks and clips do not
    pair up."""
    if seconds is None:
        seconds = getattr(getattr(processor, "feature_extractor", None), "chunk_length", None) or WINDOW_SECONDS
    block = audio_block(processor)
    parts = prompt.split(block)
    if len(parts) - 1 != len(audios):
        raise ValueError(f"prompt has {len(parts) - 1} audio block(s) {block!r} but the item has "
                         f"{len(audios)} audio file(s)")
    out, clips = [parts[0]], []
    for wave, tail in zip(audios, parts[1:]):
        wins = split_windows(wave, sr, seconds)
        clips += wins
        out.append(block * len(wins) + tail)
    return "".join(out), clips


def encode(processor, prompt: str, audios: list[np.ndarray], continuation: str | None = None) -> Encoded:
    """Run the HF processor on one item. Raises ValueError with the processor's reason on bad input."""
    fe = processor.feature_extractor
    if audios:
        out = processor(text=[prompt], audio=list(audios), sampling_rate=fe.sampling_rate, return_tensors="np")
        feats = out["input_features"].astype(np.float32)
        flen = out["feature_attention_mask"].sum(-1).astype(np.int32)
    else:
        out = processor.tokenizer([prompt], return_tensors="np")
        feats = np.zeros((0, fe.feature_size, fe.nb_max_frames), np.float32)
        flen = np.zeros((0,), np.int32)
    ids = out["input_ids"][0].astype(np.int32)
    cont = None
    if continuation is not None:
        cont = np.asarray(processor.tokenizer(continuation, add_special_tokens=False)["input_ids"], np.int32)
        if cont.size == 0:
            raise ValueError("continuation tokenizes to zero tokens")
    return Encoded(ids, feats, flen, cont)


def _placeholder_runs(ids: np.ndarray, audio_token_id: int) -> list[tuple[int, int]]:
    """[(start, end)] of each run of audio placeholder tokens, in order."""
    is_audio = ids == audio_token_id
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_audio.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def check_clips(e: Encoded, audio_token_id: int, out_frames_of, sampling_rate: int | None = None) -> None:
    """One item's audio placeholders pair up with its clips, each clip giving at least one audio
    token; else ValueError naming the clip and the cause (a clip of 20 ms or less gives none)."""
    runs = _placeholder_runs(e.ids, audio_token_id)
    want = [int(out_frames_of(np.asarray(f))) for f in e.feature_lengths]
    for k, w in enumerate(want):
        if w < 1:
            secs = "" if sampling_rate is None else f" ({int(e.feature_lengths[k]) * 160 / sampling_rate:.3f} s)"
            raise ValueError(f"audio clip {k + 1}{secs} is too short: it gives no audio token (the encoder needs "
                             "more than 20 ms)")
    if len(runs) != len(want):
        raise ValueError(f"prompt has {len(runs)} audio placeholder runs but {len(want)} clips")
    for k, ((s0, s1), w) in enumerate(zip(runs, want)):
        if s1 - s0 != w:
            raise ValueError(f"audio clip {k + 1}: {s1 - s0} placeholder tokens but the encoder gives {w}")


def collate(items: list[Encoded], *, batch_size: int, audio_token_id: int, out_frames_of,
            pad_id: int = 0, seq_len: int | None = None, cont_len: int | None = None) -> Batch:
    """Pad encoded items into one Batch. `out_frames_of(feature_lengths)` gives audio tokens per clip
    (the encoder's output lengths); `seq_len`/`cont_len` force a bucket, else the smallest that fits."""
    if not 0 < len(items) <= batch_size:
        raise ValueError(f"need 1..{batch_size} items, got {len(items)}")
    score = items[0].cont_ids is not None
    lengths = [len(e.ids) + (len(e.cont_ids) if score else 0) for e in items]
    T = seq_len or shapes.bucket(max(lengths))
    n_audio = sum(len(e.feature_lengths) for e in items)
    A = shapes.audio_slots(n_audio, batch_size)
    n_mels, F = items[0].features.shape[1:]  # the processor pads every clip to the same frames
    B = batch_size
    ids = np.full((B, T), pad_id, np.int32)
    valid = np.zeros((B, T), bool)
    span = np.zeros((B, T), np.int32)
    aidx = np.zeros((B, T), np.int32)
    n_prompt = np.zeros((B,), np.int32)
    feats = np.zeros((A, n_mels, F), np.float32)
    flen = np.ones((A,), np.int32)
    F_out = int(out_frames_of(np.asarray(F)))  # encoder output frames per clip slot
    a = 0
    for b, e in enumerate(items):
        n = len(e.ids)
        seq = e.ids if not score else np.concatenate([e.ids, e.cont_ids])
        ids[b, :len(seq)] = seq
        valid[b, :len(seq)] = True
        n_prompt[b] = n
        # placeholder runs, in order, belong to this item's clips in order
        check_clips(e, audio_token_id, out_frames_of)
        for k, (s0, run) in enumerate(_placeholder_runs(e.ids, audio_token_id)):
            feats[a] = e.features[k]
            flen[a] = e.feature_lengths[k]
            span[b, s0:run] = k + 1
            aidx[b, s0:run] = a * F_out + np.arange(run - s0)
            a += 1
    batch = Batch(ids, valid, n_prompt, span, aidx, feats, flen, rows=len(items))
    if score:
        batch.cont_ids, batch.cont_valid = shapes.pad_continuations([e.cont_ids for e in items], B, cont_len)
    if items[0].words is not None:
        batch.words, batch.seeds = pad_words([e.words for e in items], [e.seed for e in items], B)
    return batch


def pad_words(words: list[np.ndarray], seeds: list[int], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's word [start, end) seconds padded to a word bucket with empty words (0, 0), and the
    items' seeds, both padded to `batch_size` rows."""
    W = shapes.bucket(max(max(len(w) for w in words), 1), shapes.WORD_BUCKETS, "word count")
    out = np.zeros((batch_size, W, 2), np.float32)
    for b, w in enumerate(words):
        out[b, :len(w)] = np.asarray(w, np.float32).reshape(-1, 2)
    return out, shapes.pad_rows(np.asarray(seeds, np.int32), batch_size)
