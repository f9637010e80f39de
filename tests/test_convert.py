"""Hugging Face Qwen2-Audio -> affjax checkpoint conversion (affjax.models.checkpoint, checkpoints_convert/).

Every source checkpoint is a tiny randomly initialised transformers model written with
save_pretrained, built here; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import need_module
torch = need_module("torch")
transformers = need_module("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from affjax.models.checkpoint import (  # noqa: E402
    CONFIG_NAME, MODELS, ConversionError, ModelSpec, convert, get_spec, load, load_hf_model, register,
)
from affjax.models.weights import TRANSFORMS, WeightError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "checkpoints_convert" / "convert.py"
MEL, FRAMES = 16, 40  # tiny audio tower: 16 mel bins, max_source_positions 20 -> 40 mel frames
VOCAB = 96

torch.set_num_threads(1)


def tiny_config(*, kv_heads: int = 4, tie: bool = False):
    from transformers import Qwen2AudioConfig

    return Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=MEL, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=64, max_source_positions=FRAMES // 2),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                         tie_word_embeddings=tie),
        audio_token_id=VOCAB - 1)


def make_hf(path: Path, *, seed: int = 0, dtype=torch.float32, save=True, **cfg_kw):
    """Random Qwen2-Audio (every weight perturbed, so no layer norm is all ones) saved to `path`."""
    from transformers import Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(tiny_config(**cfg_kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = model.to(dtype)
    if save:
        model.save_pretrained(path)
    return model


def in_memory_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def flat_params(model) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def check_exact(model, hf_state: dict[str, np.ndarray], *, skip=()):
    """Every affjax parameter equals its torch tensor through the key table, and none is left out."""
    table = get_spec("qwen2_audio").table()
    flat = flat_params(model)
    seen = set()
    for key, w in hf_state.items():
        if key in skip:
            continue
        path, transform = table.lookup(key)
        assert path in flat, key
        np.testing.assert_array_equal(flat[path].astype(np.float32), TRANSFORMS[transform](w), err_msg=key)
        seen.add(path)
    assert seen == set(flat), set(flat) - seen


def assert_nothing_at(dst: Path):
    assert not dst.exists(), f"{dst} was left behind"
    assert not list(dst.parent.glob(f".{dst.name}.*")), "temporary directory left behind"


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def edit_safetensors(src: Path, dst: Path, edit) -> None:
    """Copy an HF directory and rewrite its model.safetensors through edit(dict) -> dict."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(dst / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def plain(work):
    """(HF dir, torch model) of an untied multi-head-attention model."""
    model = make_hf(work / "plain")
    return work / "plain", model


@pytest.fixture(scope="module")
def converted(plain, work):
    """The plain model converted once through the CLI (subprocess)."""
    dst = work / "plain-ckpt"
    r = run_cli("--src", plain[0], "--dst", dst)
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout
    return dst


# ------------------------------------------------------------------------------- round trips


def forward_parity(model, hf, *, atol=1e-4):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, MEL, FRAMES)).astype(np.float32)
    with torch.no_grad():
        ref_audio = hf.model.multi_modal_projector(hf.model.audio_tower(torch.from_numpy(feats)).last_hidden_state)
    got_audio = model.encode_audio(jnp.asarray(feats), jnp.asarray([FRAMES, FRAMES]))
    np.testing.assert_allclose(np.asarray(got_audio), ref_audio.numpy(), atol=atol, rtol=0)

    ids = rng.integers(0, VOCAB - 1, (2, 7))
    with torch.no_grad():
        ref_logits = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(2, 7, dtype=torch.long)).logits
    got_logits = model.language_model(jnp.asarray(ids), jnp.ones((2, 7), bool))
    np.testing.assert_allclose(np.asarray(got_logits), ref_logits.numpy(), atol=atol, rtol=0)


def test_cli_round_trip_exact_and_forward(plain, converted):
    src, hf = plain
    meta = json.loads((converted / CONFIG_NAME).read_text())
    assert meta["model_type"] == "qwen2_audio" and meta["dtype"] == "float32"
    assert meta["converted_from"] == "plain"  # basename only
    assert meta["hf_config"] == json.loads((src / "config.json").read_text())
    assert (converted / "config.json").is_file() and (converted / "generation_config.json").is_file()
    model, cfg, _ = load(converted)
    assert cfg.text.kv_heads == 4 and model.language_model.lm_head is not None
    check_exact(model, in_memory_state(hf))
    forward_parity(model, hf)


def test_sharded_checkpoint_converts_identically(plain, converted, work):
    src, hf = plain
    sharded = work / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    out = convert(sharded, work / "sharded-ckpt", progress=False)
    a, b = flat_params(load(out)[0]), flat_params(load(converted)[0])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_tied_embeddings_without_lm_head(work):
    hf = make_hf(work / "tied-full", seed=1, tie=True)
    # transformers 5.24 still writes lm_head for Qwen2-Audio; a tied checkpoint lacks it.
    edit_safetensors(work / "tied-full", work / "tied",
                     lambda t: {k: v for k, v in t.items() if "lm_head" not in k})
    model, cfg, _ = load(convert(work / "tied", work / "tied-ckpt", progress=False))
    assert cfg.text.tie_embeddings and model.language_model.lm_head is None
    with torch.no_grad():  # the tied reference: lm_head is the embedding matrix
        hf.lm_head.weight.copy_(hf.model.language_model.embed_tokens.weight)
    check_exact(model, in_memory_state(hf), skip={"lm_head.weight"})
    forward_parity(model, hf)


def test_tied_config_lm_head_equal_is_accepted_different_is_refused(work):
    make_hf(work / "tied2-full", seed=2, tie=True)

    def same(t):
        t["language_model.lm_head.weight"] = t["language_model.model.embed_tokens.weight"].copy()
        return t

    edit_safetensors(work / "tied2-full", work / "tied2-same", same)
    convert(work / "tied2-same", work / "tied2-same-ckpt", progress=False)
    dst = work / "tied2-diff-ckpt"
    with pytest.raises(WeightError, match="tie"):
        convert(work / "tied2-full", dst, progress=False)  # random lm_head != embeddings
    assert_nothing_at(dst)


def test_gqa(work):
    hf = make_hf(work / "gqa", seed=3, kv_heads=2)
    model, cfg, _ = load_hf_model(work / "gqa")  # convert into a temporary directory and load
    assert (cfg.text.heads, cfg.text.kv_heads) == (4, 2)
    check_exact(model, in_memory_state(hf))
    forward_parity(model, hf)


def test_bfloat16(plain, converted, work):
    src, hf = plain
    ref = flat_params(load(converted)[0])
    out = convert(src, work / "bf16-ckpt", dtype="bfloat16", progress=False)
    assert json.loads((out / CONFIG_NAME).read_text())["dtype"] == "bfloat16"
    model, _, _ = load(out)
    got = flat_params(model)
    assert {v.dtype for v in got.values()} == {jnp.dtype(jnp.bfloat16)}
    for k, v in got.items():
        np.testing.assert_array_equal(v, ref[k].astype(jnp.bfloat16))
    # a float32 checkpoint restores as bfloat16, and back
    down = flat_params(load(converted, dtype=jnp.bfloat16)[0])
    assert {v.dtype for v in down.values()} == {jnp.dtype(jnp.bfloat16)}
    up = flat_params(load(out, dtype="float32")[0])
    assert {v.dtype for v in up.values()} == {np.dtype(np.float32)}


def test_bfloat16_source_file(work):
    hf = make_hf(work / "bf16-src", seed=4, dtype=torch.bfloat16)
    raw = (work / "bf16-src" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    model, _, _ = load(convert(work / "bf16-src", work / "bf16-src-ckpt", progress=False))
    check_exact(model, in_memory_state(hf))  # bf16 -> float32 is exact


def test_load_with_sharding_function(converted):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    seen = []
    model, _, _ = load(converted, sharding=lambda path, leaf: seen.append(path) or dev)
    assert ("language_model", "embed_tokens") in seen
    assert model.language_model.embed_tokens[...].sharding == dev


def test_pytorch_bin_source(plain, converted, work):
    src, _ = plain
    binsrc = work / "bin"
    binsrc.mkdir()
    shutil.copy(src / "config.json", binsrc / "config.json")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(src / "model.safetensors").items()},
               binsrc / "pytorch_model.bin")
    a = flat_params(load(convert(binsrc, work / "bin-ckpt", progress=False))[0])
    b = flat_params(load(converted)[0])
    for k in b:
        np.testing.assert_array_equal(a[k], b[k])


def test_tokenizer_and_processor_files_copied(plain, work):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoProcessor, PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

    src = work / "with-processor"
    shutil.copytree(plain[0], src)
    words = ["[UNK]", "hello", "world", "<|endoftext|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": words[4:]})
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=MEL), tokenizer=tok).save_pretrained(src)
    WhisperFeatureExtractor(feature_size=MEL).save_pretrained(src)  # also the older preprocessor_config.json

    dst = convert(src, work / "with-processor-ckpt", progress=False)
    names = {p.name for p in src.iterdir()} - {"model.safetensors"}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"} <= names
    for name in names:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    proc = AutoProcessor.from_pretrained(dst)
    assert type(proc).__name__ == "Qwen2AudioProcessor"
    assert proc.tokenizer("hello <|AUDIO|> world").input_ids == [1, 4, 2]
    assert proc.feature_extractor.feature_size == MEL


# ------------------------------------------------------------------------------- errors


def test_cli_missing_tensor_fails_cleanly(plain, work):
    bad = work / "missing"
    edit_safetensors(plain[0], bad, lambda t: {k: v for k, v in t.items()
                                               if k != "language_model.model.layers.1.mlp.up_proj.weight"})
    dst = work / "out" / "missing-ckpt"
    r = run_cli("--src", bad, "--dst", dst)
    assert r.returncode != 0
    assert any(line.startswith("error: ") for line in r.stderr.splitlines()), r.stderr
    assert "language_model.layers.1.mlp.up_proj.kernel" in r.stderr
    assert "missing" in r.stderr
    assert_nothing_at(dst)


@pytest.mark.parametrize("problem", ["extra", "shape", "duplicate"])
def test_extra_tensor_and_wrong_shape(plain, work, problem):
    def edit(t):
        if problem == "extra":
            t["language_model.model.layers.0.mlp.surprise.weight"] = np.zeros(3, np.float32)
        elif problem == "shape":
            t["audio_tower.layers.0.fc1.weight"] = np.zeros((65, 32), np.float32)
        else:  # the transformers >= 5 in-memory name of a tensor the file already has
            t["model.audio_tower.conv1.bias"] = t["audio_tower.conv1.bias"]
        return t

    bad = work / f"bad-{problem}"
    edit_safetensors(plain[0], bad, edit)
    dst = work / f"bad-{problem}-ckpt"
    with pytest.raises(WeightError) as e:
        convert(bad, dst, progress=False)
    msg = str(e.value)
    if problem == "extra":
        assert "unused" in msg and "language_model.model.layers.0.mlp.surprise.weight" in msg
    elif problem == "shape":
        assert "wrong shape" in msg and "audio_tower.layers.0.fc1.weight" in msg and "(65, 32)" in msg
    else:
        assert "already filled" in msg and "audio_tower.conv1.bias" in msg
    assert_nothing_at(dst)


def test_all_problems_in_one_message(plain, work):
    def edit(t):
        del t["multi_modal_projector.linear.bias"]
        t["bogus.weight"] = np.ones(2, np.float32)
        t["language_model.model.norm.weight"] = np.ones(33, np.float32)
        return t

    bad = work / "bad-all"
    edit_safetensors(plain[0], bad, edit)
    dst = work / "bad-all-ckpt"
    with pytest.raises(WeightError) as e:
        convert(bad, dst, progress=False)
    msg = str(e.value)
    assert "1 missing" in msg and "multi_modal_projector.bias" in msg
    assert "1 unused" in msg and "bogus.weight" in msg
    assert "1 with wrong shape" in msg and "language_model.model.norm.weight" in msg
    assert_nothing_at(dst)


def test_truncated_safetensors(plain, work):
    bad = work / "truncated"
    shutil.copytree(plain[0], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-1000])
    dst = work / "truncated-ckpt"
    with pytest.raises(ConversionError, match=r"model\.safetensors.*(truncated|corrupt)"):
        convert(bad, dst, progress=False)
    assert_nothing_at(dst)


def test_truncated_shard_is_named(plain, work):
    bad = work / "truncated-shard"
    plain[1].save_pretrained(bad, max_shard_size="20KB")
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    dst = work / "truncated-shard-ckpt"
    with pytest.raises(ConversionError, match=shard.name):
        convert(bad, dst, progress=False)
    assert_nothing_at(dst)


def test_unknown_model_type(plain, work):
    bad = work / "unknown"
    shutil.copytree(plain[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mystery_lm"
    (bad / "config.json").write_text(json.dumps(cfg))
    dst = work / "unknown-ckpt"
    with pytest.raises(ConversionError) as e:
        convert(bad, dst, progress=False)
    assert "mystery_lm" in str(e.value) and "qwen2_audio" in str(e.value)
    assert_nothing_at(dst)


def test_existing_destination(plain, work):
    src = plain[0]
    dst = work / "existing"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(ConversionError, match="overwrite"):
        convert(src, dst, progress=False)
    assert (dst / "keep.txt").read_text() == "old"
    # a failing conversion with overwrite leaves the old directory as it was
    bad = work / "missing-cfg"
    bad.mkdir()
    shutil.copy(src / "config.json", bad / "config.json")
    with pytest.raises(ConversionError, match="no weights"):
        convert(bad, dst, overwrite=True, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert not list(work.glob(".existing.*"))
    convert(src, dst, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / CONFIG_NAME).is_file()
    # an empty existing directory is fine without overwrite
    empty = work / "empty"
    empty.mkdir()
    convert(src, empty, progress=False)
    assert (empty / CONFIG_NAME).is_file()


# ------------------------------------------------------------------ temporary directories

SLOW_WRITER = """
import sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/checkpoints_convert"]
import affjax.models.checkpoint as ck
def slow(state, path):
    path.mkdir(parents=True)
    (path / "partial").write_bytes(bytes(4096))
    print("WRITING", flush=True)
    time.sleep(300)
ck.save_params = slow
import convert
sys.exit(convert.main(["--src", sys.argv[2], "--dst", sys.argv[3], "--quiet"]))
"""


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def fake_temp(path: Path, nbytes: int = 3000) -> Path:
    (path / "params").mkdir(parents=True)
    (path / "params" / "chunk").write_bytes(bytes(nbytes))
    return path


def test_stale_temp_of_same_destination_is_removed_and_logged(plain, work):
    """A killed run's `.DST.tmp-*` (up to a full model) is removed by the next conversion to DST."""
    from affjax.models.checkpoint import _host_tag

    dst = work / "stale-ckpt"
    stale = fake_temp(work / f".stale-ckpt.tmp-{_host_tag()}-{dead_pid()}-abcd1234")
    legacy = fake_temp(work / ".stale-ckpt.tmp-k3j9x_2q")  # name of a converter without host/pid
    r = run_cli("--src", plain[0], "--dst", dst)
    assert r.returncode == 0, r.stderr
    assert (dst / CONFIG_NAME).is_file()
    assert not stale.exists() and not legacy.exists()
    assert not list(work.glob(".stale-ckpt.*")), "temporary directory left behind"
    removed = [line for line in r.stderr.splitlines() if line.startswith("removed ")]
    for d in (stale, legacy):
        assert [line for line in removed if str(d) in line and "2.9 KiB" in line], r.stderr


def test_failing_writer_leaves_no_temp(plain, work, monkeypatch):
    """An exception midway, after part of the checkpoint is written, removes the temp folder."""
    import affjax.models.checkpoint as ck

    seen = []

    def broken(state, path):
        path.mkdir(parents=True)
        (path / "partial").write_bytes(bytes(4096))
        seen.append(path.parent)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_params", broken)
    dst = work / "broken-writer-ckpt"
    with pytest.raises(OSError, match="No space left"):
        convert(plain[0], dst, progress=False)
    assert seen and seen[0].name.startswith(".broken-writer-ckpt.tmp-")
    assert_nothing_at(dst)


def test_sigterm_leaves_no_temp(plain, work, tmp_path):
    """`kill` (SIGTERM) of a running CLI conversion still removes its temp folder."""
    import select
    import signal

    dst = work / "sigterm-ckpt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(ROOT), str(plain[0]), str(dst)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready and proc.stdout.readline().strip() == "WRITING", (tmp_path / "stderr").read_text()
            temps = list(work.glob(".sigterm-ckpt.tmp-*"))
            assert len(temps) == 1 and (temps[0] / "params" / "partial").is_file()
            assert temps[0].name.split("-")[-2] == str(proc.pid)  # the temp name carries the writer's pid
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 1 and "error: interrupted (SIGTERM)" in stderr, stderr
    assert_nothing_at(dst)


def test_temps_of_other_destinations_and_live_runs_survive(plain, work, caplog):
    from affjax.models.checkpoint import _host_tag

    host = _host_tag()
    dst = work / "keep"
    other = fake_temp(work / f".keep2.tmp-{host}-{dead_pid()}-abcd1234")  # another destination
    other_legacy = fake_temp(work / ".keeper.tmp-k3j9x_2q")
    foreign = fake_temp(work / f".keep.tmp-{host}x-{dead_pid()}-abcd1234")  # another host's run
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        live = fake_temp(work / f".keep.tmp-{host}-{sleeper.pid}-abcd1234")  # a run still going
        with caplog.at_level("WARNING", logger="affjax.models.checkpoint"):
            convert(plain[0], dst, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (dst / CONFIG_NAME).is_file()
    for d in (other, other_legacy, foreign, live):
        assert (d / "params" / "chunk").is_file(), f"{d} was removed"
    assert not [r for r in caplog.records if r.getMessage().startswith("removed ")]
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("leaving ")]
    assert any(str(live) in m and str(sleeper.pid) in m for m in kept), kept
    assert any(str(foreign) in m for m in kept), kept
    # once the live run is gone, its folder is stale and the next conversion removes it
    shutil.rmtree(dst)
    convert(plain[0], dst, progress=False)
    assert not live.exists() and foreign.exists() and other.exists()


def test_registry_is_extensible():
    spec = MODELS["qwen2_audio"]
    with pytest.raises(ValueError, match="already registered"):
        register("qwen2_audio", spec)
    register("qwen2_audio_copy_for_test", ModelSpec(spec.config_from_hf, spec.model_class, spec.keys))
    try:
        assert get_spec("qwen2_audio_copy_for_test").table().lookup("lm_head.weight") is None  # no aliases
    finally:
        del MODELS["qwen2_audio_copy_for_test"]
