"""One Affinity Pooling stage, a pure function over static shapes (docs/pooling.md sections 1, 3, 4).

``pool_stage`` takes a packed batch (valid tokens at the front of each row, padding after) and
returns the pooled batch packed into a buffer of static capacity ``C``. Nothing has a
data-dependent shape, so one compiled program serves every valid length and every threshold
``tau`` (a traced float32 value) for given ``(B, N, C)`` and static settings.

How the sequential rule of section 1 runs without a Python loop over time:

1. ``cos(h_t, h_{t-j})`` for ``j = 1..window`` comes from the lag dot products (:func:`_lag_dots`,
   float32, ``eps`` clamp on each norm) and ``s_k(t) = max_{j<=k} cos(h_t, h_{t-j})`` from a
   running max over ``j``.
2. The group-length recurrence ``L_t = join_t ? L_{t-1} + 1 : 1`` only matters up to ``window``, so
   the state is ``l = min(L, window) - 1`` in ``{0 .. window-1}``. Each step is a map on that finite
   set, ``f_t(l) = min(l+1, window-1) if (allowed_t and s_{l+1}(t) >= tau) else 0``, and maps
   compose associatively, so ``jax.lax.associative_scan`` yields every state in O(log N) depth.
   ``allowed_t`` is false for text, padding, and the first token of each audio span (a maximal
   run of one positive span id), so groups never cross a span or touch text.
3. Group starts ``start_t`` give the output slot ``cumsum(start) - 1``; sums per slot are
   scatter-adds (``.at[].add(mode='drop')``) into ``(B, C, ...)`` buffers.

Fixed-capacity overflow (section 4, when ``retention`` is given): every audio span of length T
has ``slots = max(1, ceil(r * T))``. Candidate boundaries are the group starts inside a span (not
its first token), each carrying the score ``s`` its join test used. One ``lax.sort`` over each row
with keys ``(span run, s, t)`` orders the candidates of each span by ascending ``s``, ties broken by
the earlier position; a candidate's rank inside its span is its sorted index minus the index of the
span's first candidate. A candidate stays a boundary iff its rank < ``slots - 1``, so a span ends
with exactly ``min(groups, slots)`` groups: the most distinct boundaries survive and the most
similar neighbouring groups merge. ``forced`` counts ``sum_spans max(0, groups - slots)``.
``r * T`` is evaluated exactly with ``r`` taken as the fraction
``Fraction(r).limit_denominator(10_000)``; :func:`retention_slots` gives the same numbers on the host
so the caller can size ``C``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-6
POSITIONS = ("first", "mean", "reindex")
RETENTION_MAX_DENOMINATOR = 10_000


class StageOut(NamedTuple):
    """Result of one stage. ``C`` is the static output capacity, ``N`` the input length."""

    h: jax.Array  # Float['B C D'] merged tokens in order (input dtype), zeros past n_valid
    valid: jax.Array  # Bool['B C']
    pos: jax.Array  # Float32['B C'] position ids after the stage, 0 past n_valid
    size: jax.Array  # Float32['B C'] original tokens each slot stands for (text = 1)
    span: jax.Array  # Int32['B C'] span id of each slot (0 = text), 0 past n_valid
    group_of: jax.Array  # Int32['B N'] output slot of each input slot, -1 for invalid input
    audio_in: jax.Array  # Int32['B'] valid audio tokens in
    audio_out: jax.Array  # Int32['B'] audio groups out
    forced: jax.Array  # Int32['B'] forced merges (fixed-capacity overflow), 0 in bucketed mode
    n_valid: jax.Array  # Int32['B'] valid length after the stage (may exceed C: caller's bug)


def retention_fraction(retention: float) -> tuple[int, int]:
    """``retention`` in (0, 1] as ``(p, q)`` with ``q <= 10_000`` (the exact ratio used for slots)."""
    if not (isinstance(retention, (int, float)) and 0.0 < retention <= 1.0):
        raise ValueError(f"retention must be in (0, 1], got {retention!r}")
    frac = Fraction(retention).limit_denominator(RETENTION_MAX_DENOMINATOR)
    if frac == 0:
        frac = Fraction(1, RETENTION_MAX_DENOMINATOR)
    return frac.numerator, frac.denominator


def retention_slots(lengths, retention: float) -> np.ndarray:
    """Host-side slots per span: ``max(1, ceil(r * T))`` for ``T > 0``, 0 for ``T == 0``.

    Bit-identical to what :func:`pool_stage` uses under ``retention``.
    """
    p, q = retention_fraction(retention)
    lengths = np.asarray(lengths, dtype=np.int64)
    slots = -((-lengths * p) // q)
    return np.where(lengths > 0, np.maximum(slots, 1), 0)


def fixed_capacity_needed(span, valid, retention: float) -> np.ndarray:
    """Host helper: per row, text tokens + sum over audio spans of their slots.

    ``span``: Int['B N'], ``valid``: Bool['B N'] (numpy). Returns Int64['B']. The fixed-capacity
    buffer ``C`` must be at least the max of this over the batch.
    """
    span = np.asarray(span)
    valid = np.asarray(valid, dtype=bool)
    rows, n = span.shape
    audio = valid & (span > 0)
    prev_audio = np.zeros_like(audio)
    prev_audio[:, 1:] = audio[:, :-1]
    prev_span = np.zeros_like(span)
    prev_span[:, 1:] = span[:, :-1]
    run_start = audio & ~(prev_audio & (prev_span == span))
    run_id = np.cumsum(run_start, axis=1) + np.arange(rows)[:, None] * (n + 1)
    lengths = np.bincount(run_id[audio], minlength=rows * (n + 1)).reshape(rows, n + 1)
    text = np.sum(valid & (span <= 0), axis=1)
    return (text + retention_slots(lengths, retention).sum(axis=1)).astype(np.int64)


def _shift(x: jax.Array, j: int, fill=0) -> jax.Array:
    """``y[:, t] = x[:, t - j]`` along axis 1, ``fill`` where ``t < j``."""
    n = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (j, 0)
    return jnp.pad(x, pad, constant_values=fill)[:, :n]


def _lag_dots(x: jax.Array, window: int, form: str) -> jax.Array:
    """``y[:, t, j] = x[:, t] . x[:, t - j]`` for ``j = 0 .. window`` (0 where ``t < j``), float32.

    ``form``, the same numbers either way (float32 sums in another order):
    - ``"matvec"``: one batched matrix-vector product against the stacked shifted copies
      (``window + 1`` times the input's size, less than a decoder layer's own temporaries). Robust
      on XLA:CPU with its YNNPACK fusions on (the default, which the decoder layers need: 4 % of a
      prefill), where multiply-then-reduce ran 5x slower at batch 1.
    - ``"reduce"``: a multiply of two slices and a sum per lag; fastest where YNNPACK fusions are
      off (the bucketed mode's stage program, `affjax.runtime.engine.pool_program`), 1.2-1.5x the matvec's
      speed at batch 4.
    """
    if form == "matvec":
        shifted = jnp.stack([_shift(x, j) for j in range(window + 1)], axis=2)  # (B, N, W+1, D)
        return jnp.einsum("bnd,bnkd->bnk", x, shifted, precision=jax.lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
    if form != "reduce":
        raise ValueError(f"lag-dot form must be 'matvec' or 'reduce', got {form!r}")
    n = x.shape[1]
    lag = lambda j: jnp.pad(jnp.sum(x[:, j:] * x[:, : n - j], axis=-1), ((0, 0), (j, 0)))
    return jnp.stack([lag(j) if j < n else jnp.zeros(x.shape[:2], x.dtype) for j in range(window + 1)], axis=-1)


def _span_slots_device(lengths: jax.Array, p: int, q: int) -> jax.Array:
    """``max(1, ceil(p * T / q))`` for T > 0 else 0, in int32 without overflow for T < 2**31."""
    whole, rest = lengths // q, lengths % q
    slots = whole * p + (rest * p + (q - 1)) // q
    return jnp.where(lengths > 0, jnp.maximum(slots, 1), 0)


def _tau_f32(tau, rows: int) -> jax.Array:
    """The threshold as float32: a scalar, or ``(rows, 1)`` for one per row. Host numbers are rounded
    to float32 by numpy (as ``np.float32(tau)``); arrays and tracers are cast in the program (also
    round to nearest)."""
    if isinstance(tau, (int, float, np.integer, np.floating)) and not isinstance(tau, bool):
        return jnp.asarray(np.float32(tau))
    t = jnp.asarray(tau)
    if t.dtype != jnp.float32:
        t = t.astype(jnp.float32)
    if t.ndim == 0:
        return t
    if t.shape == (rows,):
        return t[:, None]
    raise ValueError(f"tau must be a scalar or one per row ({rows},), got shape {t.shape}")


def pool_stage(
    h: jax.Array,
    span: jax.Array,
    valid: jax.Array,
    pos: jax.Array,
    size: jax.Array,
    *,
    tau,
    window: int,
    capacity: int,
    weighted: bool = False,
    positions: str = "first",
    retention: float | None = None,
    dots: str = "matvec",
) -> StageOut:
    """One pooling stage (docs/pooling.md section 1) over a padded batch.

    Args:
      h: Float['B N D'] hidden states, any float dtype (similarity and means run in float32).
      span: Int32['B N'] 0 for text / non-audio, k > 0 for the k-th audio span (contiguous runs).
      valid: Bool['B N'] valid tokens packed at the front of each row.
      pos: Float32['B N'] position ids.
      size: Float32['B N'] original tokens each slot stands for (1 before any stage).
      tau: join when ``max cos >= float32(tau)`` (an exact tie joins); ``tau > 1`` merges nothing,
        ``tau = -1`` merges each span into one token. A number, a float32 scalar array or one
        threshold per row (``['B']``); traced under jit, so every threshold shares one program
        (host numbers are rounded to float32 on the host, arrays of another dtype in the program).
      window: lookback ``omega >= 1`` over the current group's last members.
      capacity: static output length ``C``. Bucketed mode: the caller guarantees ``C >=`` groups
        (check ``n_valid <= C``); fixed-capacity mode: ``C >=`` text tokens + sum of span slots
        (:func:`fixed_capacity_needed`).
      weighted: weight members by ``size`` in the mean of ``h`` (and of ``pos`` under ``mean``).
      positions: ``first`` (first member's id), ``mean`` (members' mean id, weighted as ``h``) or
        ``reindex`` (``0 .. n_valid-1`` over the packed output).
      retention: fixed-capacity mode: each span of length T keeps at most ``max(1, ceil(r T))``
        groups; extra groups are merged by dropping the highest-``s`` boundaries (ties: the later
        position is dropped first). ``None``: bucketed mode, exact threshold semantics.
      dots: how the lag dot products are computed (``"matvec"`` or ``"reduce"``, see
        :func:`_lag_dots`): a speed choice for the program the stage is compiled into.

    Every keyword argument but ``tau`` is static under jit (see :data:`pool_stage_jit`).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if int(capacity) < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if h.ndim != 3:
        raise ValueError(f"h must be (B, N, D), got shape {h.shape}")
    B, N, _ = h.shape
    W, C = int(window), int(capacity)
    tau32 = _tau_f32(tau, B)  # () or (B, 1)

    span = span.astype(jnp.int32)
    valid = valid.astype(bool)
    pos = pos.astype(jnp.float32)
    size = size.astype(jnp.float32)
    hf = h.astype(jnp.float32)

    # --- similarities: cos[b, t, j-1] = cos(h_t, h_{t-j}) ---------------------------------
    lag = _lag_dots(hf, W, dots)  # (B, N, W+1); [..., 0] = |h_t|^2
    norm = jnp.maximum(jnp.sqrt(lag[..., 0]), jnp.float32(EPS))
    cos = jnp.stack([lag[..., j] / (norm * _shift(norm, j, fill=1.0)) for j in range(1, W + 1)],
                    axis=-1)  # (B, N, W)
    s_prefix = jax.lax.cummax(cos, axis=2)  # s_prefix[..., k-1] = max_{j<=k} cos

    # --- which tokens may join their predecessor's group ----------------------------------
    audio = valid & (span > 0)
    allowed = audio & _shift(audio, 1, fill=False) & (span == _shift(span, 1))
    run_start = audio & ~allowed  # first token of each audio span

    # --- the window recurrence -------------------------------------------------------------
    if W == 1:
        s = cos[..., 0]
    else:
        nxt = jnp.minimum(jnp.arange(W, dtype=jnp.int32) + 1, W - 1)
        ok = allowed[..., None] & (s_prefix >= tau32[..., None])
        step_maps = jnp.where(ok, nxt, 0).astype(jnp.int32)  # (B, N, W): state -> next state
        composed = jax.lax.associative_scan(
            lambda a, b: jnp.take_along_axis(b, a, axis=-1), step_maps, axis=1
        )
        state = composed[..., 0]  # state after t (f at a span start is constant 0)
        prev_state = _shift(state, 1)
        s = jnp.take_along_axis(s_prefix, prev_state[..., None], axis=-1)[..., 0]
    join = allowed & (s >= tau32)
    start = valid & ~join

    # --- fixed-capacity overflow rule --------------------------------------------------------
    forced = jnp.zeros((B,), jnp.int32)
    if retention is not None:
        p, q = retention_fraction(retention)
        rows = jnp.arange(B)[:, None]
        run_id = jnp.where(audio, jnp.cumsum(run_start, axis=1, dtype=jnp.int32), 0)  # 1-based
        per_run = lambda x: jnp.zeros((B, N + 1), jnp.int32).at[rows, run_id].add(x)
        run_len = per_run(audio.astype(jnp.int32)).at[:, 0].set(0)
        run_groups = per_run((start & audio).astype(jnp.int32)).at[:, 0].set(0)
        run_slots = _span_slots_device(run_len, p, q)
        forced = jnp.sum(jnp.maximum(run_groups - run_slots, 0), axis=1).astype(jnp.int32)

        cand = start & audio & ~run_start
        big = jnp.iinfo(jnp.int32).max
        key_run = jnp.where(cand, run_id, big)
        key_s = jnp.where(cand & (s != 0), s, jnp.float32(0))  # also folds -0.0 into +0.0
        iota = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
        # a stable sort on (run, s) keeps ties in position order: the same as sorting on (run, s, t)
        sorted_run, _, order = jax.lax.sort((key_run, key_s, iota), dimension=1, num_keys=2, is_stable=True)
        first_of_run = jnp.concatenate(
            [jnp.ones((B, 1), bool), sorted_run[:, 1:] != sorted_run[:, :-1]], axis=1
        )
        run_begin = jax.lax.cummax(jnp.where(first_of_run, iota, 0), axis=1)
        rank = jnp.zeros((B, N), jnp.int32).at[rows, order].set(iota - run_begin)
        slots_tok = jnp.take_along_axis(run_slots, run_id, axis=1)
        keep = cand & (rank < slots_tok - 1)
        start = valid & (~audio | run_start | keep)

    # --- merge and pack ------------------------------------------------------------------
    seg = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1
    n_valid = jnp.sum(start, axis=1, dtype=jnp.int32)
    group_of = jnp.where(valid, seg, -1)
    idx = jnp.where(valid, seg, C)  # out of range -> dropped
    rows = jnp.arange(B)[:, None]

    def seg_sum(x):
        return jnp.zeros((B, C) + x.shape[2:], x.dtype).at[rows, idx].add(x, mode="drop")

    w = jnp.where(valid, size, 0.0) if weighted else valid.astype(jnp.float32)
    wsum = seg_sum(w)
    valid_out = jnp.arange(C)[None, :] < n_valid[:, None]
    denom = jnp.where(wsum > 0, wsum, 1.0)
    h_out = seg_sum(hf * w[..., None]) / denom[..., None]
    h_out = jnp.where(valid_out[..., None], h_out, 0.0).astype(h.dtype)

    size_out = seg_sum(jnp.where(valid, size, 0.0))
    span_out = seg_sum(jnp.where(start, span, 0))
    if positions == "first":
        pos_out = seg_sum(jnp.where(start, pos, 0.0))
    elif positions == "mean":
        pos_out = seg_sum(pos * w) / denom
    else:
        pos_out = jnp.broadcast_to(jnp.arange(C, dtype=jnp.float32), (B, C))
    pos_out = jnp.where(valid_out, pos_out, 0.0)

    return StageOut(
        h=h_out,
        valid=valid_out,
        pos=pos_out,
        size=jnp.where(valid_out, size_out, 0.0),
        span=jnp.where(valid_out, span_out, 0),
        group_of=group_of,
        audio_in=jnp.sum(audio, axis=1, dtype=jnp.int32),
        audio_out=jnp.sum(start & audio, axis=1, dtype=jnp.int32),
        forced=forced,
        n_valid=n_valid,
    )


STATIC_ARGNAMES = ("window", "capacity", "weighted", "positions", "retention", "dots")

#: ``pool_stage`` jitted with every keyword but ``tau`` static: one compile per (shapes, settings);
#: ``tau`` is a traced argument, so any threshold (and one per row) runs the same program.
pool_stage_jit = jax.jit(pool_stage, static_argnames=STATIC_ARGNAMES)
