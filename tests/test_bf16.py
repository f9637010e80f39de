"""The bf16 gate (affjax.bench.bf16): its distribution comparison against torch's KL, and the gate
itself on real Whisper tiny.en weights and on the tiny Qwen2-Audio checkpoint (SmolLM2's real
decoder is gated in test_smollm2.py). Gate: mean KL(p_float32 || p_bfloat16) <= 0.01 nats and top-1
agreement >= 95 % (affjax.bench.bf16.GATE)."""

import numpy as np
import pytest

from conftest import need_asset, need_module

from affjax.bench import bf16


def test_compare_matches_torch_kl():
    torch = need_module("torch")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 7, 50)).astype(np.float32) * 4
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 0.3
    mask = np.ones((2, 7), bool)
    mask[1, 5:] = False  # padding positions are left out
    got = bf16.compare(a, b, mask)
    ta, tb = torch.from_numpy(a[mask]).double(), torch.from_numpy(b[mask]).double()
    kl = torch.nn.functional.kl_div(tb.log_softmax(-1), ta.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert got["positions"] == 12
    np.testing.assert_allclose([got["kl_mean"], got["kl_max"]], [kl.mean().item(), kl.max().item()], rtol=1e-9)
    assert got["top1"] == pytest.approx((ta.argmax(-1) == tb.argmax(-1)).double().mean().item())
    same = bf16.compare(a, a, mask)
    assert same["kl_max"] == pytest.approx(0, abs=1e-12) and same["top1"] == 1.0
    with pytest.raises(ValueError, match="no position"):
        bf16.compare(a, b, np.zeros_like(mask))


@pytest.mark.slow
def test_whisper_tiny_en_passes_the_gate(real_whisper, librivox):
    from affjax.eval.whisper import load_whisper

    ckpt, _, model, processor, _ = real_whisper("tiny.en")
    models = {"float32": (model, processor), "bfloat16": load_whisper(ckpt, dtype="bfloat16")[:2]}
    assert models["bfloat16"][0].decoder.embed_tokens[...].dtype == np.dtype("bfloat16")
    r = bf16.whisper_case(models, [(it["text"], w) for it, w in librivox[4:]], max_new_tokens=48)
    assert r["positions"] >= 10 and bf16.verdict(r), r
    assert r["wer"]["bfloat16"] <= r["wer"]["float32"] + 0.05, r["wer"]


def test_qwen2_audio_gate_on_the_tiny_checkpoint(tiny_qwen2_audio_ckpt):
    r = bf16.qwen2_audio_gate(str(tiny_qwen2_audio_ckpt), n_items=1, words=120)
    # random weights: near-flat distributions, so only the KL says something
    assert r["positions"] > 100 and 0 < r["kl_mean"] <= bf16.GATE["kl_mean_max"], r


def test_cli_refuses_nothing_to_gate(capsys):
    from affjax.cli import main

    assert main(["bench-bf16", "--whisper", "--no-smollm2"]) == 1
    assert "nothing to gate" in capsys.readouterr().err
    assert main(["bench-bf16", "--clips", "0"]) == 1
    assert "--clips must be 1 to 5" in capsys.readouterr().err
