"""Word timestamps from Whisper's cross-attention: the alignment heads and dynamic time warping, as
transformers computes token timestamps (`WhisperForConditionalGeneration._extract_token_timestamps`,
after OpenAI's `whisper/timing.py`).

For one clip: the decoder is teacher-forced on the prompt and the text tokens (a given transcript,
or the model's own greedy one); the cross-attention weights of the checkpoint's alignment heads
(`alignment_heads` of its generation config) are cut to the clip's encoder frames, normalised per
head over the token rows (mean 0, std 1), median-filtered along time (width 7, reflected edges) and
averaged over the heads; DTW on the negated matrix gives a monotonic path, and each token's time is
the frame (20 ms) where the path first reaches its row. A token's row is the query that predicts
it (the query at the token before), for every text token and the end of text, as OpenAI's timing.py
takes them; transformers takes the query at the token itself (one row later) and copies the last
time for the end of text, otherwise the arithmetic is the same. A word is a run of tokens opened by
a space-led token (punctuation joins the word before it); it spans [time of its first token, time
of the token after its last]. The path starts at frame 0, so the first word takes in any leading
silence (as in both references).

    aligned = align(model, processor, heads, waves, texts)   # [ClipAlignment(tokens, times, words)]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import string
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.models.whisper.decoding import encode, greedy_tokens, prompt_ids, whisper_features
from affjax.models.whisper.modeling import Whisper

FRAME_SECONDS = 0.02   # one encoder frame (two 10 ms mel frames)
MEDIAN_WIDTH = 7       # transformers' WhisperConfig.median_filter_width, OpenAI's medfilt_width
TOKEN_BUCKET = 32      # teacher-forced lengths are padded to a multiple of this (one compile per multiple)


@dataclasses.dataclass(frozen=True)
class Word:
    text: str
    start: float   # seconds from the start of the clip
    end: float


@dataclasses.dataclass
class ClipAlignment:
    tokens: list[int]    # the text tokens aligned (no prompt, no end of text)
    times: np.ndarray    # seconds of each text token and of the end of text after them
    words: list[Word]


def alignment_heads(ckpt: str | Path) -> tuple[tuple[int, int], ...]:
    """(layer, head) pairs from a converted Whisper checkpoint's generation_config.json."""
    path = Path(ckpt) / "generation_config.json"
    heads = json.loads(path.read_text()).get("alignment_heads") if path.is_file() else None
    if not heads:
        raise ValueError(f"{ckpt}: no alignment_heads in generation_config.json (word timestamps need them)")
    return tuple((int(layer), int(head)) for layer, head in heads)


@functools.partial(jax.jit, static_argnames=("graphdef", "heads"))
def _head_weights(graphdef, params, enc, tokens, *, heads):
    """Cross-attention weights of the alignment heads, float32 ['B K T S'] (K = len(heads))."""
    decoder = nnx.merge(graphdef, params)
    _, weights = decoder(tokens, enc, cross_weights=True)
    return jnp.stack([weights[layer][:, head] for layer, head in heads], axis=1)


def head_weights(model: Whisper, enc, tokens, heads) -> np.ndarray:
    """Teacher-forced cross-attention weights of `heads`: enc ['B S D'], tokens ['B T'] -> ['B K T S']."""
    graphdef, params = nnx.split(model.decoder)
    return np.asarray(_head_weights(graphdef, params, enc, jnp.asarray(tokens, jnp.int32), heads=tuple(heads)))


def median_filter(x: np.ndarray, width: int = MEDIAN_WIDTH) -> np.ndarray:
    """Median over a sliding window of odd `width` along the last axis, edges reflected (as
    transformers' `_median_filter`; unchanged when the axis is not longer than width // 2)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.sort(windows, axis=-1)[..., pad]


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost monotonic path through cost ['N M'] from (0, 0) to (N-1, M-1) with diagonal,
    down and right steps; returns the path's (row, column) indices. Sums are float32 and ties go
    diagonal, then down, then right, exactly as OpenAI's `dtw_cpu` and transformers break them."""
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf, np.float32)
    acc[0, 0] = 0
    step = np.full((n + 1, m + 1), 2, np.int8)  # 0 diagonal, 1 down (next token), 2 right (next frame)
    step[1:, 0] = 1
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            acc[i, j] = np.float32(cost[i - 1, j - 1]) + c
            step[i, j] = t
    rows, cols = [], []
    i, j = n, m
    while i > 0 or j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        t = step[i, j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    return np.asarray(rows[::-1]), np.asarray(cols[::-1])


def token_times(weights: np.ndarray, n_frames: int) -> np.ndarray:
    """Seconds of each token from the alignment heads' weights ['K N S'] on the N rows that predict
    the tokens, for a clip of `n_frames` encoder frames."""
    w = weights[..., :n_frames].astype(np.float64)
    w = (w - w.mean(axis=-2, keepdims=True)) / w.std(axis=-2, keepdims=True)
    matrix = median_filter(w).mean(axis=0)
    rows, cols = dtw(-matrix)
    jumps = np.diff(rows, prepend=-1).astype(bool)  # the first path step on each row
    return np.round(cols[jumps] * FRAME_SECONDS, 6)  # 0.02 k, without float noise


_PUNCTUATION = set(string.punctuation) | set("“”‘’¿¡。，！？：、")


def words_of(token_texts: list[str], times: np.ndarray) -> list[Word]:
    """Group text tokens into words: a token starting with a space opens a word, unless it is only
    punctuation (which joins the word before it, as does any token before the first word).
    `times`: one per token plus the end-of-text token's."""
    spans: list[list[int]] = []
    for k, text in enumerate(token_texts):
        bare = text.strip()
        opens = text.startswith(" ") and not (bare and set(bare) <= _PUNCTUATION)
        if opens or not spans:
            spans.append([k, k])
        else:
            spans[-1][1] = k
    out = []
    for a, b in spans:
        text = "".join(token_texts[a:b + 1]).strip()
        if text:
            out.append(Word(text, float(times[a]), float(times[b + 1])))
    return out


def align(model: Whisper, processor, heads, waves, texts=None, *, language: str = "en", batch_size: int = 8,
          max_new_tokens: int = 128, sampling_rate: int = 16000) -> list[ClipAlignment]:
    """Token and word timestamps of each clip (float waveforms, at most 30 s): of `texts[i]`
    teacher-forced, or of the model's own greedy transcript where `texts` (or `texts[i]`) is None."""
    tok = processor.tokenizer
    prompt = prompt_ids(tok, model.cfg, language=language)
    out = []
    for start in range(0, len(waves), batch_size):
        chunk = list(waves[start:start + batch_size])
        enc = encode(model, whisper_features(processor, chunk, batch_size, model.cfg, sampling_rate))
        given = [None] * len(chunk) if texts is None else texts[start:start + len(chunk)]
        greedy = None
        if any(t is None for t in given):
            greedy, _ = greedy_tokens(model, enc, len(chunk), prompt, max_new_tokens=max_new_tokens)
        # Whisper's text follows the prompt with a leading space
        tokens = [greedy[b] if t is None else tok(" " + t.strip(), add_special_tokens=False)["input_ids"]
                  for b, t in enumerate(given)]
        longest = len(prompt) + max(len(t) for t in tokens)
        if longest > model.cfg.max_target_positions:
            raise ValueError(f"a transcript of {longest - len(prompt)} tokens is longer than the decoder's "
                             f"{model.cfg.max_target_positions} positions")
        t_pad = min(-(-longest // TOKEN_BUCKET) * TOKEN_BUCKET, model.cfg.max_target_positions)
        ids = np.full((batch_size, t_pad), model.cfg.eos_token_id, np.int32)
        for b, t in enumerate(tokens):
            ids[b, :len(prompt) + len(t)] = prompt + list(t)
        weights = head_weights(model, enc, ids, heads)  # ['B K T S']; causal: the padding changes nothing before it
        for b, (wave, t) in enumerate(zip(chunk, tokens)):
            if not t:
                out.append(ClipAlignment([], np.zeros(1), []))
                continue
            n_frames = -(-len(wave) // processor.feature_extractor.hop_length) // 2
            rows = weights[b, :, len(prompt) - 1:len(prompt) + len(t)]  # the queries predicting t and the end
            times = token_times(rows, min(n_frames, model.cfg.encoder.max_source_positions))
            out.append(ClipAlignment(list(t), times, words_of([tok.decode([i]) for i in t], times)))
    return out
