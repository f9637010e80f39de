"""The parts of `python -m affjax.bench.kimi_official` that are ours (no official file here): the
flash_attn stand-in the official Kimi attention calls, and the inputs both sides get."""

from __future__ import annotations

import sys

import numpy as np

from conftest import need_module

torch = need_module("torch")

from affjax.bench import kimi_official as ko  # noqa: E402


def test_flash_attn_stub_is_causal_gqa_attention():
    shims = []
    ko._flash_attn_stub(shims)
    try:
        fa = sys.modules["flash_attn"].flash_attn_func
    finally:
        for m in ("flash_attn", "flash_attn.bert_padding"):
            sys.modules.pop(m, None)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, h, 16, generator=g) for h in (4, 2, 2))  # ['B S H d'], 2 kv heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(fa(q, k, v, 0.0, causal=True), want, atol=1e-6, rtol=0)
    half = fa(q.half(), k.half(), v.half(), 0.0, causal=True)  # the official float32 path feeds float16
    assert half.dtype == torch.float16 and (half.float() - want).abs().max() < 1e-2
    assert shims and "flash_attn" in shims[0]


def _stub(fused: bool):
    ko._flash_attn_stub([], fused)
    try:
        return sys.modules["flash_attn"].flash_attn_func
    finally:
        for m in ("flash_attn", "flash_attn.bert_padding"):
            sys.modules.pop(m, None)


def test_flash_attn_stub_fused_is_the_same_attention():
    """--time's stub (torch's scaled_dot_product_attention) against the check's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, h, 16, generator=g).half() for h in (4, 2, 2))
    got, want = (_stub(fused)(q, k, v, 0.0, causal=True) for fused in (True, False))
    assert got.dtype == torch.float16 and (got.float() - want.float()).abs().max() < 2e-3


def test_kimi_inputs_layout():
    from affjax.models.kimi_audio.inputs import code_count

    inp = ko.kimi_inputs(np.random.default_rng(0))
    for i, (secs, words) in enumerate(zip(ko.SECONDS, ko.PROMPT_TOKENS)):
        n, codes = int(inp[f"n{i}"]), code_count(np.zeros(int(secs * 16000), np.float32))
        assert n == 1 + words + 1 + codes + 4 and inp["continuous"][i].sum() == codes
        assert inp[f"feats{i}"].shape == (codes, ko.KIMI_CONFIG["kimia_adaptor_input_dim"])
        assert inp[f"sel{i}"][-1] == n - 1 and (inp["audio"][i, n:] == 151666).all()


def test_time_inputs_official_layout():
    """--time's input: the official embedding code puts feature j at the j-th position after
    media_begin (and asserts the count), so its features must be the window's rows in code order."""
    from affjax.bench.kimi import BENCH_CONFIG
    from affjax.models.kimi_audio.modeling import KimiAudioConfig

    cfg = KimiAudioConfig.from_hf(BENCH_CONFIG)
    batch, feats, off = ko.time_inputs(cfg)
    cont = off["continuous"]
    codes = np.flatnonzero(cont)
    begin, end = (np.flatnonzero(off["audio"] == BENCH_CONFIG[k]) for k in ("kimia_media_begin", "kimia_media_end"))
    assert len(codes) == cfg.tokens_per_window and batch.valid.all()
    assert list(begin) == [codes[0] - 1] and list(end) == [codes[-1] + 1]
    np.testing.assert_array_equal(off["feats"], feats[0])
