"""The static-shape policy, in one place.

Every array that reaches a jitted function has a shape from a small closed set, so a new input
length inside a bucket never recompiles:
- token sequences are padded to SEQ_BUCKETS (after a pooling stage the packed length is bucketed
  the same way, and a fixed-capacity stage's buffer is the bucket of its retention cap);
- scored continuations are padded to CONT_BUCKETS, training sequences to TRAIN_BUCKETS;
- Whisper's pooled encoder frames are sliced to `encoder_buckets` (ENCODER_STEP multiples);
- batches are padded to the fixed batch size with dummy rows (masked out, results dropped);
- audio clips per batch are padded to a multiple of the batch size;
- the KV cache of each layer group holds its prompt bucket plus max_new_tokens slots.

The sequence grid (SEQ_GRID -> SEQ_BUCKETS; `bucket` is the one function every caller uses)
------------------------------------------------------------------------------------------------
From 64 tokens, buckets every `step` tokens up to each `upper end` of SEQ_GRID:

    64 .. 256 every 4, .. 512 every 8, .. 1024 every 16, .. 2048 every 32     (145 buckets)
    .. 4096 every 256, .. 8192 every 512, .. 16384 every 1024                   (24 more)

that is 32 buckets per octave from 128 to 2048 (the step is a 32nd of the octave's start), 16
from 64 to 128, 8 per octave above 2048. The bound it gives (`PAD_BOUND`, tests/test_shapes.py):

    bucket(n) / n < 1 + 1/32  for 128 < n <= 2048,
    bucket(n) / n < 1 + 1/16  for  64 < n <= 128,    < 1 + 1/8 above 2048,

and bucket(n) = 64 for n <= 64.

Why so fine. Padding costs FLOPs, time and memory in proportion (the attention square more), and
a pooled and an unpooled sequence are padded independently, so the realized saving drifts from
the one the valid lengths give by up to about the padding fraction. The goal this grid is sized
for: the DAP prefill's XLA-realized LM FLOPs ratio within 5 points of its analytic ratio at every
audio length from 5 to 30 s, in the bucketed job path and with exact-length inputs
(`affjax bench-pooling`, docs/benchmarks.md). About 2-3 of those points are not padding at all:
the analytic count (docs/pooling.md section 5) takes the full attention square, XLA counts the
blocked causal attention the engine runs, so a pooled prefill's realized ratio sits that much
above its analytic one even without padding. That leaves the grid about 2 points, i.e. about 3 %
of padding. The old grid (64, 128, 256, 384, 512, 768, 1024, ...) padded up to 50 % (513 ->
768), and whether pooling paid depended on where a length fell in it: at 30 s, 790 -> 1024
unpooled against 630 -> 768 pooled favoured pooling, 790 exact against 630 -> 768 disfavoured
it. A grid of 16 per octave (6.25 %) still missed the goal by up to 0.9 points between the 5 s
marks (docs/results/pooling_bench_grid16_*.json).

The price is compilations. Every distinct bucket a piece meets compiles it once (per batch size
and static settings): the encoder/embedding program, each layer group, each pooling stage, the
head and the decode loop. `buckets_between(lo, hi)` counts the buckets a job whose sequences range
over [lo, hi] tokens can hit, i.e. the compiles per piece: for 5-30 s of audio with a 40-token
prompt (165-790 tokens) 73 buckets, against 37 at 16 per octave and 5 with the old grid; the
pooled layer groups after a stage add the buckets of their own, shorter ranges. Jobs keep their
compiled programs in JAX's persistent compilation cache (the CLI turns it on), so a bucket
compiles once per machine and setting, not once per run. Above 2048 tokens compiles are dearer
and such jobs rarer, so the grid coarsens to eight per octave there.

`seq_grid` swaps the grid for a benchmark of another policy (`affjax bench-pooling --seq-grid`,
with the alternatives in SEQ_GRIDS); jobs never call it.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

SEQ_MIN = 64
# (upper end, step): buckets every `step` tokens from the previous upper end (SEQ_MIN first) up to this one
SEQ_GRID: tuple[tuple[int, int], ...] = ((256, 4), (512, 8), (1024, 16), (2048, 32),
                                         (4096, 256), (8192, 512), (16384, 1024))
FINE_UP_TO = 2048   # 32 buckets per octave from 128 up to here (steps <= 32), eight per octave above
FINE_STEP_MAX = 32  # the largest step up to FINE_UP_TO
PAD_BOUND = 1 / 32  # bucket(n) / n < 1 + PAD_BOUND for 128 < n <= FINE_UP_TO

# other policies, for benchmarks only (seq_grid): 16 per octave, and the grid before this one
SEQ_GRIDS: dict[str, tuple[tuple[int, int], ...]] = {
    "32": SEQ_GRID,
    "16": ((256, 8), (512, 16), (1024, 32), (2048, 64), (4096, 256), (8192, 512), (16384, 1024)),
    "old": ((128, 64), (512, 128), (1536, 256), (3072, 512), (4096, 1024), (8192, 2048), (16384, 4096)),
}


def _grid(start: int, grid: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    out = [start]
    for top, step in grid:
        if (top - out[-1]) % step:
            raise ValueError(f"grid step {step} does not reach {top} from {out[-1]}")
        out += range(out[-1] + step, top + 1, step)
    return tuple(out)


# AFFJAX_SEQ_GRID names another grid of SEQ_GRIDS for a whole process (the test suite runs the
# coarse "old" one: the same code paths with far fewer compiles; tests/test_shapes.py checks the
# policy's own grid). Jobs leave it unset.
SEQ_BUCKETS: tuple[int, ...] = _grid(SEQ_MIN, SEQ_GRIDS[os.environ.get("AFFJAX_SEQ_GRID") or "32"])
CONT_BUCKETS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
# Words per clip given to the oracle interventions (affjax.pooling.oracle): 30 s of speech has
# at most a few hundred.
WORD_BUCKETS: tuple[int, ...] = (32, 64, 128, 256, 512)
# Training sequences (affjax.train): coarser than SEQ_BUCKETS, since every bucket compiles a whole
# forward + backward step (tens of seconds) and a step's padding is a cost paid once, not per token.
TRAIN_BUCKETS: tuple[int, ...] = (64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
# Whisper's encoder: after a pooling stage its frame buffer (1500 frames unpooled) is sliced to a
# multiple of ENCODER_STEP frames; a deep stage's later layers and the decoder run at that length.
ENCODER_STEP = 128


class BucketError(ValueError):
    pass


def bucket(n: int, buckets: tuple[int, ...] | None = None, what: str = "sequence") -> int:
    """The smallest bucket that holds n (of SEQ_BUCKETS unless `buckets` is given)."""
    buckets = SEQ_BUCKETS if buckets is None else buckets
    i = int(np.searchsorted(buckets, n, side="left"))
    if i == len(buckets):
        raise BucketError(f"{what} length {n} exceeds the largest bucket {buckets[-1]}")
    return int(buckets[i])


def buckets_between(lo: int, hi: int, buckets: tuple[int, ...] | None = None) -> int:
    """How many buckets sequences of lo..hi tokens can land in: the compiles per piece of a job
    whose sequences range over [lo, hi]."""
    buckets = SEQ_BUCKETS if buckets is None else buckets
    if hi < lo:
        return 0
    return buckets.index(bucket(hi, buckets)) - buckets.index(bucket(lo, buckets)) + 1


@contextlib.contextmanager
def seq_grid(grid: tuple[tuple[int, int], ...]):
    """Benchmarks only: SEQ_BUCKETS built from `grid` (from SEQ_MIN) inside the block."""
    global SEQ_BUCKETS
    saved = SEQ_BUCKETS
    SEQ_BUCKETS = _grid(SEQ_MIN, grid)
    try:
        yield SEQ_BUCKETS
    finally:
        SEQ_BUCKETS = saved


def encoder_buckets(max_frames: int, step: int = ENCODER_STEP) -> tuple[int, ...]:
    """Whisper encoder buffer lengths after a stage: multiples of ``step`` below ``max_frames``, then
    ``max_frames`` (use with `bucket(n, encoder_buckets(N), "encoder frames")`)."""
    return tuple(range(step, max_frames, step)) + (max_frames,)


def audio_slots(n_audio: int, batch_size: int) -> int:
    """Audio clips per batch, padded to a multiple of the batch size (at least one per row)."""
    return max(1, -(-n_audio // batch_size)) * batch_size


def pad_rows(x: np.ndarray, rows: int, fill=0) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.full((rows - x.shape[0],) + x.shape[1:], fill, dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)


def pad_continuations(conts: list[np.ndarray], batch_size: int, cont_len: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Scored continuations (token ids per item) padded to (Int32['B K'], Bool['B K']), K =
    `cont_len` or the smallest CONT_BUCKETS bucket that fits the longest."""
    K = cont_len or bucket(max(len(c) for c in conts), CONT_BUCKETS, "continuation")
    ids, valid = np.zeros((batch_size, K), np.int32), np.zeros((batch_size, K), bool)
    for b, c in enumerate(conts):
        ids[b, :len(c)], valid[b, :len(c)] = c, True
    return ids, valid
