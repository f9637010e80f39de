"""GLM-4-Voice's speech tokenizer (Kimi-Audio's discrete audio codes) against the PyTorch reference
of the official code (tests/glm4_speech_reference.py), float32, on a tiny random checkpoint in the
real on-disk layout, loaded through SPEECH_TOKENIZER_KEYS and the converter's streaming reader.

Clips of 2 s, 12 s and 45 s (the last cut into 30 s + 15 s, as the official code does) run as one
padded batch of 4 pieces. Codes identical except at ties (nearest and second-nearest distances
within 1e-4, which float32 rounding may order either way; they must be rare), pre-quantizer states
within 1e-4, code counts equal to the reference's, and a second batch of other lengths with the
same shapes does not recompile.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import need_module

torch = need_module("torch")

from glm4_speech_reference import (  # noqa: E402
    extract_speech_token, load_reference, make_tiny_glm4_speech_tokenizer, tiny_config)

from affjax.models.kimi_audio.speech_tokenizer import (  # noqa: E402
    SpeechTokenizerConfig, encode_pieces, extract_features, load_hf_folder, tokenize)
from affjax.runtime.compiles import TRACES  # noqa: E402
from affjax.testing import synth_speech_like  # noqa: E402

SECONDS = (2.0, 12.0, 45.0)
ROWS = 4  # model batch: the 4 pieces of SECONDS
TIE = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import WhisperFeatureExtractor

    src = make_tiny_glm4_speech_tokenizer(tmp_path_factory.mktemp("glm4_speech_tokenizer"), seed=0)
    model, cfg = load_hf_folder(src)
    return model, cfg, WhisperFeatureExtractor.from_pretrained(src), load_reference(src)


@pytest.fixture(scope="module")
def runs(tiny):
    """Reference codes (+ per-piece details) and ours, for the SECONDS clips batched together."""
    model, cfg, fe, ref = tiny
    waves = [synth_speech_like(s, seed=i + 1) for i, s in enumerate(SECONDS)]
    details = []
    ref_codes = extract_speech_token(ref, fe, waves, details=details)
    sf = extract_features(fe, waves, cfg)  # tokenize's own steps, keeping the pieces' hidden states
    assert sf.features.shape == (ROWS, cfg.encoder.num_mel_bins, cfg.max_frames)
    out = encode_pieces(model, sf, batch_size=ROWS)
    ours = [np.concatenate([out.codes[i, :out.counts[i]] for i in np.flatnonzero(sf.owner == w)])
            for w in range(len(waves))]
    return waves, ref_codes, details, sf, out, ours


def test_config_fields():
    real = tiny_config(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, encoder_layers=32,
                       pooling_position=16, quantize_position=16, quantize_causal_block_size=200,
                       quantize_vocab_size=16384)
    cfg = SpeechTokenizerConfig.from_hf(real)
    assert cfg == SpeechTokenizerConfig()  # the defaults are the real checkpoint's
    assert (cfg.frames_per_code, cfg.max_frames, cfg.num_codes(cfg.max_frames)) == (8, 3000, 375)
    # 12.5 codes per second, ceil per 30 s piece: 45 s -> 375 + 188
    assert [cfg.num_codes_for_samples(n) for n in (0, 1, 16000, 32000, 480000, 720000)] == [0, 1, 13, 25, 375, 563]


@pytest.mark.parametrize("field,value,needle", [
    ("pooling_type", "max", "pooling_type"),
    ("pooling_position", 0, "pooling_position"),
    ("pooling_position", 4, "pooling_position"),
    ("encoder_causal_attention", True, "causal"),
    ("encoder_causal_convolution", False, "causal_convolution"),
    ("quantize_vocab_size", None, "quantize_vocab_size"),
    ("activation_function", "relu", "activation"),
])
def test_bad_config_raises(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        SpeechTokenizerConfig.from_hf(tiny_config(**{field: value}))


def test_codes_match_reference(tiny, runs):
    model, cfg, fe, ref = tiny
    waves, ref_codes, details, sf, out, ours = runs
    assert [len(c) for c in ref_codes] == [cfg.num_codes_for_samples(len(w)) for w in waves] == [25, 150, 563]
    gaps = np.concatenate([np.diff(np.sort(d[6], 1)[:, :2], axis=1)[:, 0] for d in details])
    tie = gaps < TIE
    ref_all, ours_all = np.concatenate(ref_codes), np.concatenate(ours)
    assert [len(c) for c in ours] == [len(c) for c in ref_codes]
    assert ours_all.dtype == np.int32 and ours_all.min() >= 0 and ours_all.max() < cfg.vocab_size
    assert len(np.unique(ref_all)) > 100, "the codes should spread over the codebook"
    wrong = np.flatnonzero((ours_all != ref_all) & ~tie)
    assert wrong.size == 0, f"{wrong.size} codes differ off ties, first at {wrong[:10]}"
    assert tie.mean() < 0.01, f"{tie.sum()} ties of {tie.size}"


def test_hidden_states_and_counts_match(runs):
    waves, ref_codes, details, sf, out, ours = runs
    codes, counts, hidden = out
    for seg, owner, _, mask, _, ref_hidden, _ in details:
        n = len(ref_hidden)
        assert counts[seg] == n and sf.lengths[seg] == mask.sum() and sf.owner[seg] == owner
        assert (codes[seg, n:] == -1).all() and (codes[seg, :n] >= 0).all()
        np.testing.assert_allclose(hidden[seg, :n], ref_hidden, atol=1e-4, rtol=0)


def test_block_mask_matters(tiny, runs):
    """The reference without blocks differs: the parity above checks the block-causal mask."""
    model, cfg, fe, ref = tiny
    _, _, details, *_ = runs
    _, _, feats, mask, _, hidden_blocks, _ = details[1]  # the 12 s clip's piece, as the batch padded it
    ref.config = dict(ref.config, quantize_causal_block_size=None)
    try:
        _, hidden, _ = ref(torch.from_numpy(feats)[None], torch.from_numpy(mask)[None])
    finally:
        ref.config = dict(ref.config, quantize_causal_block_size=cfg.block_size)
    assert np.abs(hidden[0, :len(hidden_blocks)].numpy() - hidden_blocks).max() > 1e-2


def test_other_lengths_do_not_recompile(tiny, runs):
    model, cfg, fe, _ = tiny
    before = dict(TRACES)
    waves = [synth_speech_like(s, seed=20 + i) for i, s in enumerate((5.0, 20.0, 33.0))]  # again 4 pieces
    codes = tokenize(model, fe, waves, batch_size=ROWS)
    assert dict(TRACES) == before, f"recompiled: {before} -> {dict(TRACES)}"
    assert [len(c) for c in codes] == [cfg.num_codes_for_samples(len(w)) for w in waves] == [63, 250, 413]


def test_batched_clips_match_per_clip(tiny):
    """The clips of a batch tokenized in one call (the 4 pieces of SECONDS, 2 per batch, shortest
    first: frames cut to the 1600 and 3000 buckets) give the codes of one call per clip at 30 s
    frames and batch 1, and the reference's extract_speech_token per clip (Kimi-Audio's
    Glm4Tokenizer calls it once per clip); other lengths in the same buckets do not recompile."""
    model, cfg, fe, ref = tiny
    waves = [synth_speech_like(s, seed=i + 1) for i, s in enumerate(SECONDS)]
    before = TRACES["glm4_speech_tokenizer"]
    got = tokenize(model, fe, waves, batch_size=2)
    assert TRACES["glm4_speech_tokenizer"] - before <= 2  # (2, 1600) and (2, 3000), unless compiled already
    for g, w in zip(got, waves):
        alone = tokenize(model, fe, [w], batch_size=1, buckets=(cfg.max_frames,))[0]
        assert np.array_equal(g, alone)
        details = []
        want = np.asarray(extract_speech_token(ref, fe, [w], details=details)[0])
        gaps = np.concatenate([np.diff(np.sort(d[6], 1)[:, :2], axis=1)[:, 0] for d in details])
        assert len(g) == len(want) and not np.flatnonzero((g != want) & (gaps >= TIE)).size
    assert [len(c) for c in got] == [25, 150, 563]
    before = TRACES["glm4_speech_tokenizer"]
    other = [synth_speech_like(s, seed=30 + i) for i, s in enumerate((3.0, 10.0, 50.0))]  # 300, 1000 | 2000, 3000
    assert [len(c) for c in tokenize(model, fe, other, batch_size=2)] == [38, 125, 625]
    assert TRACES["glm4_speech_tokenizer"] == before, "a new length inside a bucket recompiled"
