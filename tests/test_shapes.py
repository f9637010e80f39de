"""The sequence bucket grid (affjax/runtime/shapes.py): a deliberate policy with a stated padding bound.

The rest of the suite runs under the coarse "old" grid (conftest sets AFFJAX_SEQ_GRID: far fewer
compiles); these tests put the policy's own grid back around each test."""

import os
import subprocess
import sys

import numpy as np
import pytest

from affjax.runtime import shapes


def test_the_suite_runs_the_coarse_grid_and_jobs_the_policy():
    assert os.environ.get("AFFJAX_SEQ_GRID") == "old"
    assert shapes.SEQ_BUCKETS == shapes._grid(shapes.SEQ_MIN, shapes.SEQ_GRIDS["old"])
    env = {k: v for k, v in os.environ.items() if k != "AFFJAX_SEQ_GRID"}
    out = subprocess.run([sys.executable, "-c", "from affjax.runtime import shapes; print(shapes.bucket(630))"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "640"  # a job (no AFFJAX_SEQ_GRID) gets the policy grid


@pytest.fixture(autouse=True)
def policy_grid(request):
    if request.node.name.startswith("test_the_suite_runs"):
        yield
        return
    with shapes.seq_grid(shapes.SEQ_GRID):
        yield


def test_grid_is_monotone_and_covers_the_max():
    b = np.asarray(shapes.SEQ_BUCKETS)
    assert b[0] == shapes.SEQ_MIN and (np.diff(b) > 0).all()
    assert b[-1] == shapes.SEQ_GRID[-1][0] == 16384
    assert all(x % 4 == 0 for x in shapes.SEQ_BUCKETS)
    assert all(x % 8 == 0 for x in shapes.SEQ_BUCKETS if x >= 256)
    for top, _ in shapes.SEQ_GRID:  # every stated upper end is a bucket
        assert top in shapes.SEQ_BUCKETS
    with pytest.raises(shapes.BucketError):
        shapes.bucket(int(b[-1]) + 1)


def test_steps_up_to_the_fine_end():
    b = np.asarray(shapes.SEQ_BUCKETS)
    fine = b[b <= shapes.FINE_UP_TO]
    assert fine[-1] == shapes.FINE_UP_TO
    steps = np.diff(fine)
    assert steps.max() <= shapes.FINE_STEP_MAX
    # 32 per octave from 128 on: each step at most a 32nd of the bucket it starts from
    for lo, step in zip(fine[:-1], steps):
        assert step <= lo * (shapes.PAD_BOUND if lo >= 128 else 1 / 16), (lo, step)
    # coarser above, eight per octave
    coarse = b[b >= shapes.FINE_UP_TO]
    for lo, step in zip(coarse[:-1], np.diff(coarse)):
        assert step <= lo / 8, (lo, step)


def test_padding_bound():
    """bucket(n) / n < 1 + 1/32 for 128 < n <= 2048, < 1 + 1/16 for 64 < n <= 128, < 1 + 1/8 above."""
    n = np.arange(1, shapes.SEQ_BUCKETS[-1] + 1)
    got = np.asarray([shapes.bucket(int(k)) for k in n])
    assert (got >= n).all()
    assert (got[n <= 64] == 64).all()
    ratio = got / n
    fine = (n > 128) & (n <= shapes.FINE_UP_TO)
    assert ratio[fine].max() < 1 + shapes.PAD_BOUND
    assert ratio[(n > 64) & (n <= 128)].max() < 1 + 1 / 16
    assert ratio[n > shapes.FINE_UP_TO].max() < 1 + 1 / 8
    # each n lands in the smallest bucket that holds it
    idx = np.searchsorted(shapes.SEQ_BUCKETS, got)
    prev = np.where(idx > 0, np.asarray(shapes.SEQ_BUCKETS)[np.maximum(idx - 1, 0)], 0)
    assert (prev < n).all()


def test_buckets_between_counts_compiles_per_piece():
    assert shapes.buckets_between(1, 64) == 1
    assert shapes.buckets_between(65, 68) == 1
    assert shapes.buckets_between(64, 65) == 2
    assert shapes.buckets_between(10, 5) == 0
    # 5-30 s of audio (125-750 tokens) with a 40-token prompt
    assert shapes.buckets_between(165, 790) == len({shapes.bucket(n) for n in range(165, 791)}) == 73
    old = shapes._grid(shapes.SEQ_MIN, shapes.SEQ_GRIDS["old"])
    assert old == (64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 6144, 8192, 12288, 16384)
    assert shapes.buckets_between(165, 790, buckets=old) == 5
    assert shapes.bucket(630) == 640 and shapes.bucket(790) == 800  # not 768 and 1024 as before


def test_seq_grid_swaps_and_restores():
    before = shapes.SEQ_BUCKETS  # the policy grid (the fixture)
    with shapes.seq_grid(shapes.SEQ_GRIDS["old"]):
        assert shapes.bucket(630) == 768
    assert shapes.SEQ_BUCKETS is before and shapes.bucket(630) == 640
