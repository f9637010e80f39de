"""affjax.train on a tiny random Qwen2-Audio checkpoint: the encoder cache equals the full-window
tower, a 4-item overfit, exact resume, the pooled loss's gradient against finite differences, LoRA
export against the adapter model, one step on 8 fake devices against one device, and option checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from affjax.train import data as tdata
from affjax.train.trainer import TrainConfig, Trainer, loss_fn

SR = 16000
TARGETS = ("alpha bravo", "charlie delta echo", "foxtrot", "golf hotel india juliet")
SECONDS = (1.2, 2.5, 0.8, 1.9)
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from affjax.testing import synth_speech_like

    d = tmp_path_factory.mktemp("train_data")
    with open(d / "train.jsonl", "w") as f:
        for i, (t, s) in enumerate(zip(TARGETS, SECONDS)):
            sf.write(str(d / f"c{i}.wav"), synth_speech_like(s, sr=SR, seed=40 + i), SR, subtype="FLOAT")
            f.write(json.dumps({"id": f"c{i}", "audio": f"c{i}.wav", "target": t}) + "\n")
    return d / "train.jsonl"


def _cfg(ckpt, manifest, out, **kw) -> TrainConfig:
    base = dict(ckpt=str(ckpt), manifest=str(manifest), out=str(out), steps=4, batch_size=4, lr=3e-3, warmup=1,
                lora_rank=4, save_every=1, log_every=1, cache_dir=str(Path(out).parent / "enc"), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _log(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_encoder_cache_equals_full_window(tiny_qwen2_audio_ckpt, manifest, tmp_path):
    """The cut window gives the full 30 s window's valid outputs (float16 storage)."""
    tr = Trainer(_cfg(tiny_qwen2_audio_ckpt, manifest, tmp_path / "run"), log=lambda *a: None)
    model = tr.model()
    from affjax.data.audio import load_audio
    for row in map(json.loads, Path(manifest).read_text().splitlines()):
        f, n = tr.cache.features(load_audio(Path(manifest).parent / row["audio"]))
        full = np.asarray(model.audio_tower(jnp.asarray(f[None]), jnp.asarray([n])))[0]
        cached = np.asarray(tr.cache.frames(row["id"]), np.float32)
        k = tdata.out_frames(tr.model_cfg, n)
        assert cached.shape == (k, model.cfg.audio.d_model) and k < full.shape[0]
        np.testing.assert_allclose(cached, full[:k], rtol=2e-3, atol=2e-3)
    # a second cache over the same folder finds every clip: nothing is encoded again
    again = tdata.EncoderCache(tr.cfg.cache_dir, model, tr.processor.feature_extractor)
    assert again.ensure([{"id": r, "audio": "missing.wav"} for r in ("c0", "c1", "c2", "c3")]) == {}


@pytest.mark.slow
def test_overfit_four_items(tiny_qwen2_audio_ckpt, manifest, tmp_path):
    # the random tiny model's final norm and head cap its logits near zero: train the decoder too
    # 40 steps (the schedule decays to zero at the last) take the loss from about 12 to about 0.8
    # nats per target token: the targets are mostly learnt (80 steps reach 0.05)
    cfg = _cfg(tiny_qwen2_audio_ckpt, manifest, tmp_path / "run", steps=40, lr=1e-2, warmup=5, save_every=40,
               trainable=("projector", "lm"))
    out = Trainer(cfg, log=lambda *a: None).fit()
    losses = _log(cfg.out)
    assert losses[1] > 5.0, losses[1]
    assert out["loss"] < 1.0 and out["loss"] < losses[1] / 10, \
        f"4-item overfit ended at loss {out['loss']:.4f} (from {losses[1]:.3f})"


def test_pooled_gradient_matches_finite_differences(tiny_qwen2_audio_ckpt, manifest, tmp_path):
    """d loss / d theta along a random direction of the trainable parameters, with an input stage
    and a deep stage merging tokens, against central differences of the loss."""
    cfg = _cfg(tiny_qwen2_audio_ckpt, manifest, tmp_path / "run", pooling="0:tau=0.8,window=1;1:tau=0.8,window=2",
               positions="mean", proportional=True)
    tr = Trainer(cfg, log=lambda *a: None)
    batch, taus = tr.batch_at(0)
    dev = tr._device(batch)

    @jax.jit
    def f(train):
        return loss_fn(train, tr.frozen, tr.graphdef, dev, jnp.asarray(taus), tr.static)[0]

    grads = jax.jit(jax.grad(f))(tr.train)
    leaves, treedef = jax.tree.flatten(tr.train)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * (jnp.std(x) + 1e-3) for k, x in zip(keys, leaves)])
    analytic = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v))))
    eps = 1e-2
    shift = lambda s: jax.tree.map(lambda x, d: x + s * d, tr.train, v)  # noqa: E731
    numeric = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
    assert abs(analytic - numeric) <= 2e-2 * abs(numeric) + 1e-4, (analytic, numeric)
    # the stages really merge (else this would test the unpooled forward)
    from affjax.runtime import engine as eng
    model = tr.model()
    x = model.embed_inputs(dev["ids"], model.multi_modal_projector(dev["audio"]),
                           jnp.arange(dev["ids"].size, dtype=jnp.int32).reshape(dev["ids"].shape))
    _, st = jax.jit(eng.pool_seq, static_argnums=(1, 2, 3, 4))(
        eng.start_seq(x, dev["valid"], dev["span"]), tr.pooling.stages[0], "mean", dev["ids"].shape[1], 1.0)
    assert int(st["audio_out"].sum()) < int(st["audio_in"].sum())


@pytest.mark.slow
def test_resume_is_exact_and_export_merges_lora(tiny_qwen2_audio_ckpt, manifest, tmp_path):
    """Kill and resume gives the same next losses; the finished run exports a merged checkpoint with the
    adapter model's logits, and its trained.safetensors rebuilds it (one training run for both)."""
    cfg = _cfg(tiny_qwen2_audio_ckpt, manifest, tmp_path / "whole", batch_size=2, steps=3, save_every=10)
    whole_trainer = Trainer(cfg, log=lambda *a: None)
    whole_trainer.fit()
    whole = _log(cfg.out)
    cut = _cfg(tiny_qwen2_audio_ckpt, manifest, tmp_path / "cut", batch_size=2, steps=3)
    tr = Trainer(cut, log=lambda *a: None)
    tr.run_step(0)  # one step, saved, then the process "dies"
    tr.step = 1
    tr.save()
    from affjax.train.carry import write_carry
    carry = write_carry(tr, tmp_path / "carry.safetensors")
    del tr
    msgs = []
    resumed = Trainer(cut, log=msgs.append)
    assert resumed.step == 1 and any("resumed" in m for m in msgs)
    resumed.fit()
    after = _log(cut.out)
    for s in (2, 3):  # step 3 starts the second epoch (2 batches of 2 items per epoch)
        assert abs(after[s] - whole[s]) <= 1e-6, (s, after[s], whole[s])
    # another setting on the same folder is refused
    with pytest.raises(ValueError, match="other settings"):
        Trainer(_cfg(tiny_qwen2_audio_ckpt, manifest, tmp_path / "cut", batch_size=2, lr=1e-2))
    _check_carry(tiny_qwen2_audio_ckpt, manifest, tmp_path, carry, whole)
    _check_export(whole_trainer, tmp_path)


def _check_carry(ckpt, manifest, tmp_path, carry, whole):
    """A new run folder started from the carry of step 1 (another machine) is at step 1 with the exact
    parameters, so its next loss is the unbroken run's; Adam's first moments restart at zero, so the
    loss after differs a little; a carry of other settings is refused."""
    msgs = []
    moved = Trainer(_cfg(ckpt, manifest, tmp_path / "moved", batch_size=2, steps=3, carry=str(carry)),
                    log=msgs.append)
    assert moved.step == 1 and any("from the carry" in m for m in msgs)
    moved.fit()
    after = _log(moved.cfg.out)
    assert abs(after[2] - whole[2]) <= 1e-6, (after[2], whole[2])
    assert 0 < abs(after[3] - whole[3]) <= 0.05 * abs(whole[3]), (after[3], whole[3])
    with pytest.raises(ValueError, match="other settings.*lr"):
        Trainer(_cfg(ckpt, manifest, tmp_path / "moved2", batch_size=2, steps=3, lr=1e-2, carry=str(carry)))


def _check_export(tr, tmp_path):
    from transformers import AutoProcessor

    from affjax.models import checkpoint
    from affjax.models.qwen2_audio import inputs
    from affjax.runtime.engine import hidden_states
    from affjax.testing import long_prompt, synth_speech_like
    from affjax.train.export import TRAINED_FILE, apply_trained, export_run
    from affjax.train.lslm import install

    cfg = tr.cfg
    out = export_run(cfg.out, tmp_path / "exported", log=lambda *a: None)
    merged, _, meta = checkpoint.load(out)
    assert meta["trained"]["step"] == cfg.steps

    proc = AutoProcessor.from_pretrained(str(out))
    enc = [inputs.encode(proc, long_prompt(30 + 20 * i, seed=i), [synth_speech_like(s, seed=i)])
           for i, s in enumerate((1.0, 2.2))]
    b = inputs.collate(enc, batch_size=2, audio_token_id=merged.cfg.audio_token_id,
                       out_frames_of=merged.cfg.audio.output_lengths)
    args = (b.ids, b.valid, b.span, b.audio_index, b.features, b.feature_lengths)

    def logits(m):
        h = jax.jit(hidden_states)(m, *map(jnp.asarray, args))
        return np.asarray(m.language_model.logits(h))[b.valid]

    adapter = logits(tr.model())
    np.testing.assert_allclose(logits(merged), adapter, atol=1e-4, rtol=1e-4)
    # the small trained file rebuilds the same checkpoint from the base
    trained = Path(cfg.out) / TRAINED_FILE
    again, _, _ = checkpoint.load(apply_trained(cfg.ckpt, trained, tmp_path / "again"))
    np.testing.assert_allclose(logits(again), adapter, atol=1e-4, rtol=1e-4)
    assert not np.allclose(logits(checkpoint.load(cfg.ckpt)[0]), adapter, atol=1e-3)  # training changed it

    # the adapters in a float16 file of their own (lslm-tiny's committed form): same model within
    # float16's rounding, and a changed adapters file is refused
    from affjax.train.export import write_trained
    split = write_trained(tr, tmp_path / "split.safetensors", adapters=tmp_path / "split-lora.safetensors")
    half, _, _ = checkpoint.load(apply_trained(cfg.ckpt, split, tmp_path / "half"))
    np.testing.assert_allclose(logits(half), adapter, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="beside"):
        write_trained(tr, tmp_path / "x.safetensors", adapters=tmp_path / "sub" / "x-lora.safetensors")
    from safetensors.numpy import load_file, save_file
    side = load_file(str(tmp_path / "split-lora.safetensors"))
    save_file({k: v * 2 for k, v in side.items()}, str(tmp_path / "split-lora.safetensors"))
    with pytest.raises(ValueError, match="SHA-256"):
        apply_trained(cfg.ckpt, split, tmp_path / "half2")
    (tmp_path / "split-lora.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapters file"):
        apply_trained(cfg.ckpt, split, tmp_path / "half3")

    # `--model lslm-tiny`'s install: base (here the tiny one, already in place) + weights, rebuilt only
    # when the weights file changes
    import shutil
    models = tmp_path / "models"
    shutil.copytree(cfg.ckpt, models / "lslm-tiny-base")
    msgs = []
    dst = install(models / "lslm-tiny", weights=trained, log=msgs.append)
    np.testing.assert_allclose(logits(checkpoint.load(dst)[0]), adapter, atol=1e-4, rtol=1e-4)
    assert install(models / "lslm-tiny", weights=trained, log=msgs.append) == dst and len(msgs) == 1, msgs
    from safetensors import safe_open
    other = tmp_path / "other.safetensors"
    with safe_open(str(trained), "np") as f:  # same tensors, another file: a new fingerprint
        save_file(load_file(str(trained)), str(other), metadata={**f.metadata(), "note": "a copy"})
    install(models / "lslm-tiny", weights=other, log=msgs.append)
    assert len(msgs) == 2, msgs
    with pytest.raises(FileNotFoundError, match="make lslm"):
        install(models / "lslm-tiny", weights=tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_step_on_eight_devices_equals_one(tiny_qwen2_audio_ckpt, manifest, tmp_path):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(HERE / "train_mesh_check.py"), str(tiny_qwen2_audio_ckpt), str(manifest),
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["devices"] == 8 and res["sharded_params"] > 0
    assert abs(res["loss_mesh"] - res["loss_one"]) <= 1e-5
    assert res["max_param_diff"] <= 1e-5, res


def test_lora_dot_equals_the_split_form():
    """The adapter product folded into the kernel under differentiation: the same output and the
    same gradients (input, A, B) as plain autodiff of x W + (x A) B, batched inputs, float32."""
    from affjax.train.lora import lora_dot

    k = jax.random.split(jax.random.key(1), 5)
    x, w = jax.random.normal(k[0], (3, 37, 24)), jax.random.normal(k[1], (24, 40))
    a, b = jax.random.normal(k[2], (24, 4)), jax.random.normal(k[3], (4, 40))
    g = jax.random.normal(k[4], (3, 37, 40))

    def split(x, w, a, b):
        return x @ w + (x @ a) @ b

    np.testing.assert_allclose(jax.jit(lora_dot)(x, w, a, b), split(x, w, a, b), rtol=1e-5, atol=1e-5)
    got = jax.jit(lambda *args: jax.vjp(lora_dot, *args)[1](g))(x, w, a, b)
    want = jax.vjp(split, x, w, a, b)[1](g)
    for i, name in ((0, "x"), (2, "A"), (3, "B")):
        np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-4 * float(jnp.abs(want[i]).max()),
                                   err_msg=name)


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "--steps"), (dict(batch_size=0), "--batch-size"), (dict(trainable=("encoder",)), "--trainable"),
    (dict(lora_rank=0), "--lora-rank"), (dict(tau_range=(0.8, 0.9)), "needs --pooling"),
    (dict(eval_every=10), "--eval-manifest"), (dict(manifest="nope.jsonl"), "not found"),
    (dict(carry="nope.safetensors"), "--carry nope.safetensors: not found"),
    (dict(carry="nope.safetensors", accumulate=2), "--carry takes runs without --accumulate"),
])
def test_bad_options_fail_before_loading(kw, match, tmp_path):
    (tmp_path / "m.jsonl").write_text("")
    kw = {"manifest": tmp_path / "m.jsonl", **kw}
    cfg = _cfg(tmp_path, out=tmp_path / "run", **kw)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_bad_items_are_recorded_and_skipped(tiny_qwen2_audio_ckpt, manifest, tmp_path):
    m = tmp_path / "m.jsonl"
    sf.write(str(tmp_path / "short.wav"), np.zeros(200, np.float32), SR)
    rows = [json.loads(x) for x in Path(manifest).read_text().splitlines()]
    for r in rows:
        r["audio"] = str(Path(manifest).parent / r["audio"])
    rows += [{"id": "gone", "audio": "nope.wav", "target": "x"}, {"id": "short", "audio": "short.wav", "target": "x"},
             {"id": "notext", "audio": "short.wav"}]
    m.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    tr = Trainer(_cfg(tiny_qwen2_audio_ckpt, m, tmp_path / "run"), log=lambda *a: None)
    errors = {json.loads(x)["id"]: json.loads(x)["error"] for x in (tmp_path / "run" / "data_errors.jsonl").read_text().splitlines()}
    assert set(errors) == {"gone", "short", "notext", "line-8"}, errors
    assert "not found" in errors["gone"] and "too short" in errors["short"] and "target" in errors["notext"]
    assert len(tr.examples) == 4


def test_export_needs_an_output(tmp_path, capsys):
    from affjax.cli import main
    assert main(["export", "--run", str(tmp_path)]) == 1
    assert "export needs --out CKPT, --carry FILE or both" in capsys.readouterr().err


def test_make_lslm_trains_validates_and_exports(tiny_qwen2_audio_ckpt, manifest, tmp_path, monkeypatch):
    """`make lslm` end to end, with the tiny checkpoint for the assembly and RECIPE cut to 2 steps:
    the run logs its validation WER, the weights land in the two committed files, which rebuild the
    exported checkpoint, and a rerun trains nothing more."""
    import shutil

    from flax import nnx

    from affjax.models import checkpoint
    from affjax.train import lslm
    from affjax.train.export import apply_trained

    monkeypatch.setenv("AFFJAX_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    shutil.copytree(Path(manifest).parent, corpus)
    shutil.copy(corpus / "train.jsonl", corpus / "test.jsonl")
    weights = tmp_path / "weights" / "lslm-tiny.safetensors"
    monkeypatch.setattr(lslm, "WEIGHTS", weights)
    monkeypatch.setattr(lslm, "ADAPTERS", weights.with_name("lslm-tiny-lora.safetensors"))
    monkeypatch.setattr(lslm, "CARRY", weights.with_name("lslm-tiny-carry.safetensors"))
    monkeypatch.setattr(lslm, "_base_checkpoint", lambda dst, log=print: Path(tiny_qwen2_audio_ckpt))
    monkeypatch.setattr(lslm, "RECIPE", dict(steps=2, batch_size=2, lr=3e-3, warmup=1, lora_rank=4,
                                             trainable=("projector", "lora"), seed=0, save_every=1, log_every=1,
                                             eval_every=2, eval_items=2, progress=False))
    work = tmp_path / "work"
    assert lslm.make(work, corpus, log=lambda *a: None) == weights
    rows = [json.loads(x) for x in (work / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    (val,) = [r for r in rows if "wer" in r]
    assert val["step"] == 2 and val["items"] == 2 and val["wer"] >= 0
    assert weights.is_file() and lslm.ADAPTERS.is_file()

    exported, _, meta = checkpoint.load(work / "trained")
    assert meta["trained"]["step"] == 2
    rebuilt, _, _ = checkpoint.load(apply_trained(tiny_qwen2_audio_ckpt, weights, tmp_path / "rebuilt"))
    base, _, _ = checkpoint.load(tiny_qwen2_audio_ckpt)
    want, got = jax.tree.leaves(nnx.state(exported)), jax.tree.leaves(nnx.state(rebuilt))
    assert len(want) == len(got)
    for w, g in zip(want, got):  # the adapters are float16 in the committed form
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-3, rtol=1e-3)
    assert any(not np.array_equal(np.asarray(w), np.asarray(b))  # trained: not the base
               for w, b in zip(want, jax.tree.leaves(nnx.state(base))))

    lslm.make(work, corpus, log=lambda *a: None)  # finished: resumes at the last step, trains nothing
    again = [json.loads(x) for x in (work / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again if "loss" in r] == [1, 2]
