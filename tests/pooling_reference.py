"""A plain sequential implementation of one pooling stage (docs/pooling.md section 1, plus the
positions, sizes and fixed-capacity overflow rule of sections 2-4): the reference the static-shape
code is tested against. Python loops over numpy, written for reading, not speed."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def ref_cos(a: np.ndarray, b: np.ndarray) -> np.float32:
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    eps = np.float32(1e-6)
    na = max(np.sqrt(np.sum(a * a, dtype=np.float32)), eps)
    nb = max(np.sqrt(np.sum(b * b, dtype=np.float32)), eps)
    return np.float32(np.sum(a * b, dtype=np.float32) / (na * nb))


def ref_stage(h, span, pos, size, *, tau, window, weighted=False, positions="first", retention=None):
    """One unpadded item. Returns a dict; ``margin`` is the closest call any decision made."""
    n = len(span)
    tau32 = np.float32(tau)
    margin = math.inf
    groups: list[list[int]] = []
    forced = 0
    t = 0
    while t < n:
        if span[t] == 0:  # text: its own group, never merged
            groups.append([t])
            t += 1
            continue
        e = t
        while e < n and span[e] == span[t]:
            e += 1
        run_groups, boundaries, G = [], [], [t]
        for u in range(t + 1, e):
            k = min(window, len(G))
            s = max(ref_cos(h[u], h[u - j]) for j in range(1, k + 1))
            margin = min(margin, abs(float(s) - float(tau32)))
            if s >= tau32:
                G.append(u)
            else:
                run_groups.append(G)
                boundaries.append((float(s), u))
                G = [u]
        run_groups.append(G)
        if retention is not None:
            slots = max(1, math.ceil(Fraction(str(retention)) * (e - t)))
            if len(run_groups) > slots:
                forced += len(run_groups) - slots
                ranked = sorted(boundaries)  # lowest s first, ties: earlier position first
                if slots >= 2:
                    gap = ranked[slots - 1][0] - ranked[slots - 2][0]
                    if gap != 0:
                        margin = min(margin, gap)
                cuts = [t] + sorted(u for _, u in ranked[: slots - 1]) + [e]
                run_groups = [list(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
        groups += run_groups
        t = e

    h32 = h.astype(np.float32)
    size = np.asarray(size, np.float32)
    pos = np.asarray(pos, np.float32)
    out_h, out_pos, out_size, out_span = [], [], [], []
    group_of = np.full(n, -1, np.int32)
    for g, members in enumerate(groups):
        group_of[members] = g
        w = size[members] if weighted else np.ones(len(members), np.float32)
        wsum = np.sum(w, dtype=np.float32)
        out_h.append(np.sum(h32[members] * w[:, None], axis=0, dtype=np.float32) / wsum)
        out_size.append(np.sum(size[members], dtype=np.float32))
        out_span.append(span[members[0]])
        if positions == "first":
            out_pos.append(pos[members[0]])
        elif positions == "mean":
            out_pos.append(np.sum(pos[members] * w, dtype=np.float32) / wsum)
        else:
            out_pos.append(np.float32(g))
    return dict(
        h=np.array(out_h, np.float32).reshape(len(groups), h.shape[1]),
        pos=np.array(out_pos, np.float32),
        size=np.array(out_size, np.float32),
        span=np.array(out_span, np.int32),
        group_of=group_of,
        forced=forced,
        audio_in=int(np.sum(np.asarray(span) > 0)),
        audio_out=int(sum(1 for g in groups if span[g[0]] > 0)),
        margin=margin,
    )


def gap_tau(sims, q: float) -> float:
    """A threshold near the q-quantile of observed similarities, in the middle of a gap between
    them (so no decision of the tests' random models is a near tie)."""
    s = np.unique(np.asarray(sims, np.float64))
    i = int(np.clip(round(q * (len(s) - 1)), 1, len(s) - 1))
    gaps = [(s[j] - s[j - 1], j) for j in range(max(1, i - 5), min(len(s), i + 6))]
    _, j = max(gaps)
    return float((s[j] + s[j - 1]) / 2)
