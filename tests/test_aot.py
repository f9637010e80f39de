"""affjax.runtime.aot: job programs compiled by the real TPU compiler on compile-only devices
(libtpu, the tpu extra), and what is read from them: peak HBM, loop-corrected FLOPs, collectives."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import need_module
from affjax.runtime import aot
from affjax.runtime.plan import tiny_config


def test_topology_names():
    assert aot.canonical_topology("v5e-8") == "v5e:2x4"
    assert aot.canonical_topology("v4-8") == "v4:2x2x1"
    assert aot.canonical_topology("v5e:2x2") == "v5e:2x2"
    with pytest.raises(aot.AotError, match="unknown TPU topology 'v9-8'.*v5e:2x4"):
        aot.canonical_topology("v9-8")
    assert aot.chip("v5e-8")["hbm"] == 16 * aot.GiB
    # a compile-only v4 device is one TensorCore: half a chip's HBM, FLOP/s and bandwidth
    assert aot.chip("v4-8") == {"hbm": 16 * aot.GiB, "flops": 137.5e12, "hbm_bw": 0.6e12}


def test_collectives_from_hlo_text():
    text = "\n".join([
        "  %all-gather.3 = bf16[4,256]{1,0:T(4,128)(2,1)} all-gather(%convert.6), channel_id=2, dimensions={1}",
        "  %ag-start = (f32[2,8]{1,0}, f32[4,8]{1,0}) all-gather-start(%p), dimensions={0}",
        "  %ag-done = f32[4,8]{1,0} all-gather-done(%ag-start)",
        "  %all-reduce.1 = f32[] all-reduce(%x), to_apply=%add",
        "  %fusion.2 = f32[4,128]{1,0} fusion(%all-gather.3), kind=kOutput, calls=%fused",
    ])
    got = aot.collectives(text)
    # the done half of an async pair is not a second collective; bytes are the output's
    assert got == {"all-gather": {"count": 2, "bytes": 4 * 256 * 2 + 4 * 8 * 4}, "all-reduce": {"count": 1, "bytes": 4}}


@pytest.fixture(scope="module")
def tpu():
    need_module("libtpu", aot.INSTALL)
    return aot


def _small_config():
    """The tiny config with 4 s windows (200 encoder positions): quick compiles."""
    cfg = copy.deepcopy(tiny_config())
    cfg["audio_config"]["max_source_positions"] = 200
    return cfg


def test_tpu_loop_trip_count_from_the_condition(tpu):
    """TPU HLO has no known_trip_count: the loop's bound comes from its condition, so a fori_loop
    of 7 matmuls counts 7 times the body's FLOPs (XLA's own figure counts one)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = tpu.tpu_mesh("v5e:2x2", "data=2,model=2")
    x = jax.ShapeDtypeStruct((8, 256), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
    w = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(mesh, P(None, "model")))

    def f(x, w):
        return jax.lax.fori_loop(0, 7, lambda i, h: jnp.tanh(h @ w), x)
    rep, _ = tpu.compile_program("loop", jax.jit(f), (x, w), {}, mesh)
    per_chip = 2 * 4 * 256 * 128 * 7  # 4 rows x 128 columns per chip
    assert rep.fits and rep.loops == 1
    assert per_chip <= rep.flops < 1.1 * per_chip, (rep.flops, per_chip)
    assert rep.flops_raw < 0.3 * per_chip
    assert rep.collectives["all-gather"]["count"] >= 1  # w's columns are gathered for the next step


def test_hbm_overflow_is_does_not_fit(tpu):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = tpu.tpu_mesh("v5e:2x2", "data=4,model=1")
    x = jax.ShapeDtypeStruct((80_000, 1024), jnp.float32, sharding=NamedSharding(mesh, P()))
    rep, compiled = tpu.compile_program("big", jax.jit(lambda a: a @ a.T), (x,), {}, mesh)  # 25.6 GB out
    assert compiled is None and not rep.fits and "HBM" in rep.error


_VMEM_PROBE = """
import sys
from affjax.runtime import aot
aot.prepare_env(int(sys.argv[1]) if len(sys.argv) > 1 else None)
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = aot.tpu_mesh("v5e:2x2", "data=4")
w = jax.ShapeDtypeStruct((2048, 8192), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
x = jax.ShapeDtypeStruct((64, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
rep, _ = aot.compile_program("w twice", jax.jit(lambda w, x: jnp.tanh(x @ w) @ w.T), (w, x), {}, mesh)
print(rep.peak_bytes, rep.argument_bytes)
"""


def test_compiler_peak_counts_on_chip_vmem(tpu):
    """The TPU compiler's peak counts what it places in on-chip VMEM: a 32 MiB weight read twice is
    prefetched whole into VMEM (peak = 2 x the argument); with VMEM capped at 16 MiB (--vmem-mib, a
    libtpu flag read once per process, hence the child processes) the peak is the argument alone."""
    import subprocess
    import sys

    def peak(*cap):
        out = subprocess.run([sys.executable, "-c", _VMEM_PROBE, *cap], capture_output=True, text=True, check=True)
        return [int(v) for v in out.stdout.split()[-2:]]
    (full, arg), (capped, arg2) = peak(), peak("16")
    assert arg == arg2 == 2048 * 8192 * 2 + 16 * 2048 * 2
    assert full > 1.9 * arg, (full, arg)
    assert capped < 1.05 * arg, (capped, arg)
    with pytest.raises(tpu.AotError, match="positive"):
        tpu.prepare_env(0)


@pytest.fixture(scope="module")
def unpooled_full(tpu):
    job = tpu.JobShape(batch=4, audio_seconds=3.0, text_tokens=24, max_new_tokens=8)
    return job, tpu.plan_job(_small_config(), "v5e:2x2", "data=4,model=1", job, depth="full", log=lambda s: None)


def test_tiny_job_compiles_for_v5e(unpooled_full):
    from affjax.runtime.flops import lm_prefill_flops
    from affjax.models.qwen2_audio.modeling import Qwen2AudioConfig
    job, r = unpooled_full
    assert r["fits"] and list(r["programs"]) == ["embed", "layers[0:4)", "last_head", "decode"]
    # the job keeps every parameter resident; each program adds its own activations and caches
    assert 0 < r["param_bytes"] < r["job_bytes"] <= r["param_bytes"] + r["peak_bytes_max"]
    for d in r["programs"].values():
        assert d["peak_bytes"] > 0 and d["flops"] > 0
    # the layer group's FLOPs per chip: the analytic count of its rows (a quarter of the batch per
    # chip), plus the element-wise work the analytic count leaves out
    cfg = Qwen2AudioConfig.from_hf(_small_config())
    t = r["layout"]["sequence_buffer"]
    analytic = lm_prefill_flops(cfg.text, [t] * 4, items=0) * job.batch / 4
    got = r["programs"]["layers[0:4)"]["flops"]
    assert analytic <= got < 1.25 * analytic, (got, analytic)
    # pure data parallelism: no activation is gathered in the decoder, the head or the decode loop
    # (the loop's one all-reduce is its stop test, every row done)
    for label in ("layers[0:4)", "last_head", "decode"):
        assert "all-gather" not in r["programs"][label]["collectives"], (label, r["programs"][label]["collectives"])
    assert r["programs"]["decode"]["collectives"].get("all-reduce", {}).get("bytes", 0) <= 4
    # the decode loop counts max_new_tokens steps, not one
    assert r["programs"]["decode"]["flops"] > 0.9 * job.max_new_tokens * r["programs"]["decode"]["flops_raw"] / 2


def test_roofline_from_the_compiled_programs(unpooled_full, tpu):
    """HBM traffic per chip, loop-corrected like the FLOPs: each decode step reads every parameter
    the chip holds; each program's roofline time is its FLOPs or its traffic at the chip's peak."""
    job, r = unpooled_full
    spec = tpu.chip("v5e:2x2")
    for label, d in r["programs"].items():
        t, bound = d["roofline"]
        assert d["bytes_accessed_full"] > 0 and bound in ("compute", "memory")
        assert t == pytest.approx(max(d["flops_full"] / spec["flops"], d["bytes_accessed_full"] / spec["hbm_bw"]))
    dec = r["programs"]["decode"]
    assert dec["bytes_accessed_full"] >= job.max_new_tokens * 0.9 * r["param_bytes"], (dec["bytes_accessed_full"],
                                                                                      r["param_bytes"])
    assert dec["roofline"][1] == "memory"  # one token per row and step: decoding is bandwidth-bound
    rf = r["roofline"]
    assert rf["prefill_s"] == pytest.approx(sum(d["roofline"][0] for k, d in r["programs"].items() if k != "decode"))
    assert rf["prefill_items_per_s"] == pytest.approx(job.batch / rf["prefill_s"])
    assert rf["decode_tokens_per_s"] == pytest.approx(job.batch * job.max_new_tokens / dec["roofline"][0])


def test_two_point_depth_matches_the_full_compile(tpu):
    """A pooled job (groups of 1 and 3 layers with different cache lengths): the two-point rule,
    with the decode loop's per-layer cost taken group by group, gives the full compile's figures."""
    from affjax.pooling.spec import parse_pooling
    cfg = _small_config()
    job = tpu.JobShape(batch=4, audio_seconds=3.0, text_tokens=24, max_new_tokens=16)
    pool = parse_pooling("1:tau=0.9,window=2", 4)
    full, two = (tpu.plan_job(cfg, "v5e:2x2", "data=4,model=1", job, pool, [0.5], depth=d, log=lambda s: None)
                 for d in ("full", "two-point"))
    assert full["layout"]["groups"] == [(0, 1), (1, 4)] and full["layout"]["stage_buffers"] == [64]
    for label, d in full["programs"].items():
        e = two["programs"][label]
        assert abs(e["flops_full"] - d["flops"]) <= 0.03 * d["flops"], (label, e["flops_full"], d["flops"])
        assert abs(e["peak_bytes_full"] - d["peak_bytes"]) <= 0.05 * d["peak_bytes"] + (1 << 20), \
            (label, e["peak_bytes_full"], d["peak_bytes"])
    assert all(d["analytic_own_bytes"] > 0 for d in two["programs"].values())  # beside each program


def test_two_point_rule_takes_each_group_at_its_own_cost():
    """The decode loop's full-depth figure from one variant per group (that group at two layers):
    groups of 29 and 3 layers count 28 and 2 extra layers at their own per-layer costs; the mean
    group depth (16 each) would count the short-cache group 13 times too often."""
    def rep(peak, flops):
        return aot.ProgramReport("decode", fits=True, peak_bytes=peak, argument_bytes=0, input_bytes=0, flops=flops,
                                 bytes_accessed=flops, collectives={"all-reduce": {"count": 2, "bytes": 8}})
    base = rep(1000, 10.0)
    d = aot._extrapolate(base, [(rep(1100, 12.0), 29), (rep(1010, 11.0), 3)])
    assert d["peak_bytes_full"] == 1000 + 28 * 100 + 2 * 10
    assert d["flops_full"] == 10.0 + 28 * 2.0 + 2 * 1.0 and d["own_bytes_full"] == d["peak_bytes_full"]
    assert d["collectives"] == {"all-reduce": {"count": 2, "bytes": 8}}
    assert aot._extrapolate(base, [(None, 29)])["peak_bytes_full"] == 1000  # no variant


def test_pooled_job_on_a_2d_mesh_and_the_cli(tpu, tmp_path, capsys):
    """dap-style stages at layers 1 and 3 on data=2,model=2, through `affjax plan --aot`."""
    import json

    from affjax.cli import main
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(_small_config()))
    out = tmp_path / "r.json"
    rc = main(["plan", "--aot", "--topology", "v5e-4", "--mesh", "data=2,model=2", "--ckpt-config", str(cfg),
               "--pooling", "1:tau=0.9,window=2;3:tau=0.9,window=2", "--retention", "0.5",  # one for both stages
               "--batch-size", "2", "--audio-seconds", "3", "--text-tokens", "16", "--max-new-tokens", "8",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads(out.read_text())
    assert list(r["programs"]) == ["embed", "layers[0:1)", "pool@1", "layers[1:3)", "pool@3", "layers[3:4)",
                                   "last_head", "decode"]
    assert r["layout"]["stage_buffers"][0] < r["layout"]["sequence_buffer"] and r["retention"] == [0.5, 0.5]
    assert "pool@1" in text and "fits: yes" in text
    # tensor parallelism needs its all-reduces
    assert any("all-reduce" in d["collectives"] for d in r["programs"].values())
    assert main(["plan", "--aot", "--topology", "v9-8", "--ckpt-config", str(cfg)]) == 1
    assert "unknown TPU topology" in capsys.readouterr().err


def test_a_program_that_does_not_fit_ends_the_job_plan(tpu, monkeypatch):
    """A middle program over HBM (as at the largest batches): the plan says so, compiles nothing after
    it, and still gives the analytic figures (they come from the job's layout, not from what compiled)."""
    real = tpu.compile_program

    def compile_program(label, *a, **kw):
        if label == "layers[1:3)":
            return tpu.ProgramReport(label, fits=False, error="RESOURCE_EXHAUSTED: Ran out of memory on HBM"), None
        return real(label, *a, **kw)
    monkeypatch.setattr(tpu, "compile_program", compile_program)
    from affjax.pooling.spec import parse_pooling
    pooling = parse_pooling("1:tau=0.9,window=2;3:tau=0.9,window=2", 4)
    job = tpu.JobShape(batch=2, audio_seconds=3.0, text_tokens=16, max_new_tokens=8)
    r = tpu.plan_job(_small_config(), "v5e:2x2", "data=2,model=2", job, pooling, [0.5, 0.5], log=lambda s: None)
    assert not r["fits"] and list(r["programs"]) == ["embed", "layers[0:1)", "pool@1", "layers[1:3)"]
    assert not r["programs"]["layers[1:3)"]["fits"] and r["programs"]["pool@1"]["analytic_own_bytes"] > 0
    assert r["layout"]["stage_buffers"] == tpu.job_layout(_small_config(), job, tuple(pooling.stages),
                                                          (0.5, 0.5))["stage_buffers"]


def test_loop_bound_parser_reads_lt_constants():
    from affjax.runtime.flops import _cond_bound
    lines = ["%cond.1 (p: (s32[], f32[4])) -> pred[] {",
             "  %gte = s32[] get-tuple-element(%p), index=0",
             "  %constant.9 = s32[]{:T(128)} constant(12)",
             "  ROOT %lt = pred[] compare(%gte, %constant.9), direction=LT",
             "}"]
    assert _cond_bound(lines, "cond.1") == 12
    assert _cond_bound(lines, "other") is None
    np.testing.assert_equal(_cond_bound(lines[:3] + ["}"], "cond.1"), None)


def _kimi_config():
    """A Kimi-Audio-shaped config (tests/kimi_reference.py's release fields, its Whisper config
    embedded as `affjax plan` reads a release) with 4 s encoder windows: quick compiles."""
    from kimi_reference import tiny_config as kimi_tiny_config
    cfg = kimi_tiny_config(hidden=64, layers=4, mimo_layers=1, mimo_from=1)
    cfg["whisper_config"] = {"model_type": "whisper", "num_mel_bins": 128, "d_model": 64, "encoder_layers": 2,
                             "encoder_attention_heads": 4, "encoder_ffn_dim": 128, "max_source_positions": 200}
    return cfg


def test_kimi_audio_pooled_job_through_the_cli(tpu, tmp_path, capsys):
    """Kimi-Audio's programs: two streams of ids, one feature row per encoder window (6 s of audio
    is two 4 s windows here: 50 + 25 tokens at 12.5 Hz), a pooling stage between decoder layers, and
    the MIMO layers resident (loaded) though no program runs them."""
    import json

    from affjax.cli import main
    from affjax.runtime.plan import param_bytes_per_chip
    cfg = _kimi_config()
    assert aot.layer_counts(cfg) == (4, 2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "r.json"
    rc = main(["plan", "--aot", "--topology", "v5e-4", "--mesh", "data=2,model=2", "--ckpt-config", str(path),
               "--pooling", "1:tau=0.9,window=2", "--retention", "0.5", "--batch-size", "2", "--audio-seconds", "6",
               "--text-tokens", "16", "--max-new-tokens", "8", "--depth", "full", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads(out.read_text())
    assert list(r["programs"]) == ["embed", "layers[0:1)", "pool@1", "layers[1:4)", "last_head", "decode"]
    assert r["layout"]["audio_tokens"] == 75 and r["layout"]["stage_buffers"][0] < r["layout"]["sequence_buffer"]
    assert r["programs"]["embed"]["layers"] == [2, 2] and r["programs"]["layers[1:4)"]["layers"] == [3, 3]
    # every parameter is resident, the MIMO layer and mimo_output included
    assert r["param_bytes"] == param_bytes_per_chip(cfg, model=2, dtype_bytes=2)
    assert "fits: yes" in text and "pool@1" in text


def test_kimi_audio_encoder_runs_many_windows_in_steps(tpu, monkeypatch):
    """Long audio (two windows a row, 16 windows per data shard): the audio encoder runs them
    AUDIO_WINDOWS_PER_STEP per shard at a time, in a loop, with the same FLOPs and no collective
    added (each step keeps the rows' split over 'data'); all at once when the step is larger."""
    from affjax.models.kimi_audio import modeling as kimi
    cfg = _kimi_config()
    job = tpu.JobShape(batch=16, audio_seconds=8.0, text_tokens=16, max_new_tokens=4)

    def embed(per_step):
        monkeypatch.setattr(kimi, "AUDIO_WINDOWS_PER_STEP", per_step)
        r = tpu.plan_job(cfg, "v5e:2x2", "data=2,model=2", job, depth="full", log=lambda s: None)
        assert r["layout"]["windows"] == 32
        return r["programs"]["embed"]
    steps, once = embed(8), embed(1 << 20)
    assert (steps["loops"], once["loops"]) == (1, 0)
    assert abs(steps["flops"] - once["flops"]) <= 1e-3 * once["flops"]
    assert {k: v["count"] for k, v in steps["collectives"].items()} == \
        {k: v["count"] for k, v in once["collectives"].items()}
    assert steps["peak_bytes"] <= once["peak_bytes"] + (1 << 20)


def test_largest_batch_search_brackets_and_bisects(tpu, monkeypatch):
    """`plan --aot --max-batch`'s search, with plan_job replaced by a stand-in: when bytes grow
    linearly with the rows a chip holds, four compiles (two for the line, its answer, one row per
    chip more); when they grow faster past the first rows (small batches pad to the chip's tiles)
    the line overshoots, and stepping down and bisecting still find it. Either way the batch found
    fits and one more row per chip was compiled and does not."""
    calls = []

    def stand_in(extra_per_row):
        def fake_plan(cfg, topology, mesh_text, job, pooling, retention, **kw):
            calls.append(job.batch)
            rows = job.batch // 4
            need = (100 << 20) + (1 << 20) * rows + (extra_per_row << 20) * max(0, rows - 8)
            over = need > budget
            # a batch over HBM stops at its first program that does not fit: no figure for it
            return {"fits": not over, "job_bytes": need, "param_bytes": 100 << 20,
                    "programs": {"p": {"own_bytes_full": None}} if over else
                    {"p": {"own_bytes_full": need - (100 << 20)}, "q": {"own_bytes_full": 1 << 20}}}
        return fake_plan

    # 100 + r + extra (r - 8) <= budget MiB; the last: twice the first batch is already over
    for extra, rows, most, mib in ((0, 300, 4, 400), (3, 81, 20, 400), (0, 5, 5, 105)):
        calls.clear()
        budget = mib << 20
        monkeypatch.setattr(tpu, "plan_job", stand_in(extra))
        found = tpu.max_batch({}, "v5e:2x2", "data=4,model=1", tpu.JobShape(batch=16), budget=budget,
                              log=lambda s: None)
        assert found["rows_per_chip"] == rows and found["max_batch"] == 4 * rows, found["tried"]
        tried = {t["batch"]: t["fits"] for t in found["tried"]}
        assert tried[4 * rows] and tried[4 * rows + 4] is False and calls[:2] == [16, 32] and len(calls) <= most


def test_whisper_transcription_plan_through_the_cli(tpu, tmp_path, capsys):
    """`plan --aot` on a Whisper config: the encoder and the greedy loop compile for v4's
    TensorCores, data parallel with no gather, and the roofline gives a real-time factor."""
    import json

    from affjax.cli import main
    from affjax.runtime.plan import WHISPER_LARGE_V3_CONFIG
    cfg = dict(WHISPER_LARGE_V3_CONFIG, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256)
    path, out = tmp_path / "config.json", tmp_path / "w.json"
    path.write_text(json.dumps(cfg))
    rc = main(["plan", "--aot", "--topology", "v4-8", "--mesh", "data=8,model=1", "--ckpt-config", str(path),
               "--batch-size", "8", "--max-new-tokens", "16", "--depth", "full", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "real-time factor" in text, text
    r = json.loads(out.read_text())
    assert list(r["programs"]) == ["encode", "greedy"] and r["fits"] and r["attention"] == "xla"
    g = r["programs"]["greedy"]
    assert g["loops"] >= 1 and g["flops"] > 2 * g["flops_raw"]  # the loop body counted 16 times, not once
    assert all("all-gather" not in d["collectives"] for d in r["programs"].values())
    rf = r["roofline"]
    assert rf["real_time_factor"] == pytest.approx(rf["batch_s"] / (8 * 30.0))
    assert rf["batch_s"] == pytest.approx(sum(d["roofline"][0] for d in r["programs"].values()))
    assert main(["plan", "--aot", "--topology", "v4-8", "--mesh", "data=4,model=2", "--ckpt-config", str(path)]) == 1
    assert "data parallel" in capsys.readouterr().err
