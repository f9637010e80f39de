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


def test_kimi_inputs_layout():
    from affjax.models.kimi_audio.inputs import code_count

    inp = ko.kimi_inputs(np.random.default_rng(0))
    for i, (secs, words) in enumerate(zip(ko.SECONDS, ko.PROMPT_TOKENS)):
        n, codes = int(inp[f"n{i}"]), code_count(np.zeros(int(secs * 16000), np.float32))
        assert n == 1 + words + 1 + codes + 4 and inp["continuous"][i].sum() == codes
        assert inp[f"feats{i}"].shape == (codes, ko.KIMI_CONFIG["kimia_adaptor_input_dim"])
        assert inp[f"sel{i}"][-1] == n - 1 and (inp["audio"][i, n:] == 151666).all()
