"""Qwen2-Audio end to end against transformers (PyTorch, float32): tiny random checkpoints written
with save_pretrained, converted with checkpoints_convert/convert.py, loaded by affjax.

A padded batch of 4 items with audio of 1 s to 30 s and prompts of 300+ tokens (so RoPE is
exercised far from position 0). Tolerances: encoder output and logits 1e-4 absolute, score
log-probs 1e-3, greedy tokens identical for 32 new tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import need_module, need_qwen2_tokenizer

torch = need_module("torch")

SECONDS = (1.0, 7.5, 18.0, 30.0)
CONTINUATIONS = (" The speaker says hello.", " twelve", " It is raining in the city tonight.", " yes")


# gqa: one KV head for four query heads and the head tied to the embeddings (the small decoders'
# layout, lslm-tiny's SmolLM2 among them); mha: Qwen2-Audio-7B's own (as many KV heads as query
# heads, a separate lm_head). Each variant is a whole reference run, so the two layouts share one.
@pytest.fixture(scope="module", params=["gqa", pytest.param("mha", marks=pytest.mark.slow)])
def ckpt(request, tmp_path_factory):
    need_qwen2_tokenizer()
    from affjax.models.checkpoint import convert
    from affjax.testing import make_tiny_qwen2_audio
    variant = request.param
    kw = dict(gqa=dict(heads=4, kv_heads=1, tie_word_embeddings=True), mha=dict(heads=4, kv_heads=4))[variant]
    src = make_tiny_qwen2_audio(tmp_path_factory.mktemp(f"hf_{variant}"), seed=1, **kw)
    dst = tmp_path_factory.mktemp(f"ck_{variant}") / "ckpt"
    convert(src, dst, progress=False)
    return variant, src, dst


@pytest.fixture(scope="module")
def loaded(ckpt):
    from transformers import Qwen2AudioForConditionalGeneration
    from affjax.eval.lslm import load_for_inference
    from affjax.testing import long_prompt, synth_speech_like
    variant, src, dst = ckpt
    model, cfg, processor, eos, pad = load_for_inference(str(dst))
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    items = [(long_prompt(290 + 17 * i, seed=i), synth_speech_like(s, seed=10 + i), CONTINUATIONS[i])
             for i, s in enumerate(SECONDS)]
    return variant, model, cfg, processor, eos, pad, hf, items


def _hf_inputs(processor, prompt, wav, cont=None):
    x = processor(text=[prompt], audio=[wav], sampling_rate=16000, return_tensors="pt")
    if cont is not None:
        c = processor.tokenizer(cont, add_special_tokens=False, return_tensors="pt")["input_ids"]
        x["input_ids"] = torch.cat([x["input_ids"], c], 1)
        x["attention_mask"] = torch.ones_like(x["input_ids"])
    return x


def _batch(loaded, score: bool):
    from affjax.models.qwen2_audio.inputs import collate, encode
    _, model, cfg, processor, eos, pad, hf, items = loaded
    enc = [encode(processor, p, [w], c if score else None) for p, w, c in items]
    return collate(enc, batch_size=4, audio_token_id=cfg.audio_token_id, out_frames_of=cfg.audio.output_lengths,
                   pad_id=pad)


def test_prompts_are_long_and_audio_lengths_mixed(loaded):
    batch = _batch(loaded, score=False)
    assert batch.n_prompt.min() >= 300
    counts = (batch.span > 0).sum(1)
    assert len(set(counts.tolist())) == 4 and counts.max() == 750


def test_encoder_output_matches(loaded):
    _, model, cfg, processor, *_, hf, items = loaded
    from transformers.masking_utils import create_bidirectional_mask
    batch = _batch(loaded, score=False)
    ours = np.asarray(model.audio_tower(jnp.asarray(batch.features), jnp.asarray(batch.feature_lengths)))
    feats = torch.from_numpy(batch.features)
    flen = torch.from_numpy(batch.feature_lengths).long()
    tower = hf.model.audio_tower
    after_conv, out_len = tower._get_feat_extract_output_lengths(flen)
    mask2d = (torch.arange(cfg.audio.max_source_positions)[None] < after_conv[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(len(flen), mask2d.shape[1], 1),
                                     attention_mask=mask2d)
    with torch.no_grad():
        ref = tower(feats, attention_mask=mask).last_hidden_state.numpy()
    for a in range(len(SECONDS)):
        n = int(out_len[a])
        np.testing.assert_allclose(ours[a, :n], ref[a, :n], atol=1e-4, rtol=0)


def test_logits_match_on_padded_batch(loaded):
    """Logits at every 23rd position and the last of each row, against each item run alone."""
    from affjax.runtime.engine import hidden_states
    _, model, cfg, processor, *_, hf, items = loaded
    batch = _batch(loaded, score=False)
    h = jax.jit(hidden_states)(model, *map(jnp.asarray, (batch.ids, batch.valid, batch.span, batch.audio_index,
                                                        batch.features, batch.feature_lengths)))
    head = jax.jit(lambda m, x: m.language_model.logits(x))
    for b, (p, w, _) in enumerate(items):
        n = int(batch.n_prompt[b])
        at = np.unique(np.r_[np.arange(0, n, 23), n - 1])
        ours = np.asarray(head(model, h[b, at]))
        with torch.no_grad():
            ref = hf(**_hf_inputs(processor, p, w)).logits[0, at].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["gqa"], indirect=True)  # the logits test covers the other variants
def test_score_matches(loaded):
    from affjax.runtime.engine import Engine
    variant, model, cfg, processor, eos, pad, hf, items = loaded
    lp, _ = Engine(model, eos_ids=eos, pad_id=pad).score(_batch(loaded, score=True))
    for b, (p, w, c) in enumerate(items):
        x = _hf_inputs(processor, p, w, c)
        n = int(processor(text=[p], audio=[w], sampling_rate=16000, return_tensors="pt")["input_ids"].shape[1])
        with torch.no_grad():  # the head only where the continuation is predicted
            h = hf.model(**x).last_hidden_state[0, n - 1:-1]
            logp = torch.log_softmax(hf.lm_head(h).double(), -1)
        ids = x["input_ids"][0]
        ref = sum(float(logp[t - n, ids[t]]) for t in range(n, len(ids)))
        assert abs(lp[b] - ref) < 1e-3, (b, lp[b], ref)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["gqa"], indirect=True)  # the slowest reference run: one variant
def test_greedy_tokens_identical(loaded):
    from affjax.runtime.engine import Engine
    variant, model, cfg, processor, eos, pad, hf, items = loaded
    toks, _ = Engine(model, eos_ids=(), pad_id=pad).generate(_batch(loaded, score=False), 32)
    for b, (p, w, _) in enumerate(items):
        x = _hf_inputs(processor, p, w)
        with torch.no_grad():
            g = hf.generate(**x, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None)
        assert toks[b] == g[0, x["input_ids"].shape[1]:].tolist(), b


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["gqa"], indirect=True)
def test_one_compile_per_bucket(loaded):
    """12 items of different lengths (clips one audio token, 0.04 s, apart), all in one bucket of
    affjax.runtime.shapes.SEQ_BUCKETS: prefill and decode compile once each, over 3 batches."""
    from affjax.runtime import shapes
    from affjax.runtime.engine import TRACES, Engine
    from affjax.models.qwen2_audio.inputs import collate, encode
    from affjax.testing import long_prompt, synth_speech_like
    variant, model, cfg, processor, eos, pad, hf, items = loaded
    prompt = long_prompt(80, seed=100)
    n0 = len(encode(processor, prompt, [synth_speech_like(18.0, seed=0)]).ids)
    # the 12 lengths start just above the lower edge of the first bucket from n0 on wide enough to hold them
    lo = next(a for a, b in zip(shapes.SEQ_BUCKETS, shapes.SEQ_BUCKETS[1:]) if a >= n0 and b - a >= 12)
    start = 18.0 + 0.04 * (lo + 1 - n0)
    enc = [encode(processor, prompt, [synth_speech_like(start + 0.04 * i + 0.01, seed=i)]) for i in range(12)]
    lengths = [len(e.ids) for e in enc]
    assert len(set(lengths)) == 12 and len({shapes.bucket(n) for n in lengths}) == 1, lengths
    engine = Engine(model, eos_ids=eos, pad_id=pad)
    jax.clear_caches()  # jitted pieces are shared across engines: start cold
    TRACES.clear()
    for k in range(3):
        batch = collate(enc[4 * k:4 * k + 4], batch_size=4, audio_token_id=cfg.audio_token_id,
                        out_frames_of=cfg.audio.output_lengths, pad_id=pad)
        engine.generate(batch, 8)
    assert TRACES == {"embed": 1, "group": 1, "last_head": 1, "decode": 1}, TRACES
