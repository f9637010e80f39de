"""The Kimi-Audio benchmarks' two sides compute the same thing: `affjax bench --model kimi-audio`
times affjax against transformers' modules composed as the official code does
(affjax/bench/kimi_torch.py), and `bench-pooling --model kimi-audio` feeds the engine Kimi batches
(affjax/bench/kimi.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import need_module


def _tiny():
    from affjax.bench import kimi
    c = copy.deepcopy(kimi.BENCH_CONFIG)
    c.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, kimia_adaptor_input_dim=4 * 32)
    c["whisper_config"].update(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)
    return c


def test_torch_side_matches_affjax_prefill():
    """Same weights, same batch (two items of 4 s audio + 6 text tokens): the last position's text
    logits of KimiTorch.prefill and of the engine's prefill agree."""
    need_module("torch", "the torch extra")
    from affjax.bench import kimi, kimi_torch
    from affjax.runtime.engine import Engine

    ref, model, cfg = kimi_torch.build(_tiny(), 0, "float32", "cpu")
    batch = kimi.inputs(cfg, 2, 4.0, 6)
    assert batch.ids.shape == (2, 6 + 50 + 6, 2) and int((batch.span[0] > 0).sum()) == 50  # 12.5 Hz
    want = kimi_torch.prefill_call(ref, batch, "cpu", "float32")().numpy()
    got = np.asarray(Engine(model).prefill(batch).logits)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # the features matter: other features, other logits
    batch.features = batch.features[::-1].copy()
    assert not np.allclose(kimi_torch.prefill_call(ref, batch, "cpu", "float32")().numpy(), want, atol=1e-3)


@pytest.mark.parametrize("seconds, windows, codes", [(30.0, 1, 375), (45.0, 2, 375 + 188)])
def test_pooling_bench_inputs_span_windows(seconds, windows, codes):
    """bench-pooling's Kimi items: one clip of ceil(s / 30) windows, 12.5 tokens a second, and a
    Kimi-Audio model built from the Kimi config."""
    from affjax.bench import kimi, pooling
    from affjax.models.kimi_audio.modeling import KimiAudioConfig
    cfg = KimiAudioConfig.from_hf(kimi.POOLING_CONFIG)
    b = pooling.pooling_inputs(cfg, 1, seconds, 40)
    assert b.features.shape[0] == windows and int((b.span[0] > 0).sum()) == codes
    assert b.ids.shape[1] == pooling.shapes.bucket(codes + 40 + 6)  # 6 control tokens
    assert cfg.text.layers == 28
