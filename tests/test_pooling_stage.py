"""One pooling stage (docs/pooling.md sections 1-4) against a sequential reference, plus properties."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from affjax.pooling.affinity import (
    fixed_capacity_needed,
    pool_stage,
    pool_stage_jit,
    retention_slots,
)
from affjax.pooling.spec import PoolingConfig, Stage, parse_pooling
from pooling_reference import ref_stage

# One set of shapes everywhere, so the jit cache is shared between tests.
B, N, D = 4, 32, 8
TAUS = (-1.0, 0.5, 0.8, 0.95, 1.1)
WINDOWS = (1, 2, 3, 5)
MARGIN = 1e-5  # items whose decisions lie this close to a threshold are not compared
HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Sequential reference of docs/pooling.md section 1 (+ positions, sizes, fixed-capacity overflow).
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def make_item(rng: np.random.Generator, n: int, structured: bool = True, sizes: bool = False):
    """Text tokens and several audio spans (sometimes adjacent), h as noisy runs or pure noise."""
    span = np.zeros(n, np.int32)
    t, k = 0, 0
    while t < n:
        if rng.random() < 0.35:
            t += int(rng.integers(1, 3))
        else:
            length = int(rng.integers(1, 13))
            k += 1
            span[t : t + length] = k
            t += length
    if structured:
        noise = float(rng.choice([0.0, 0.02, 0.1, 0.3, 0.6, 0.8]))
        h = np.zeros((n, D), np.float32)
        t = 0
        while t < n:
            length = int(rng.integers(1, 7))
            h[t : t + length] = rng.normal(size=D) + noise * rng.normal(size=(min(length, n - t), D))
            t += length
        if rng.random() < 0.2:  # a zero vector exercises the eps clamp
            h[int(rng.integers(n))] = 0.0
    else:
        h = rng.normal(size=(n, D)).astype(np.float32)
    pos = (np.arange(n) + rng.integers(0, 5)).astype(np.float32)
    size = rng.integers(1, 5, n).astype(np.float32) if sizes else np.ones(n, np.float32)
    return h.astype(np.float32), span, pos, size


def make_batch(rng, items, n_cols=N):
    """Pack items into (B, n_cols) rows with junk in the padding (which must never matter)."""
    rows = len(items)
    h = rng.normal(size=(rows, n_cols, D)).astype(np.float32) * 7
    span = rng.integers(0, 4, (rows, n_cols)).astype(np.int32)
    pos = rng.normal(size=(rows, n_cols)).astype(np.float32) * 100
    size = rng.integers(1, 9, (rows, n_cols)).astype(np.float32)
    valid = np.zeros((rows, n_cols), bool)
    for b, (ih, isp, ipos, isize) in enumerate(items):
        n = len(isp)
        h[b, :n], span[b, :n], pos[b, :n], size[b, :n], valid[b, :n] = ih, isp, ipos, isize, True
    return h, span, valid, pos, size


def random_items(rng, lengths, structured=None, sizes=False):
    return [
        make_item(rng, n, structured=bool(rng.random() < 0.7) if structured is None else structured,
                  sizes=sizes)
        for n in lengths
    ]


def run(batch, **kw):
    kw.setdefault("capacity", N)
    out = pool_stage_jit(*(jnp.asarray(x) for x in batch), **kw)
    return type(out)(*(np.asarray(x) for x in out))


def check_row(out, b, ref, n_in, capacity=N):
    m = len(ref["size"])
    assert int(out.n_valid[b]) == m
    np.testing.assert_allclose(out.h[b, :m], ref["h"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out.pos[b, :m], ref["pos"], atol=1e-5, rtol=1e-6)
    np.testing.assert_array_equal(out.size[b, :m], ref["size"])
    np.testing.assert_array_equal(out.span[b, :m], ref["span"])
    np.testing.assert_array_equal(out.valid[b], np.arange(capacity) < m)
    np.testing.assert_array_equal(out.group_of[b, :n_in], ref["group_of"])
    assert np.all(out.group_of[b, n_in:] == -1)
    for name in ("h", "pos", "size", "span"):
        assert np.all(getattr(out, name)[b, m:] == 0), name
    assert int(out.audio_in[b]) == ref["audio_in"]
    assert int(out.audio_out[b]) == ref["audio_out"]
    assert int(out.forced[b]) == ref["forced"]


def compare_batch(items, out, capacity=N, **ref_kw):
    """Each row equals the reference on that item alone, unpadded. Returns rows compared."""
    compared = 0
    for b, item in enumerate(items):
        ref = ref_stage(*item, **ref_kw)
        if ref["margin"] < MARGIN:
            continue
        check_row(out, b, ref, len(item[1]), capacity)
        compared += 1
    return compared


# ----------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dots", ["matvec", "reduce"])  # the two forms of the lag dot products
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("tau", TAUS)
def test_matches_reference_grid(tau, window, dots):
    rng = np.random.default_rng(int(1000 * tau) + 17 * window + 5000)
    compared = 0
    for structured in (True, False):
        items = random_items(rng, [N, int(rng.integers(1, N)), int(rng.integers(1, N)), 1], structured)
        out = run(make_batch(rng, items), tau=tau, window=window, dots=dots)
        compared += compare_batch(items, out, tau=tau, window=window)
    assert compared >= 6


@pytest.mark.parametrize("positions", ["first", "mean", "reindex"])
@pytest.mark.parametrize("weighted", [False, True])
def test_positions_and_weighted(positions, weighted):
    rng = np.random.default_rng(7 + 3 * weighted + len(positions))
    items = random_items(rng, [N, 20, 9, 3], structured=True, sizes=True)
    out = run(make_batch(rng, items), tau=0.8, window=2, weighted=weighted, positions=positions)
    assert compare_batch(items, out, tau=0.8, window=2, weighted=weighted, positions=positions) >= 3


def test_unpadded_single_item_and_tight_capacity():
    rng = np.random.default_rng(3)
    for n in (5, 17):
        item = make_item(rng, n)
        out = pool_stage_jit(*(jnp.asarray(x)[None] for x in (item[0], item[1], np.ones(n, bool),
                                                             item[2], item[3])),
                             tau=0.8, window=3, capacity=n)
        out = type(out)(*(np.asarray(x) for x in out))
        ref = ref_stage(*item, tau=0.8, window=3)
        assert ref["margin"] >= MARGIN
        check_row(out, 0, ref, n, capacity=n)
    # Bucketed with C exactly the largest group count of the batch.
    items = random_items(rng, [N, 30, 12, 4], structured=True)
    refs = [ref_stage(*it, tau=0.5, window=2) for it in items]
    cap = max(len(r["size"]) for r in refs)
    out = run(make_batch(rng, items), tau=0.5, window=2, capacity=cap)
    assert compare_batch(items, out, capacity=cap, tau=0.5, window=2) >= 3


def test_bfloat16_input():
    rng = np.random.default_rng(11)
    items = random_items(rng, [N, 10, 25, 2], structured=True)
    h, span, valid, pos, size = make_batch(rng, items)
    out = pool_stage_jit(jnp.asarray(h, jnp.bfloat16), span, valid, pos, size,
                         tau=1.1, window=1, capacity=N)
    assert out.h.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out.h, np.float32)[valid],
                                  np.asarray(jnp.asarray(h, jnp.bfloat16), np.float32)[valid])


# ----------------------------------------------------------------------------------------------
# Fixed capacity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau,window", [(0.8, 1), (0.5, 3)])
def test_retention_one_equals_bucketed(tau, window):
    rng = np.random.default_rng(21 + window)
    batch = make_batch(rng, random_items(rng, [N, 23, 11, 6]))
    a = run(batch, tau=tau, window=window)
    b = run(batch, tau=tau, window=window, retention=1.0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert np.all(b.forced == 0)


# the engine's fixed-capacity prefill runs the matvec form; "reduce" with retention is in the full suite
@pytest.mark.parametrize("dots", ["matvec", pytest.param("reduce", marks=pytest.mark.slow)])
@pytest.mark.parametrize("tau,window,retention", [(1.1, 1, 0.3), (0.8, 2, 0.5), (0.5, 5, 0.25)])
def test_retention_overflow_matches_reference(tau, window, retention, dots):
    rng = np.random.default_rng(int(retention * 100) + window)
    cases = []
    for structured in (True, False):
        items = random_items(rng, [N, int(rng.integers(1, N)), 17, 5], structured)
        cases.append((items, make_batch(rng, items)))
    # one static capacity for both batches: the largest any row needs
    cap = max(int(fixed_capacity_needed(bt[1], bt[2], retention).max()) for _, bt in cases)
    compared = 0
    for items, batch in cases:
        out = run(batch, tau=tau, window=window, retention=retention, capacity=cap, dots=dots)
        assert np.all(out.n_valid <= cap)
        compared += compare_batch(items, out, capacity=cap, tau=tau, window=window,
                                  retention=retention)
        for b, (_, sp, _, _) in enumerate(items):
            # groups per span never exceed the span's slots
            for k in set(sp[sp > 0].tolist()):
                groups = np.sum(out.span[b, : out.n_valid[b]] == k)
                assert groups <= retention_slots(np.sum(sp == k), retention)
                if tau > 1:  # nothing merges by threshold: exactly ceil(r T) groups
                    assert groups == retention_slots(np.sum(sp == k), retention)
    assert compared >= 5


def test_retention_ties_break_by_earlier_position():
    # alternating orthogonal vectors: every boundary has s == 0 exactly, 8 groups, 4 slots
    h = np.eye(D, dtype=np.float32)[[0, 1] * 4]
    span = np.ones(8, np.int32)
    item = (h, span, np.arange(8, dtype=np.float32), np.ones(8, np.float32))
    out = run(make_batch(np.random.default_rng(0), [item] * B), tau=0.5, window=2, retention=0.5)
    expected = np.array([0, 1, 2, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(out.group_of[0, :8], expected)
    np.testing.assert_array_equal(ref_stage(*item, tau=0.5, window=2, retention=0.5)["group_of"],
                                  expected)
    assert out.forced[0] == 4 and out.audio_out[0] == 4


def test_retention_slots_exact():
    np.testing.assert_array_equal(retention_slots([0, 1, 3, 10, 11], 0.3), [0, 1, 1, 3, 4])
    np.testing.assert_array_equal(retention_slots([10, 7], 0.5), [5, 4])
    with pytest.raises(ValueError):
        retention_slots([3], 0.0)
    # row 0: text, span 1 (T=10 -> 3), text, span 2 (T=1 -> 1), span 3 adjacent (T=3 -> 1), pad
    span = np.array([[0] + [1] * 10 + [0, 2, 3, 3, 3, 9], [4] * 16 + [0]])
    valid = np.arange(17)[None, :] < np.array([[16], [17]])
    np.testing.assert_array_equal(fixed_capacity_needed(span, valid, 0.3), [2 + 3 + 1 + 1, 5 + 1])


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


@st.composite
def batches(draw, sizes=False):
    seed = draw(st.integers(0, 2**31 - 1))
    lengths = draw(st.lists(st.integers(1, N), min_size=B, max_size=B))
    rng = np.random.default_rng(seed)
    items = random_items(rng, lengths, sizes=sizes)
    return items, make_batch(rng, items)


@pytest.mark.slow  # hypothesis: 30 examples
@HYP
@given(batches(), st.sampled_from(TAUS), st.sampled_from(WINDOWS))
def test_properties(data, tau, window):
    items, batch = data
    h, span, valid, pos, size = batch
    out = run(batch, tau=tau, window=window)
    for b, (ih, isp, ipos, _) in enumerate(items):
        n, m = len(isp), int(out.n_valid[b])
        g = out.group_of[b, :n]
        # order kept: slots are visited in order, each group contiguous
        assert g[0] == 0 and np.all(np.diff(g) >= 0) and np.all(np.diff(g) <= 1) and g[-1] == m - 1
        assert np.all(np.diff(out.pos[b, :m]) > 0)
        # no group crosses a span or touches text; sizes sum to span lengths
        np.testing.assert_array_equal(out.span[b, g], isp)
        counts = np.bincount(g, minlength=m)
        np.testing.assert_array_equal(out.size[b, :m], counts)
        assert np.all(counts[out.span[b, :m] == 0] == 1)
        for k in set(isp.tolist()) - {0}:
            assert out.size[b, :m][out.span[b, :m] == k].sum() == np.sum(isp == k)
        # member sums == merged mean * count
        sums = np.zeros((m, D), np.float32)
        np.add.at(sums, g, ih)
        np.testing.assert_allclose(out.h[b, :m] * counts[:, None], sums, atol=1e-4, rtol=1e-5)
        n_spans = int(np.sum((isp > 0) & np.r_[True, isp[1:] != isp[:-1]]))
        if tau > 1:
            np.testing.assert_array_equal(out.h[b, :n], ih)
            np.testing.assert_array_equal(out.pos[b, :n], ipos)
        if tau == -1:
            assert int(out.audio_out[b]) == n_spans
        assert int(out.audio_in[b]) == np.sum(isp > 0)


@pytest.mark.slow  # hypothesis: 30 examples
@HYP
@given(batches(), st.sampled_from(TAUS), st.sampled_from(WINDOWS), st.integers(0, 2**31 - 1))
def test_padding_and_neighbours_never_matter(data, tau, window, seed):
    items, batch = data
    rng = np.random.default_rng(seed)
    perm = rng.permutation(B)
    others = random_items(rng, rng.integers(1, N + 1, B))
    # same items in other rows, other neighbours, other junk in the padding
    mixed = [items[perm[i]] if i % 2 == 0 else others[i] for i in range(B)]
    a = run(batch, tau=tau, window=window)
    b = run(make_batch(rng, mixed), tau=tau, window=window)
    for i in range(0, B, 2):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x[perm[i]], y[i], atol=1e-6)


@pytest.mark.slow  # hypothesis: 30 examples
@HYP
@given(batches(), st.sampled_from([(0.95, 1), (0.8, 2), (0.5, 3)]),
       st.sampled_from([(0.8, 1, False, "first"), (0.5, 3, True, "mean"), (0.7, 2, False, "mean")]))
def test_chained_stages(data, stage1, stage2):
    items, batch = data
    tau2, window2, weighted, positions = stage2
    first = run(batch, tau=stage1[0], window=stage1[1])
    second = run((first.h, first.span, first.valid, first.pos, first.size),
                 tau=tau2, window=window2, weighted=weighted, positions=positions)
    for b, item in enumerate(items):
        r1 = ref_stage(*item, tau=stage1[0], window=stage1[1])
        r2 = ref_stage(r1["h"], r1["span"], r1["pos"], r1["size"], tau=tau2, window=window2,
                       weighted=weighted, positions=positions)
        if min(r1["margin"], r2["margin"]) < MARGIN:
            continue
        check_row(second, b, r2, len(r1["size"]))
        # sizes accumulate to the original token count
        assert second.size[b].sum() == len(item[1])


def test_compiles_once_across_valid_lengths_and_thresholds():
    """tau is traced: every valid length and every threshold runs one program (window 4: settings
    no other test uses)."""
    rng = np.random.default_rng(5)
    kw = dict(window=4, capacity=N)
    before = pool_stage_jit._cache_size()
    for n in range(1, 13):
        items = random_items(rng, [n + 20, n, 2 * n, 1])
        tau = TAUS[n % len(TAUS)] + 0.001 * n  # a new threshold each call
        out = run(make_batch(rng, items), tau=tau, **kw)
        assert out.n_valid[1] <= n
        assert compare_batch(items, out, tau=tau, window=4) >= 1
    assert pool_stage_jit._cache_size() - before == 1


def test_tau_per_row_and_float32_ties():
    """One threshold per row equals each row run alone with its own; the comparison is
    ``float32 cos >= float32(tau)``, an exact tie joins (orthogonal: cos 0, equal: cos 1)."""
    rng = np.random.default_rng(13)
    items = random_items(rng, [N, 20, 9, 3], structured=True)
    batch = make_batch(rng, items)
    taus = (0.5, 0.8, -1.0, 0.95)
    per_row = run(batch, tau=jnp.asarray(taus, jnp.float32), window=3)
    for b, tau in enumerate(taus):
        alone = run(batch, tau=tau, window=3)
        for name, x, y in zip(per_row._fields, per_row, alone):
            np.testing.assert_array_equal(x[b], y[b], err_msg=name)
    with pytest.raises(ValueError, match="one per row"):
        run(batch, tau=jnp.zeros((B + 1,), jnp.float32), window=3)

    # rows: e0 e1 | e0 e0 (cos 0, then cos 1 exactly), all one span
    h = np.eye(D, dtype=np.float32)[[0, 1, 1, 0]]
    item = (h, np.ones(4, np.int32), np.arange(4, dtype=np.float32), np.ones(4, np.float32))
    one = np.float32(1.0)
    cases = [  # (tau, groups): a tie joins; float32(1 + 1e-10) == 1 is a tie too (XLA:CPU flushes
        # subnormals, so the smallest tau above 0 here is the smallest normal float32)
        (0.0, [0, 0, 0, 0]), (-0.0, [0, 0, 0, 0]), (np.finfo(np.float32).tiny, [0, 1, 1, 2]),
        (1.0, [0, 1, 1, 2]), (1.0 + 1e-10, [0, 1, 1, 2]), (np.nextafter(one, np.float32(2)), [0, 1, 2, 3]),
    ]
    for tau, groups in cases:
        for t in (tau, jnp.full((B,), tau, jnp.float32)):
            out = run(make_batch(rng, [item] * B), tau=t, window=1)
            np.testing.assert_array_equal(out.group_of[:, :4], np.tile(groups, (B, 1)), err_msg=repr(tau))
        np.testing.assert_array_equal(ref_stage(*item, tau=float(tau), window=1)["group_of"], groups)


def test_rejects_bad_arguments():
    h, span, valid, pos, size = make_batch(np.random.default_rng(0), random_items(
        np.random.default_rng(0), [3] * B))
    with pytest.raises(ValueError, match="positions"):
        pool_stage(h, span, valid, pos, size, tau=0.5, window=1, capacity=N, positions="last")
    with pytest.raises(ValueError, match="window"):
        pool_stage(h, span, valid, pos, size, tau=0.5, window=0, capacity=N)
    with pytest.raises(ValueError, match="retention"):
        pool_stage(h, span, valid, pos, size, tau=0.5, window=1, capacity=N, retention=1.5)
    with pytest.raises(ValueError, match="lag-dot form"):
        pool_stage(h, span, valid, pos, size, tau=0.5, window=1, capacity=N, dots="gram")


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


def test_presets():
    assert not parse_pooling("none", 32).enabled
    assert not parse_pooling(None, 32).enabled
    assert parse_pooling("input", 32).stages == (Stage(0, 0.8, 1),)
    assert parse_pooling("dap-conservative", 32).stages == (Stage(0, 0.9, 1), Stage(29, 0.8, 3))
    assert parse_pooling("dap-aggressive", 32).stages == (Stage(0, 0.8, 1), Stage(29, 0.7, 3))
    assert parse_pooling("dap-aggressive", 24).stages[1].layer == 21
    cfg = parse_pooling("input", 32, positions="mean", proportional=True)
    assert cfg.positions == "mean" and cfg.proportional and cfg.enabled
    with pytest.raises(ValueError, match="num_layers"):
        parse_pooling("dap-aggressive", 3)


@pytest.mark.parametrize("text", [
    "0:tau=0.8,window=1;29:tau=0.7,window=3",
    "0:tau=0.9,window=1,weighted",
    "5:tau=-1.0,window=2;7:tau=1.1,window=5,weighted",
    "none",
])
def test_text_round_trip(text):
    cfg = parse_pooling(text, 32, positions="reindex")
    assert cfg.to_text() == text
    assert parse_pooling(cfg.to_text(), 32, cfg.positions, cfg.proportional) == cfg


def test_text_form_is_lenient_about_order_and_spaces():
    cfg = parse_pooling(" 29: window=3, tau=0.7 ; 0:tau=0.8,window=1 ", 32)
    assert cfg == parse_pooling("dap-aggressive", 32)
    assert parse_pooling("dap-aggressive", 32).to_text() == "0:tau=0.8,window=1;29:tau=0.7,window=3"


@pytest.mark.parametrize("text,match", [
    ("bogus", "bogus"),
    ("0:tau=0.8", "window"),
    ("0:window=2", "tau"),
    ("x:tau=0.8,window=1", "'x'"),
    ("0:tau=abc,window=1", "'abc'"),
    ("0:tau=0.8,window=0", "window must be >= 1"),
    ("0:tau=0.8,window=1.5", "'1.5'"),
    ("0:tau=0.8,window=1,speed=2", "'speed'"),
    ("0:tau=0.8,tau=0.7,window=1", "twice"),
    ("32:tau=0.8,window=1", "out of range"),
    ("-1:tau=0.8,window=1", ">= 0"),
    ("0:tau=0.8,window=1;0:tau=0.7,window=2", "more than once"),
    ("0:tau=0.8,window=1;;1:tau=0.8,window=1", "empty stage"),
    ("0:tau=nan,window=1", "finite"),
    ("0:tau=0.8,window=1,weighted=yes", "no value"),
])
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_pooling(text, 32)


def test_config_validation():
    with pytest.raises(ValueError, match="positions"):
        PoolingConfig((), positions="last")
    with pytest.raises(ValueError, match="increasing"):
        PoolingConfig((Stage(3, 0.5, 1), Stage(1, 0.5, 1)))
    with pytest.raises(ValueError, match="window"):
        Stage(0, 0.5, 0)
