"""affjax.runtime.sharding: mesh parsing, the logical-axis rules, and the Engine under meshes.

The mesh checks run in subprocesses (tests/sharding_check.py), since XLA_FLAGS must ask for fake
CPU devices before JAX starts (this process already has one device): a tiny Qwen2-Audio whose
heads (8), MLP width (128), audio heads (8) and vocabulary (151672) divide by 8 and whose KV heads
(4) do not, so tensor parallelism is exercised and so is the replicate-when-not-divisible rule.
Meshes (4,2) and (1,8) on 8 devices (both axes, pure model parallelism) must give
the one-device score log-probs within 1e-5 and the same greedy tokens, unpooled, with bucketed
proportional pooling and with fixed capacity (MESH_SETTINGS says which mesh runs which); and so
must 2 processes x 4 devices (jax.distributed on localhost), each scoring its share of the items. The subprocesses use XLA's cheapest CPU compile settings (both sides of every
comparison run under the same ones).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_COMPILE, need_qwen2_tokenizer
from jax.sharding import AbstractMesh, PartitionSpec as P

from affjax.runtime import sharding
from affjax.runtime.sharding import ACTIVATION_AXES, AXES, LOGICAL_RULES, PARAM_AXES, param_axes, param_spec, parse_mesh

HERE = Path(__file__).parent
MESHES = ("data=4,model=2", "data=1,model=8")
SETTINGS = ("none", "bucketed-proportional", "fixed")
# what each mesh runs (each setting compiles its own programs): unpooled everywhere; bucketed pooling
# on both axes (and on two processes); fixed capacity under pure model parallelism, where the KV
# heads do not divide the 8 devices (that one program runs the whole model there, so an unpooled
# run would add no rule). Pure data parallelism (data=8) adds none either (rows over data are
# checked at data=4 and on two processes; tests/test_train.py steps on data=4,model=2). Each
# setting on each mesh costs its own compiles.
MESH_SETTINGS = {MESHES[0]: ("none", "bucketed-proportional"), MESHES[1]: ("fixed",)}


# ----------------------------------------------------------------------------------------------
# parse_mesh


@pytest.mark.parametrize("text,want", [
    (None, (8, 1)), ("", (8, 1)), ("data=4,model=2", (4, 2)), ("model=2, data=4", (4, 2)),
    ("data=-1,model=4", (2, 4)), ("data=1,model=-1", (1, 8)), ("model=8", (1, 8)), ("data=2", (2, 4)),
    ("data=8,model=1", (8, 1)),
])
def test_parse_mesh(text, want):
    assert parse_mesh(text, 8) == {"data": want[0], "model": want[1]}


@pytest.mark.parametrize("text,match", [
    ("data=3,model=2", "6 devices, but there are 8"), ("data=4,model=4", "16 devices"),
    ("data=3", "3 does not divide the 8 devices"), ("batch=8", "unknown axis 'batch'"),
    ("data=x", "not an integer"), ("data=0,model=8", ">= 1 or -1"), ("data=-2", ">= 1 or -1"),
    ("data=-1,model=-1", "at most one axis"), ("data=4,data=2", "given twice"), ("data:4", "not AXIS=SIZE"),
    ("data=4,,model=2", "empty entry"),
])
def test_parse_mesh_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_mesh(text, 8)


def test_make_mesh_one_device():
    mesh = sharding.make_mesh(None)
    assert mesh.axis_names == AXES and dict(mesh.shape) == {"data": 1, "model": 1}
    assert sharding.make_mesh({"data": 1, "model": 1}).shape == mesh.shape
    assert sharding.batch_multiple(mesh) == 1 and sharding.batch_multiple(None) == 1
    assert sharding.host_share(list(range(5))) == list(range(5))
    assert sharding.gather_to_host0([{"a": 1}]) == [{"a": 1}]
    assert list(sharding.agree_max([3, 4])) == [3, 4]


# ----------------------------------------------------------------------------------------------
# the rules table


def test_rules_table_is_one_table():
    names = {n for _, axes in PARAM_AXES for n in axes} | {n for axes in ACTIVATION_AXES.values() for n in axes}
    assert names <= set(LOGICAL_RULES), names - set(LOGICAL_RULES)
    assert set(LOGICAL_RULES.values()) <= set(AXES) | {None}
    # tensor parallelism over heads, MLP width and vocabulary; data parallelism over the batch
    assert {k: LOGICAL_RULES[k] for k in ("batch", "heads", "kv_heads", "mlp", "vocab", "embed")} == \
        {"batch": "data", "heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model", "embed": None}


def _abstract_pure(build):
    import jax
    from flax import nnx

    from affjax.models.layers import abstract_module

    pure = nnx.to_pure_dict(nnx.state(abstract_module(build)))
    return {tuple(getattr(k, "key", k) for k in p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(pure)[0]}


@pytest.fixture(scope="module")
def qwen2_audio_7b():
    from affjax.models.qwen2_audio.modeling import Qwen2Audio, Qwen2AudioConfig
    from affjax.runtime.plan import QWEN2_AUDIO_7B_CONFIG

    hf = copy.deepcopy(QWEN2_AUDIO_7B_CONFIG)  # the 7B widths and head counts, 2 layers each (faster)
    hf["audio_config"]["encoder_layers"] = hf["text_config"]["num_hidden_layers"] = 2
    cfg = Qwen2AudioConfig.from_hf(hf)
    return cfg, _abstract_pure(lambda rngs: Qwen2Audio(cfg, rngs=rngs))


def test_qwen2_audio_7b_param_specs(qwen2_audio_7b):
    cfg, shapes = qwen2_audio_7b
    m8, m4 = AbstractMesh((1, 8), AXES), AbstractMesh((2, 4), AXES)
    lm = ("language_model", "layers", 0)
    want8 = {
        lm + ("self_attn", "q_proj", "kernel"): P(None, "model"), lm + ("self_attn", "q_proj", "bias"): P("model"),
        lm + ("self_attn", "k_proj", "kernel"): P(None, "model"), lm + ("self_attn", "v_proj", "bias"): P("model"),
        lm + ("self_attn", "o_proj", "kernel"): P("model"),
        lm + ("mlp", "gate_proj", "kernel"): P(None, "model"), lm + ("mlp", "up_proj", "kernel"): P(None, "model"),
        lm + ("mlp", "down_proj", "kernel"): P("model"),
        lm + ("input_layernorm", "scale"): P(),
        ("language_model", "embed_tokens"): P("model"), ("language_model", "lm_head"): P("model"),
        ("language_model", "norm", "scale"): P(),
        # the audio encoder's 20 heads do not divide 8: its attention stays whole on every chip
        ("audio_tower", "layers", 0, "q_proj", "kernel"): P(), ("audio_tower", "layers", 0, "out_proj", "kernel"): P(),
        ("audio_tower", "layers", 0, "fc1", "kernel"): P(None, "model"),
        ("audio_tower", "layers", 0, "fc1", "bias"): P("model"),
        ("audio_tower", "layers", 0, "fc2", "kernel"): P("model"), ("audio_tower", "layers", 0, "fc2", "bias"): P(),
        ("audio_tower", "conv1", "kernel"): P(), ("audio_tower", "embed_positions"): P(),
        ("multi_modal_projector", "kernel"): P(),
    }
    for path, spec in want8.items():
        assert param_spec(path, shapes[path], m8, cfg) == spec, path
    # 20 heads divide 4; without the config only the dimension (1280) is checked
    path = ("audio_tower", "layers", 0, "q_proj", "kernel")
    assert param_spec(path, shapes[path], m4, cfg) == P(None, "model")
    assert param_spec(path, shapes[path], m8) == P(None, "model")
    # every attention / MLP matrix and the vocabulary tables are sharded at model=4
    matrices = [p for p in shapes if p[-1] == "kernel" and p[-2] not in ("conv1", "conv2") and
                p[0] != "multi_modal_projector"] + [("language_model", "embed_tokens"), ("language_model", "lm_head")]
    assert matrices and all("model" in param_spec(p, shapes[p], m4, cfg) for p in matrices)


def test_not_divisible_is_replicated():
    m8 = AbstractMesh((1, 8), AXES)
    assert param_spec(("language_model", "embed_tokens"), (100, 16), m8) == P()  # 100 rows, 8 chips
    assert param_spec(("language_model", "embed_tokens"), (104, 16), m8) == P("model")
    # a head count that does not divide, although the width does
    from affjax.models.qwen2.modeling import TextConfig
    cfg = TextConfig(heads=8, kv_heads=2, head_dim=8, hidden=64)
    k = ("layers", 0, "self_attn", "k_proj", "kernel")
    assert param_spec(k, (64, 16), m8, cfg) == P() and param_spec(k, (64, 16), m8) == P(None, "model")
    cache = ("batch", "length", "kv_heads", "head_dim")
    assert sharding.logical_spec(cache, (8, 4, 2, 8), AbstractMesh((2, 4), AXES)) == P("data")
    assert sharding.logical_spec(("batch", "vocab"), (3, 8), AbstractMesh((2, 4), AXES)) == P(None, "model")


def test_whisper_param_specs():
    from affjax.models.whisper.modeling import EncoderConfig, Whisper, WhisperConfig

    cfg = WhisperConfig(encoder=EncoderConfig(num_mel_bins=8, d_model=64, layers=1, heads=8, ffn_dim=128,
                                              max_source_positions=10),
                        vocab_size=51865, decoder_layers=1, decoder_heads=4, decoder_ffn_dim=128)
    shapes = _abstract_pure(lambda rngs: Whisper(cfg, rngs=rngs))
    m8 = AbstractMesh((1, 8), AXES)
    want = {("encoder", "layers", 0, "q_proj", "kernel"): P(None, "model"),
            ("encoder", "layers", 0, "fc1", "kernel"): P(None, "model"),
            ("decoder", "layers", 0, "self_attn", "q_proj", "kernel"): P(),  # 4 decoder heads
            ("decoder", "layers", 0, "encoder_attn", "out_proj", "kernel"): P(),
            ("decoder", "layers", 0, "fc2", "kernel"): P("model"),
            ("decoder", "embed_tokens"): P(),  # 51865 rows do not divide 8
            ("decoder", "embed_positions"): P()}
    for path, spec in want.items():
        assert param_spec(path, shapes[path], m8, cfg) == spec, path
    m4 = AbstractMesh((2, 4), AXES)
    assert param_spec(("decoder", "layers", 0, "self_attn", "q_proj", "kernel"),
                      shapes[("decoder", "layers", 0, "self_attn", "q_proj", "kernel")], m4, cfg) == P(None, "model")
    assert param_axes("decoder/layers/0/encoder_attn/k_proj/kernel") == ("embed", "kv_heads")


def test_initialize_distributed_is_a_no_op_alone(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "AFFJAX_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    said = []
    assert sharding.initialize_distributed(log_fn=said.append) is False
    assert said and "single process" in said[0]
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0")  # one host: still single process
    assert sharding._launched_multiprocess() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert sharding._launched_multiprocess() == "TPU_WORKER_HOSTNAMES"


# ----------------------------------------------------------------------------------------------
# the Engine on 8 fake devices and on 2 processes


@pytest.fixture(scope="module")
def shard_ckpt(tmp_path_factory):
    need_qwen2_tokenizer()
    from affjax.models.checkpoint import convert
    from affjax.testing import make_tiny_qwen2_audio

    src = make_tiny_qwen2_audio(tmp_path_factory.mktemp("hf_shard"), audio_d=64, audio_layers=1, audio_heads=8,
                                audio_ffn=128, text_hidden=64, text_layers=3, heads=8, kv_heads=4, intermediate=128,
                                max_source_positions=200, seed=3)
    # 4 s feature windows (400 mel frames, 200 encoder positions) instead of 30 s: a faster encoder
    p = src / "processor_config.json"
    c = json.loads(p.read_text())
    c["feature_extractor"].update(chunk_length=4, n_samples=4 * 16000, nb_max_frames=400)
    p.write_text(json.dumps(c, indent=2))
    return convert(src, tmp_path_factory.mktemp("ck_shard") / "ckpt", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(shard_ckpt, tmp_path_factory):
    """All subprocesses at once: reference + meshes in two processes of 8 devices, and 2 processes
    of 4 devices (jax.distributed). -> {name: result dict}."""
    sys.path.insert(0, str(HERE))
    import sharding_check

    out = tmp_path_factory.mktemp("sharding_runs")
    sharding_check.write_items(shard_ckpt, out / "items.pkl")
    manifest = sharding_check.write_manifest(out)
    eval_manifest = sharding_check.write_eval_manifest(out)
    common = [str(HERE / "sharding_check.py"), str(shard_ckpt)]
    items = ["--items", str(out / "items.pkl")]
    port = _free_port()
    jobs = {
        # Each mesh runs the settings that exercise it (MESH_SETTINGS): the reference, pure model
        # parallelism, and `affjax eval` on one device (the reference of the
        # eval runs under a mesh and on 2 processes) in one process of 8 devices ...
        "a": (8, [*common, str(out / "a.json"), *items, "--reference",
                  "--meshes", f"{MESHES[1]}:{','.join(MESH_SETTINGS[MESHES[1]])}",
                  "--eval", eval_manifest, str(out / "eval-one"), "none"]),
        # ... both axes, a one-device model placed by the Engine, `affjax score --mesh` and
        # `affjax eval --mesh` in another ...
        "b": (8, [*common, str(out / "b.json"), *items, "--replace", "--meshes",
                  f"{MESHES[0]}:{','.join(MESH_SETTINGS[MESHES[0]])}",
                  "--job", manifest, str(out / "job.jsonl"), "data=2,model=4",
                  "--eval", eval_manifest, str(out / "eval-mesh"), "data=2,model=4"]),
        # ... and two processes: the bucketed pooled setting (host reads of every process's stage counts)
        **{f"mp{i}": (4, [*common, str(out / "mp.json"), *items, "--meshes", "data=4,model=2", "--settings",
                          "bucketed-proportional", "--multiprocess", str(port), str(i), "2",
                          "--eval", eval_manifest, str(out / "eval-mp"), "data=4,model=2"]) for i in range(2)},
    }
    procs = {}
    for name, (n_dev, args) in jobs.items():
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev} {FAST_COMPILE}",
                   JAX_PLATFORMS="cpu", PYTHONPATH=str(HERE.parent))
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + 900  # generous: the suite runs another module beside it
    failed = []
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(f"{name} ({rc}):\n" + (out / f"{name}.log").read_text()[-3000:])
    assert not failed, "\n\n".join(failed)
    res = {k: json.loads((out / f"{k}.json").read_text()) for k in ("a", "b", "mp")}
    evals = {k: {"summary": res[r]["eval"],
                 "rows": [json.loads(line) for line in (out / k / "results.jsonl").read_text().splitlines()]}
             for k, r in (("eval-one", "a"), ("eval-mesh", "b"), ("eval-mp", "mp"))}
    job = [json.loads(line) for line in (out / "job.jsonl").read_text().splitlines()]
    return {"reference": res["a"]["reference"], "meshes": {**res["a"]["meshes"], **res["b"]["meshes"]},
            "job": {**res["b"]["job"], "rows": job},
            "multiprocess": res["mp"]["meshes"]["data=4,model=2"], "seconds": {k: r["seconds"] for k, r in res.items()},
            "eval": evals}


def _same_as_reference(ref, got, where, settings=SETTINGS):
    for s in settings:
        r, g = ref[s], got[s]
        assert np.abs(np.asarray(r["logprobs"]) - np.asarray(g["logprobs"])).max() <= 1e-5, (where, s)
        assert r["tokens"] == g["tokens"], (where, s)
        assert all(len(t) > 0 for t in g["tokens"])


@pytest.mark.slow
def test_reference_pools_part_of_the_audio(runs):
    ref = runs["reference"]
    assert len(ref["none"]["logprobs"]) == 5 and "audio_score" not in ref["none"]
    full = [25, 62, 75, 37, 50]  # audio tokens of the 1 .. 3 s clips
    for s in ("bucketed-proportional", "fixed"):
        first, second = ref[s]["audio_score"]
        assert all(0 < b < a < f for a, b, f in zip(first, second, full)), (s, first, second)
    assert ref["fixed"]["audio_score"][1] != ref["bucketed-proportional"]["audio_score"][1]  # the cap binds
    assert ref["bucketed-proportional"]["logprobs"] != ref["none"]["logprobs"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.slow
def test_mesh_matches_one_device(runs, mesh):
    got = runs["meshes"][mesh]
    settings = [s for s in SETTINGS if s in got]
    assert settings == list(MESH_SETTINGS[mesh])
    _same_as_reference(runs["reference"], got, mesh, settings)
    # activations where the rules put them: rows over data, KV heads over model when 4 divides
    # (JAX drops size-1 mesh axes from the specs it reports)
    model = int(mesh.split("model=")[1])
    data = "data" if model < 8 else None
    place = got[settings[0]]["placement"]  # the first setting's prefill
    assert place["rows"] == ([data] if data else [])
    assert place["kv_cache"] == ([data, None, "model"] if model in (2, 4) else [data] if data else [])
    for s in set(settings) - {"none"}:
        assert got[s]["audio_score"] == runs["reference"][s]["audio_score"]
        assert got[s]["audio_generate"] == runs["reference"][s]["audio_generate"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.slow
def test_parameters_restored_onto_their_shards(runs, mesh, shard_ckpt):
    facts = runs["meshes"][mesh]["params"]
    model = int(mesh.split("model=")[1])
    assert facts["mesh_devices"] == 8 and facts["leaves_as_rules"] == facts["leaves"]
    q, k, emb = facts["q_proj"], facts["k_proj"], facts["embed_tokens"]
    assert q["devices"] == 8 and q["shard_shape"] == [64, 64 // model]
    assert emb["shard_shape"] == [151672 // model, 64] and facts["lm_head"]["shard_shape"] == [151672 // model, 64]
    assert facts["down_proj"]["shard_shape"] == [128 // model, 64]
    assert facts["audio_fc1"]["shard_shape"] == [64, 128 // model]
    assert facts["audio_q_proj"]["shard_shape"] == [64, 64 // model]
    assert facts["norm"]["spec"] == [] and facts["norm"]["shard_shape"] == [64]
    if model > 1:
        assert q["spec"] == [None, "model"] and facts["o_proj"]["spec"] == ["model"] and emb["spec"] == ["model"]
        assert facts["leaves_sharded"] > 20
    # 4 KV heads: sharded on 2 and 4 chips, whole on 8
    assert k["shard_shape"] == ([64, 32] if model == 8 else [64, 32 // model])
    # `affjax plan` counts what a chip really holds
    from affjax.runtime.plan import param_bytes_per_chip

    hf = json.loads((shard_ckpt / "config.json").read_text())
    assert facts["bytes_on_first_device"] == param_bytes_per_chip(hf, model=model, dtype_bytes=4)


@pytest.mark.slow
def test_engine_places_a_one_device_model(runs):
    got = runs["meshes"]["data=4,model=2"]
    assert got["replaced_q_spec"] == [None, "model"]
    assert np.abs(np.asarray(got["replaced_logprobs"]) - runs["reference"]["none"]["logprobs"]).max() <= 1e-5


@pytest.mark.slow
def test_two_processes_match_one_device(runs):
    got = runs["multiprocess"]
    _same_as_reference(runs["reference"], got, "2 processes x 4 devices", ["bucketed-proportional"])
    assert got["params"]["q_proj"]["shard_shape"] == [64, 32]


@pytest.mark.slow
def test_score_job_with_mesh_option(runs):
    """`affjax score --mesh data=2,model=4 --batch-size 3`: batches padded to 4 rows, same scores."""
    job = runs["job"]
    assert job["rc"] == 0, job["summary"]
    assert job["summary"]["mesh"] == "data=2,model=4" and job["summary"]["ok"] == 5
    assert [r["id"] for r in job["rows"]] == [f"item{i}" for i in range(5)]
    got = np.asarray([r["logprob"] for r in job["rows"]])
    assert np.abs(got - runs["reference"]["none"]["logprobs"]).max() <= 1e-5


@pytest.mark.slow
def test_eval_under_a_mesh_and_on_two_processes(runs):
    """`affjax eval --task qa --mesh ...` (choices scored, open answers generated, pooled): a mesh in
    one process (two-pass scheduling) and 2 processes x 4 devices (each its share, in order, process
    0 merging) give the one-device rows: choice log-likelihoods within 1e-5, the same tokens."""
    ev = runs["eval"]
    one = ev["eval-one"]
    assert one["summary"]["schedule"] == "two-pass" and one["summary"]["ok"] == 5
    assert ev["eval-mesh"]["summary"]["mesh"] == "data=2,model=4"
    assert ev["eval-mp"]["summary"]["processes"] == 2 and ev["eval-mp"]["summary"]["schedule"] == "in-order"
    for name in ("eval-mesh", "eval-mp"):
        got = ev[name]["rows"]
        assert [r["id"] for r in got] == [r["id"] for r in one["rows"]] == [f"e{i}" for i in range(5)], name
        for r, g in zip(one["rows"], got):
            if "choice_logprobs" in r:
                assert np.abs(np.asarray(r["choice_logprobs"]) - g["choice_logprobs"]).max() <= 1e-5, name
            else:
                assert r["tokens"] == g["tokens"] and len(r["tokens"]) > 0, name
            assert r["audio_tokens"] == g["audio_tokens"], name
