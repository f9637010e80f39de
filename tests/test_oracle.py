"""Oracle interventions (affjax.pooling.oracle) against a plain per-row numpy reference, on random
padded batches of mixed lengths, under jit at fixed shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax.pooling import oracle as orc
from affjax.pooling.affinity import StageOut

D = 4
TS = orc.TOKEN_SECONDS


@functools.lru_cache(maxsize=None)
def _draw(seed: int, j: int) -> float:
    return float(jax.random.uniform(jax.random.fold_in(jax.random.key(seed), j)))


def ref_row(h, span, valid, pos, size, words, seed, o: orc.Oracle, positions: str):
    """One row, plainly: which audio tokens form which groups, then the means."""
    audio = [t for t in range(len(h)) if valid[t] and span[t] > 0]
    n = len(audio)
    real = [(s, e) for s, e in words if e > s]

    def word_of(i):
        c = (i + 0.5) * TS + orc.TIE_SECONDS
        return next((w for w, (s, e) in enumerate(words) if e > s and s <= c < e), -1)

    def smallest(items, k):
        return set(sorted(items, key=lambda j: _draw(seed, j))[:k])

    count = lambda m: int(np.floor(np.float32(o.p) * np.float32(m) + np.float32(0.5)))
    if o.kind == "merge-words":
        groups, last = [], None
        for i, t in enumerate(audio):
            w = word_of(i)
            if groups and w == last and not (w < 0 and o.gaps == "keep"):
                groups[-1].append(t)
            else:
                groups.append([t])
            last = w
    elif o.kind == "drop-words":
        gone = smallest(range(len(real)), count(len(real)))  # padding words come last: indices agree
        groups = [[t] for i, t in enumerate(audio) if word_of(i) < 0 or word_of(i) not in gone]
    elif o.kind == "drop-random":
        gone = smallest(range(n), count(n))
        groups = [[t] for i, t in enumerate(audio) if i not in gone]
    else:  # drop-uniform
        k = min(max(n - count(n), 1), max(n, 1))
        groups = [[audio[(2 * j + 1) * n // (2 * k)]] for j in range(k)] if n else []
    by_start = {g[0]: g for g in groups}
    out = []
    for t in range(len(h)):
        if valid[t] and span[t] <= 0:
            out.append([t])
        elif t in by_start:
            out.append(by_start[t])
    pos_of = {"first": lambda k, g: pos[g[0]], "mean": lambda k, g: np.mean([pos[t] for t in g]),
              "reindex": lambda k, g: k}[positions]
    return {"h": [np.mean([h[t] for t in g], axis=0) for g in out], "pos": [pos_of(k, g) for k, g in enumerate(out)],
            "size": [sum(size[t] for t in g) for g in out], "span": [span[g[0]] for g in out],
            "audio_in": n, "audio_out": sum(1 for g in out if span[g[0]] > 0),
            "members": [t for g in out for t in g]}


def _batch(seed=0):
    """5 rows of N=40 slots: text, one audio span, text, then padding; one row all padding; words
    with gaps between them, some shorter than a token, padded to W=16 with empty words."""
    rng = np.random.default_rng(seed)
    b, n, w = 5, 40, 16
    lengths = [40, 31, 0, 22, 12]   # valid slots per row
    audio = [(2, 35), (1, 26), (0, 0), (3, 6), (1, 10)]  # the audio span [a, z) of each row
    valid = np.arange(n)[None] < np.array(lengths)[:, None]
    span = np.zeros((b, n), np.int32)
    words = np.zeros((b, w, 2), np.float32)
    for r, (a, z) in enumerate(audio):
        span[r, a:z] = 1
        t, k = rng.uniform(0, 0.06), 0
        while t < (z - a) * TS and k < w - 2:
            dur = 0.01 if rng.random() < 0.2 else rng.uniform(0.03, 0.2)  # some words hold no token centre
            words[r, k] = t, t + dur
            t += dur + (0.0 if rng.random() < 0.5 else rng.uniform(0.0, 0.1))
            k += 1
    h = rng.standard_normal((b, n, D)).astype(np.float32)
    pos = np.broadcast_to(np.arange(n, dtype=np.float32), (b, n)).copy()
    size = np.ones((b, n), np.float32)
    seeds = np.array([7, 123456789, 0, 3, 2 ** 31 - 1])
    return h, span, valid, pos, size, words, seeds


def _packed(values: list, n: int, width: int = 1) -> np.ndarray:
    """A row's per-slot values, zeros past them up to n slots: ['n width']."""
    out = np.zeros((n, width))
    out[:len(values)] = np.reshape(values, (len(values), width))
    return out


CASES = [(orc.Oracle("merge-words"), "first"), (orc.Oracle("merge-words", gaps="merge"), "mean"),
         (orc.Oracle("drop-words", p=0.5), "reindex"), (orc.Oracle("drop-words", p=1.0), "first"),
         (orc.Oracle("drop-random", p=0.3), "first"), (orc.Oracle("drop-random", p=0.9, seed=5), "reindex"),
         (orc.Oracle("drop-uniform", p=0.5), "first"), (orc.Oracle("drop-uniform", p=1.0), "mean")]


@pytest.mark.parametrize("o,positions", CASES, ids=lambda c: c.to_text() if isinstance(c, orc.Oracle) else c)
def test_oracle_matches_numpy(o, positions):
    h, span, valid, pos, size, words, seeds = _batch()
    n = h.shape[1]
    out: StageOut = orc.oracle_stage_jit(*map(jnp.asarray, (h, span, valid, pos, size, words, seeds)), oracle=o,
                                         capacity=n, positions=positions)
    changed = False
    for r in range(h.shape[0]):
        ref = ref_row(h[r], span[r], valid[r], pos[r], size[r], words[r], int(seeds[r]), o, positions)
        m = len(ref["h"])
        counts = [int(out.n_valid[r]), int(out.audio_in[r]), int(out.audio_out[r])]
        assert counts == [m, ref["audio_in"], ref["audio_out"]], r
        np.testing.assert_array_equal(out.valid[r], np.arange(n) < m)
        np.testing.assert_allclose(out.h[r], _packed(ref["h"], n, D), rtol=1e-6, atol=1e-6)
        for key in ("pos", "size", "span"):  # exact: sums and means of a few small integers
            np.testing.assert_array_equal(np.asarray(getattr(out, key)[r])[:, None], _packed(ref[key], n), err_msg=key)
        members = np.flatnonzero(np.asarray(out.group_of[r]) >= 0)
        assert members.tolist() == sorted(ref["members"])
        changed |= ref["audio_out"] != ref["audio_in"]
    assert changed  # every case changes some row's audio tokens


def test_oracle_row_independent_of_padding_and_batch():
    """A row's result is the same alone, with more padding, and in another batch position."""
    h, span, valid, pos, size, words, seeds = _batch(1)
    for o, positions in CASES[4:5] + CASES[2:3]:  # drop-random, drop-words: the full batch reuses their programs
        full = orc.oracle_stage_jit(*map(jnp.asarray, (h, span, valid, pos, size, words, seeds)), oracle=o,
                                    capacity=40, positions=positions)
        r = 1
        pad = lambda x, k, v=0: np.pad(x[r:r + 1], [(0, 0), (0, k)] + [(0, 0)] * (x.ndim - 2), constant_values=v)
        words2 = np.concatenate([words[r:r + 1], np.zeros((1, 8, 2), np.float32)], axis=1)  # W 16 -> 24
        alone = orc.oracle_stage_jit(*map(jnp.asarray, (pad(h, 24), pad(span, 24), pad(valid, 24, False),
                                                         pad(pos, 24), pad(size, 24, 1), words2, seeds[r:r + 1])),
                                     oracle=o, capacity=64, positions=positions)
        m = int(full.n_valid[r])
        assert int(alone.n_valid[0]) == m and m < valid[r].sum()
        np.testing.assert_array_equal(np.asarray(alone.h[0, :m]), np.asarray(full.h[r, :m]))


def test_token_words_centre_rule():
    span = jnp.asarray([[0, 1, 1, 1, 1, 1, 0]])
    valid = jnp.ones((1, 7), bool)
    # token i covers [0.04 i, 0.04 i + 0.04): centres 0.02, 0.06, 0.10, 0.14, 0.18; a centre on a
    # boundary goes to the word starting there (0.06: word 1, 0.14: word 3), an empty word holds none
    words = jnp.asarray([[[0.0, 0.06], [0.06, 0.0602], [0.07, 0.14], [0.14, 0.18], [0.18, 0.18]]])
    assert orc.token_words(span, valid, words).tolist() == [[-1, 0, 1, 2, 3, -1, -1]]


@pytest.mark.parametrize("text,want", [
    ("merge-words", orc.Oracle("merge-words")),
    ("merge-words:gaps=merge", orc.Oracle("merge-words", gaps="merge")),
    ("drop-words:p=0.3", orc.Oracle("drop-words", p=0.3)),
    ("drop-random:p=0.5,seed=2", orc.Oracle("drop-random", p=0.5, seed=2)),
    (" drop-uniform:p=1 ", orc.Oracle("drop-uniform", p=1.0)),
])
def test_parse_oracle(text, want):
    got = orc.parse_oracle(text)
    assert got == want and orc.parse_oracle(got.to_text()) == want


@pytest.mark.parametrize("text", ["merge", "drop-words:p=1.5", "merge-words:p=0.5", "drop-random:q=1",
                                  "drop-random:p=x", "merge-words:gaps=drop"])
def test_parse_oracle_refuses(text):
    with pytest.raises(ValueError):
        orc.parse_oracle(text)
