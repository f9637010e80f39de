"""lslm-tiny's user side: `--data librivox` for speech-LM checkpoints (the real read speech, scored
against its transcripts), `--model lslm-tiny` refusing clearly while its weights are absent, and the
committed weights being RECIPE's full run.
(Building the model from the trained weights is tested with a real training run in test_train.py.)"""

from __future__ import annotations

import json

import pytest

from conftest import need_asset


def test_librivox_data_on_a_speech_lm(tiny_qwen2_audio_ckpt, tmp_path):
    from affjax.data.assets import librivox_items
    from affjax.eval.runner import JobConfig, UsageError, run_eval

    clips = need_asset(librivox_items)[:2]
    cfg = JobConfig(ckpt=str(tiny_qwen2_audio_ckpt), data="librivox", limit=2, out=str(tmp_path / "run"),
                    batch_size=2, max_new_tokens=4, progress=False)
    s = run_eval(cfg, log=lambda *_: None)
    res = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in res] == [c["id"] for c in clips]
    assert [r["reference"] for r in res] == [c["text"] for c in clips]
    assert s["ok"] == 2 and s["primary"][0] == "wer"
    with pytest.raises(UsageError, match="asr data set"):
        run_eval(JobConfig(ckpt=str(tiny_qwen2_audio_ckpt), data="librivox", task="qa", out=str(tmp_path / "qa"),
                           progress=False), log=lambda *_: None)


def test_model_lslm_tiny_names_make_lslm_without_weights(monkeypatch, tmp_path, capsys):
    from affjax.cli import main
    from affjax.train import lslm

    monkeypatch.setenv("AFFJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lslm, "WEIGHTS", tmp_path / "absent.safetensors")
    rc = main(["eval", "--model", "lslm-tiny", "--data", "librivox", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and "make lslm" in err and "absent.safetensors" in err, (rc, err)
    assert not (tmp_path / "cache" / "models" / "lslm-tiny").exists()


def test_committed_weights_are_the_recipes():
    """The committed files are one trained run of RECIPE: the adapters file is the one the projector
    file names (SHA-256), the run went the recipe's full length, and every tensor has the shape the
    assembly (Whisper base 512 wide -> SmolLM2 576 wide, 30 layers, 7 projections) gives it."""
    import numpy as np

    from affjax.train import export, lslm

    for f in (lslm.WEIGHTS, lslm.WEIGHTS.with_name("lslm-tiny-lora.safetensors")):
        assert f.stat().st_size < 5 * 2**20, f  # the repository's tracked-file limit
    flat, meta = export.read_trained(lslm.WEIGHTS)
    assert int(meta["step"]) == lslm.RECIPE["steps"]
    assert int(meta["lora_rank"]) == lslm.RECIPE["lora_rank"]
    assert tuple(meta["trainable"].split(",")) == lslm.RECIPE["trainable"]
    assert flat["multi_modal_projector.kernel"].shape == (512, 576)
    assert flat["multi_modal_projector.bias"].shape == (576,)
    lora = {k: v for k, v in flat.items() if k.endswith((".lora_a", ".lora_b"))}
    assert len(lora) == 30 * 7 * 2 and len(flat) == len(lora) + 2
    r = lslm.RECIPE["lora_rank"]
    for k, v in lora.items():
        assert (v.shape[1] if k.endswith("lora_a") else v.shape[0]) == r, (k, v.shape)
        assert np.isfinite(v).all(), k
    # trained, not initial: LoRA's B factors start at zero
    assert all(np.abs(v).max() > 0 for k, v in lora.items() if k.endswith("lora_b"))
