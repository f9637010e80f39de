"""The static-shape policy, in one place.

Every array that reaches a jitted function has a shape from a small closed set, so a new input
length inside a bucket never recompiles:
- token sequences are padded to SEQ_BUCKETS (after a pooling stage the packed length is bucketed
  the same way, and a fixed-capacity stage's buffer is the bucket of its retention cap);
- scored continuations are padded to CONT_BUCKETS;
- batches are padded to the fixed batch size with dummy rows (masked out, results dropped);
- audio clips per batch are padded to a multiple of the batch size;
- the KV cache of each layer group holds its prompt bucket plus max_new_tokens slots.

The sequence grid (SEQ_GRID -> SEQ_BUCKETS; `bucket` is the one function every caller uses)
------------------------------------------------------------------------------------------------
From 64 tokens, buckets every `step` tokens up to each `upper end` of SEQ_GRID:

    64 .. 256 every 8, .. 512 every 16, .. 1024 every 32, .. 2048 every 64      (73 buckets)
    .. 4096 every 256, .. 8192 every 512, .. 16384 every 1024                    (24 more)

that is sixteen buckets per octave from 128 to 2048 (the step is a 16th of the octave's start,
at least 8 tokens, a multiple of 8 everywhere), eight per octave above. The bound it gives
(`PAD_BOUND`, checked in tests/test_shapes.py): a buffer holds at most

    bucket(n) / n < 1 + 1/16  for 128 < n <= 2048,
    bucket(n) / n < 1 + 1/8   for  64 < n <= 128 and for n > 2048,

and bucket(n) = 64 for n <= 64. Padding costs FLOPs, time and memory in proportion (the attention
square more), so a pooled and an unpooled sequence padded within 6.25 % each compare within a few
points of what their valid lengths say: the DAP prefill's XLA-realized FLOPs ratio stays near
its analytic ratio at every audio length (`affjax bench-pooling --audio-seconds 5 10 ... 30`,
docs/benchmarks.md). The old grid (64, 128, 256, 384, 512, 768, 1024, ...) padded up to 50 %
(513 -> 768): whether pooling paid depended on where a length fell in it (790 -> 1024 unpooled
but 630 -> 768 pooled favoured pooling at 30 s; 790 exact against 630 -> 768 disfavoured it).

The price is compilations. Every distinct bucket a piece meets compiles it once (per batch size
and static settings): the embedding/encoder program, each layer group, each pooling stage, the
head and the decode loop. `buckets_between(lo, hi)` counts the buckets a job whose sequences range
over [lo, hi] tokens can hit, i.e. the compiles per piece: for 5-30 s of audio with a 40-token
prompt (165-790 tokens) 37 buckets, against 5 with the old grid; the pooled layer groups after a
stage add the buckets of their own, shorter range. Above 2048 tokens compiles are dearer and such
jobs rarer, so the grid coarsens to eight per octave there. A job that cannot afford that many
compiles can bucket its inputs itself (collate's `seq_len`), or use JAX's persistent compilation
cache, which keeps every compiled bucket across runs.
"""

from __future__ import annotations

import numpy as np

SEQ_MIN = 64
# (upper end, step): buckets every `step` tokens from the previous upper end (SEQ_MIN first) up to this one
SEQ_GRID: tuple[tuple[int, int], ...] = ((256, 8), (512, 16), (1024, 32), (2048, 64),
                                         (4096, 256), (8192, 512), (16384, 1024))
FINE_UP_TO = 2048   # sixteen buckets per octave up to here (steps <= 64), eight above
FINE_STEP_MAX = 64  # the largest step up to FINE_UP_TO
PAD_BOUND = 1 / 16  # bucket(n) / n < 1 + PAD_BOUND for 128 < n <= FINE_UP_TO (1/8 elsewhere above 64)


def _grid(start: int, grid: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    out = [start]
    for top, step in grid:
        if (top - out[-1]) % step:
            raise ValueError(f"grid step {step} does not reach {top} from {out[-1]}")
        out += range(out[-1] + step, top + 1, step)
    return tuple(out)


SEQ_BUCKETS: tuple[int, ...] = _grid(SEQ_MIN, SEQ_GRID)
CONT_BUCKETS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)


class BucketError(ValueError):
    pass


def bucket(n: int, buckets: tuple[int, ...] = SEQ_BUCKETS, what: str = "sequence") -> int:
    """The smallest bucket that holds n."""
    i = int(np.searchsorted(buckets, n, side="left"))
    if i == len(buckets):
        raise BucketError(f"{what} length {n} exceeds the largest bucket {buckets[-1]}")
    return int(buckets[i])


def buckets_between(lo: int, hi: int, buckets: tuple[int, ...] = SEQ_BUCKETS) -> int:
    """How many buckets sequences of lo..hi tokens can land in: the compiles per piece of a job
    whose sequences range over [lo, hi]."""
    if hi < lo:
        return 0
    return buckets.index(bucket(hi, buckets)) - buckets.index(bucket(lo, buckets)) + 1


def audio_slots(n_audio: int, batch_size: int) -> int:
    """Audio clips per batch, padded to a multiple of the batch size (at least one per row)."""
    return max(1, -(-n_audio // batch_size)) * batch_size


def pad_rows(x: np.ndarray, rows: int, fill=0) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.full((rows - x.shape[0],) + x.shape[1:], fill, dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)
