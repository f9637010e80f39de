"""Fixed-rate controls for the pooling stage: uniform average pooling and uniform dropping.

The baselines a similarity stage is compared against at equal retention (the paper's controls):
the audio span cut into k contiguous groups of near-equal size, each averaged, or k evenly spaced
frames kept, with k given per row (e.g. the count a similarity stage kept for that item). They yield
the packed buffers of :func:`affjax.pooling.affinity.pool_stage` (same fields, same meaning), so
everything after a stage treats them alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from affjax.pooling.affinity import StageOut

CONTROLS = ("avg", "drop")


def uniform_stage(h, span, valid, pos, size, groups, *, kind: str, capacity: int, positions: str = "first"
                  ) -> StageOut:
    """A fixed-rate stage with the packed outputs of ``pool_stage`` (same buffers, same meaning).

    Each row holds at most one audio span (frames with span id > 0, contiguous: Whisper's clip);
    every other valid frame is kept as it is, in order. With n audio frames and
    ``k = clip(groups[row], 1, n)``:
      ``avg``: the span is cut into k contiguous groups of near-equal size (frame i of the span
        goes to group ``floor(i k / n)``) and each group becomes the plain mean of its members;
      ``drop``: k evenly spaced frames are kept, frame ``floor((2 j + 1) n / (2 k))`` for
        j = 0 .. k-1 (the middle of each of k equal stretches); the others are dropped.
    Sizes add up as in ``pool_stage`` (a dropped frame gives its size to no one), positions as
    :func:`pack_groups` gives them. ``groups``: Int['B'], traced (one compile serves every k).
    """
    if kind not in CONTROLS:
        raise ValueError(f"control kind must be one of {CONTROLS}, got {kind!r}")
    b, n_in, _ = h.shape
    valid = valid.astype(bool)
    span = span.astype(jnp.int32)
    audio = valid & (span > 0)
    n = jnp.sum(audio, axis=1, dtype=jnp.int32)                          # ['B'] span length
    k = jnp.clip(jnp.asarray(groups, jnp.int32), 1, jnp.maximum(n, 1))   # ['B'] groups wanted
    i = jnp.cumsum(audio, axis=1, dtype=jnp.int32) - 1                   # index inside the span
    rows = jnp.arange(b)[:, None]
    if kind == "avg":
        g = (i * k[:, None]) // jnp.maximum(n, 1)[:, None]
        g_prev = ((i - 1) * k[:, None]) // jnp.maximum(n, 1)[:, None]    # i = 0 gives -1: a start
        start = valid & (~audio | (g != g_prev))
        member = valid
    else:
        j = jnp.arange(n_in, dtype=jnp.int32)[None, :]
        pick = ((2 * j + 1) * n[:, None]) // (2 * k[:, None])            # kept span index of group j
        first = jnp.argmax(audio, axis=1).astype(jnp.int32)[:, None]     # the span's first frame
        kept = jnp.zeros((b, n_in), bool).at[rows, jnp.where(j < k[:, None], first + pick, n_in)].set(
            True, mode="drop")
        start = member = valid & (~audio | kept)
    return pack_groups(h, span, valid, pos, size, start, member, capacity=capacity, positions=positions)


def pack_groups(h, span, valid, pos, size, start, member, *, capacity: int, positions: str = "first") -> StageOut:
    """Groups given by their first slots, packed as ``pool_stage`` packs them (same buffers, same meaning).

    Inputs as ``uniform_stage`` takes them (``valid`` Bool['B N'], ``span`` Int32['B N']), plus
    ``start``: Bool['B N'], the first slot of each output group (every valid non-audio slot is one);
    a group runs from its start up to the next one. ``member``: Bool['B N'], the slots averaged into
    their group (a valid slot that is no member is dropped: it counts for no group and gives its
    size to no one). Means are plain, positions the first member's (``first``), the members' mean
    (``mean``) or ``0 .. n_valid-1`` (``reindex``).
    """
    b, c = h.shape[0], int(capacity)
    audio = valid & (span > 0)
    rows = jnp.arange(b)[:, None]
    seg = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1
    n_valid = jnp.sum(start, axis=1, dtype=jnp.int32)
    idx = jnp.where(member, seg, c)  # out of range -> dropped (padding slots, dropped frames)

    def seg_sum(x):
        return jnp.zeros((b, c) + x.shape[2:], x.dtype).at[rows, idx].add(x, mode="drop")

    w = member.astype(jnp.float32)
    wsum = seg_sum(w)
    denom = jnp.where(wsum > 0, wsum, 1.0)
    valid_out = jnp.arange(c)[None, :] < n_valid[:, None]
    h_out = seg_sum(h.astype(jnp.float32) * w[..., None]) / denom[..., None]
    if positions == "first":
        pos_out = seg_sum(jnp.where(start, pos.astype(jnp.float32), 0.0))
    elif positions == "mean":
        pos_out = seg_sum(pos.astype(jnp.float32) * w) / denom
    elif positions == "reindex":
        pos_out = jnp.broadcast_to(jnp.arange(c, dtype=jnp.float32), (b, c))
    else:
        raise ValueError(f"positions must be first, mean or reindex, got {positions!r}")
    return StageOut(
        h=jnp.where(valid_out[..., None], h_out, 0.0).astype(h.dtype),
        valid=valid_out,
        pos=jnp.where(valid_out, pos_out, 0.0),
        size=jnp.where(valid_out, seg_sum(jnp.where(member, size.astype(jnp.float32), 0.0)), 0.0),
        span=jnp.where(valid_out, seg_sum(jnp.where(start, span, 0)), 0),
        group_of=jnp.where(member, seg, -1),
        audio_in=jnp.sum(audio, axis=1, dtype=jnp.int32),
        audio_out=jnp.sum(start & audio, axis=1, dtype=jnp.int32),
        forced=jnp.zeros((b,), jnp.int32),
        n_valid=n_valid,
    )


uniform_stage_jit = jax.jit(uniform_stage, static_argnames=("kind", "capacity", "positions"))
