"""Kimi-Audio against the PyTorch reference (tests/kimi_reference.py, float32): a tiny random
release in the real on-disk layout (36-style shards with an index, MIMO layers, RoPE buffers, the
whisper-large-v3/ subfolder, tiktoken.model) converted by checkpoints_convert/convert.py with
--speech-tokenizer (a tiny GLM-4-Voice tokenizer), then loaded by affjax.

One padded batch of three items: clips of 2 s, 12 s and 45 s (two 30 s windows in one audio span),
instructions of 100-300 tokens (so RoPE runs far from position 0), random valid codes of each
clip's token count, a scored continuation each. Tolerances: fused input embeddings and logits
1e-4 absolute, continuation log-probs 1e-3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import need_module

torch = need_module("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from kimi_reference import (  # noqa: E402
    ASSISTANT_START, MEDIA_BEGIN, MEDIA_END, MSG_END, SPEECH_CT, TEXT_BLANK, USER_START, WHISPER_DIR, KimiReference,
    asr_streams, n_skipped_whisper_keys, random_items,
)

SECONDS = (2.0, 12.0, 45.0)
PROMPT_WORDS = (300, 100, 180)
CONTINUATIONS = (" The speaker says hello.", " twelve", " It is raining in the city tonight.")


@pytest.fixture(scope="module")
def release(tiny_kimi_release):
    return tiny_kimi_release


@pytest.fixture(scope="module")
def glm4(tiny_glm4_tokenizer):
    return tiny_glm4_tokenizer


@pytest.fixture(scope="module")
def converted(tiny_kimi_ckpt):
    return tiny_kimi_ckpt


@pytest.fixture(scope="module")
def run(release, converted):
    """Both sides on the same batch: affjax from the checkpoint, the reference from the release."""
    from transformers import WhisperFeatureExtractor

    from affjax.models.checkpoint import load
    from affjax.models.kimi_audio import inputs as ki
    from affjax.models.kimi_audio.tokenizer import encode_text, load_tokenizer

    model, cfg, meta = load(converted)
    tok = load_tokenizer(converted)
    fe = WhisperFeatureExtractor.from_pretrained(str(converted / WHISPER_DIR))
    ref = KimiReference.from_release(release)
    items, streams, waves = [], [], []
    for i, (wave, codes, instruction) in enumerate(random_items(SECONDS, PROMPT_WORDS, rng_seed=0, wave_seed=20,
                                                                prompt_seed=0)):
        e = ki.encode(tok, fe, instruction, wave, codes, CONTINUATIONS[i])
        items.append(e)
        streams.append(asr_streams(encode_text(tok, instruction), codes, list(e.cont_ids)))
        waves.append(wave)
    batch = ki.collate(items, batch_size=3, tokens_per_window=cfg.tokens_per_window)

    @nnx.jit
    def forward(m, ids, valid, span, audio_index, features, feature_lengths):
        x = m.embed_batch(ids, span, audio_index, features, feature_lengths)
        h, branch = m.decode(x, valid, with_audio=True)
        return m.encode_audio(features, feature_lengths), x, h, branch

    args = [jnp.asarray(a) for a in (batch.ids, batch.valid, batch.span, batch.audio_index, batch.features,
                                     batch.feature_lengths)]
    feats, x, h, branch = forward(model, *args)

    ref_x = [ref.embed(a, t, c, [ref.whisper_features(w)]) for (a, t, c), w in zip(streams, waves)]
    T = batch.ids.shape[1]
    emb = torch.zeros(len(items), T, ref_x[0].shape[1])
    mask = torch.zeros(len(items), T, dtype=torch.bool)
    for b, e in enumerate(ref_x):
        emb[b, :len(e)], mask[b, :len(e)] = e, True
    ref_h, ref_branch = ref(emb, mask)
    return SimpleNamespace(model=model, cfg=cfg, meta=meta, tok=tok, items=items, streams=streams, batch=batch,
                           feats=np.asarray(feats), x=np.asarray(x), h=h, branch=branch, ref=ref, ref_x=ref_x,
                           ref_h=ref_h, ref_branch=ref_branch)


def test_prompt_streams_official_layout():
    """The ASR prompt's two streams, id by id (kimia_infer's get_prompt, output_type="text")."""
    from affjax.models.kimi_audio.inputs import prompt_streams

    audio, text, cont = prompt_streams([("text", [11, 12, 13]), ("audio", [0, 5])])
    assert audio.tolist() == [151670, 151666, 151666, 151666, 151661, 152064, 152069, 151663, 151675, 151645, 151671]
    assert text.tolist() == [151666, 11, 12, 13] + [151666] * 7
    assert cont.tolist() == [False] * 5 + [True, True] + [False] * 4
    assert (USER_START, MEDIA_BEGIN, MEDIA_END, SPEECH_CT, MSG_END, ASSISTANT_START, TEXT_BLANK) == \
        (151670, 151661, 151663, 151675, 151645, 151671, 151666)
    # audio first: ct and msg_end close the last (text) message: ct only follows audio
    audio, _, _ = prompt_streams([("audio", [1]), ("text", [7])])
    assert audio.tolist() == [151670, 151661, 152065, 151663, 151666, 151645, 151671]


def test_streams_and_batch_match_reference(run):
    from affjax.models.kimi_audio.inputs import code_count

    b = run.batch
    for i, (e, (a, t, c)) in enumerate(zip(run.items, run.streams)):
        n = b.n_prompt[i] + len(e.cont_ids)
        assert b.ids[i, :n, 0].tolist() == a and b.ids[i, :n, 1].tolist() == t
        assert (b.span[i, :n] > 0).tolist() == c and b.valid[i].sum() == n
        assert int((b.span[i] > 0).sum()) == code_count(np.zeros(int(SECONDS[i] * 16000)))
    assert b.features.shape == (6, 128, 3000)  # 1 + 1 + 2 windows, padded to a multiple of the batch
    # encode_audio: each window's valid tokens, zeros past them (the 45 s clip: 375 + 188)
    per = run.cfg.window_tokens(b.feature_lengths[:4])
    assert per.tolist() == [25, 150, 375, 188]
    assert not run.feats[3, 188:].any() and np.abs(run.feats[3, :188]).max(axis=-1).min() > 0


def test_fused_embeddings_parity(run):
    for i, e in enumerate(run.ref_x):
        np.testing.assert_allclose(run.x[i, :len(e)], e.numpy(), atol=1e-4, rtol=0)
    assert max(float(np.abs(e.numpy()).max()) for e in run.ref_x) > 1.0  # not a vanishing signal


def test_text_and_audio_logits_parity(run):
    for i, e in enumerate(run.ref_x):
        sel = np.unique(np.r_[np.arange(0, len(e), 23), run.batch.n_prompt[i] - 1, len(e) - 1])
        got = np.asarray(run.model.text_logits(run.h[i, sel]))
        with torch.no_grad():
            want = run.ref.lm_head(run.ref_h[i, sel]).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        got = np.asarray(run.model.audio_logits(run.branch[i, sel]))
        with torch.no_grad():
            want = run.ref.mimo_output(run.ref_branch[i, sel]).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert float(np.abs(want).max()) > 1.0


def test_continuation_logprobs_parity(run):
    b = run.batch
    got = np.asarray(run.model.continuation_logprobs(run.h, jnp.asarray(b.n_prompt), jnp.asarray(b.cont_ids)))
    for i, e in enumerate(run.items):
        k = len(e.cont_ids)
        at = torch.as_tensor(b.n_prompt[i] - 1 + np.arange(k))
        with torch.no_grad():
            logp = torch.log_softmax(run.ref.lm_head(run.ref_h[i, at]), -1)
        want = logp[torch.arange(k), torch.as_tensor(e.cont_ids, dtype=torch.long)].numpy()
        np.testing.assert_allclose(got[i, :k], want, atol=1e-3, rtol=0)


def test_conversion_uses_or_skips_every_key(release, converted, glm4):
    """Every tensor of the release is loaded into the model or deliberately skipped (listed)."""
    meta = json.loads((converted / "affjax_config.json").read_text())
    c = json.loads((release / "config.json").read_text())
    assert meta["model_type"] == "kimi_audio" and meta["hf_config"]["whisper_config"]["num_mel_bins"] == 128
    n_layers = c["num_hidden_layers"] + c["kimia_mimo_layers"]
    skipped = meta["skipped_tensors"]
    inv_freq = [k for k in skipped if k.endswith("rotary_emb.inv_freq")]
    assert len(inv_freq) == n_layers and len(skipped) == n_layers + n_skipped_whisper_keys(release)
    assert all(k.startswith(f"{WHISPER_DIR}/model.decoder.") for k in skipped if k not in inv_freq)
    index = json.loads((release / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) >= {f"model-{n_layers + 1}-of-{n_layers + 1}.safetensors"}
    # the copied and rebuilt tokenizer / feature-extractor files make the checkpoint self-contained
    for name in ("tiktoken.model", "tokenizer.json", f"{WHISPER_DIR}/config.json",
                 f"{WHISPER_DIR}/preprocessor_config.json"):
        assert (converted / name).is_file(), name
    # the speech tokenizer converted beside the model gives the codes of its source folder
    from transformers import WhisperFeatureExtractor

    from affjax.models.checkpoint import load_speech_tokenizer
    from affjax.models.kimi_audio.speech_tokenizer import load_hf_folder, tokenize
    from affjax.testing import synth_speech_like

    st = meta["speech_tokenizer"]
    assert st["weights"] == "converted" and (converted / "speech_tokenizer" / "preprocessor_config.json").is_file()
    tokenizer, scfg = load_speech_tokenizer(converted)
    assert scfg.vocab_size == json.loads((glm4 / "config.json").read_text())["quantize_vocab_size"]
    fe = WhisperFeatureExtractor.from_pretrained(str(converted / "speech_tokenizer"))
    wave = [synth_speech_like(3.0, seed=7)]
    got, want = tokenize(tokenizer, fe, wave)[0], tokenize(load_hf_folder(glm4)[0], fe, wave)[0]
    assert len(got) == 38 and np.array_equal(got, want)


def _linked_copy(src: Path, dst: Path, drop: str) -> Path:
    """src as a tree of symlinks without the entry `drop` (cheap: no tensor is copied)."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name != drop:
            os.symlink(p, dst / p.name)
    return dst


@pytest.mark.parametrize("drop, message", [("model-5-of-5.safetensors", "model-5-of-5.safetensors"),
                                           (WHISPER_DIR, WHISPER_DIR)])
def test_missing_part_fails_clearly(release, tmp_path, drop, message):
    from affjax.models.checkpoint import ConversionError, convert

    src = _linked_copy(release, tmp_path / "src", drop)
    dst = tmp_path / "ckpt"
    with pytest.raises(ConversionError, match=message.replace(".", r"\.")):
        convert(src, dst, progress=False)
    assert not dst.exists() and not list(tmp_path.glob(".ckpt.*"))


def test_codes_must_number_the_tokens(run):
    from transformers import WhisperFeatureExtractor

    from affjax.models.kimi_audio.inputs import encode

    fe = WhisperFeatureExtractor(feature_size=128)
    with pytest.raises(ValueError, match="25 tokens"):
        encode(run.tok, fe, "hi", np.zeros(32000, np.float32), np.zeros(24, int))
