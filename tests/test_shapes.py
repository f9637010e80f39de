"""The sequence bucket grid (affjax/shapes.py): a deliberate policy with a stated padding bound."""

import numpy as np
import pytest

from affjax import shapes


def test_grid_is_monotone_and_covers_the_max():
    b = np.asarray(shapes.SEQ_BUCKETS)
    assert b[0] == shapes.SEQ_MIN and (np.diff(b) > 0).all()
    assert b[-1] == shapes.SEQ_GRID[-1][0] == 16384
    assert all(x % 8 == 0 for x in shapes.SEQ_BUCKETS)
    for top, _ in shapes.SEQ_GRID:  # every stated upper end is a bucket
        assert top in shapes.SEQ_BUCKETS
    with pytest.raises(shapes.BucketError):
        shapes.bucket(b[-1] + 1)


def test_steps_up_to_the_fine_end():
    b = np.asarray(shapes.SEQ_BUCKETS)
    fine = b[b <= shapes.FINE_UP_TO]
    assert fine[-1] == shapes.FINE_UP_TO
    steps = np.diff(fine)
    assert steps.max() <= shapes.FINE_STEP_MAX
    # sixteen per octave from 128 on: each step at most a 16th of the bucket it starts from
    for lo, step in zip(fine[:-1], steps):
        if lo >= 128:
            assert step <= lo * shapes.PAD_BOUND, (lo, step)
    # coarser above, at most eight per octave's worth of padding
    for lo, step in zip(b[b >= shapes.FINE_UP_TO][:-1], np.diff(b[b >= shapes.FINE_UP_TO])):
        assert step <= lo / 8, (lo, step)


def test_padding_bound():
    """bucket(n) / n < 1 + 1/16 for 128 < n <= 2048, < 1 + 1/8 for 64 < n <= 128 and above 2048."""
    n = np.arange(1, shapes.SEQ_BUCKETS[-1] + 1)
    got = np.asarray([shapes.bucket(int(k)) for k in n])
    assert (got >= n).all()
    assert (got[n <= 64] == 64).all()
    ratio = got / n
    fine = (n > 128) & (n <= shapes.FINE_UP_TO)
    assert ratio[fine].max() < 1 + shapes.PAD_BOUND
    assert ratio[(n > 64) & ~fine].max() < 1 + 1 / 8
    # each n lands in the smallest bucket that holds it
    idx = np.searchsorted(shapes.SEQ_BUCKETS, got)
    prev = np.where(idx > 0, np.asarray(shapes.SEQ_BUCKETS)[np.maximum(idx - 1, 0)], 0)
    assert (prev < n).all()


def test_buckets_between_counts_compiles_per_piece():
    assert shapes.buckets_between(1, 64) == 1
    assert shapes.buckets_between(65, 72) == 1
    assert shapes.buckets_between(64, 65) == 2
    assert shapes.buckets_between(10, 5) == 0
    # 5-30 s of audio (125-750 tokens) with a 40-token prompt
    assert shapes.buckets_between(165, 790) == len({shapes.bucket(n) for n in range(165, 791)})
    old = (64, 128, 256, 384, 512, 768, 1024)
    assert shapes.buckets_between(165, 790, buckets=old) == 5
    assert shapes.bucket(630) == 640 and shapes.bucket(790) == 800  # not 768 and 1024 as before
