"""Word timestamps from Whisper's cross-attention (affjax.eval.alignment) against transformers: the
cross-attention weights on a tiny random Whisper, the median filter and DTW on random matrices, and
token times on real speech with real Whisper base weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import need_asset, need_module

from affjax.eval import alignment as al

torch = need_module("torch", "torch is not installed (the reference)")
gw = need_module("transformers.models.whisper.generation_whisper")


def _tiny_whisper(seed=0):
    """A tiny random HF Whisper (eager attention: it returns its weights) and our model with its weights."""
    from transformers import WhisperConfig as HFConfig
    from transformers import WhisperForConditionalGeneration

    from affjax.models.layers import abstract_module
    from affjax.models.weights import KeyTable, load_streaming
    from affjax.models.whisper.modeling import Whisper, WhisperConfig
    from affjax.models.whisper.params import KEYS, TIED_KEYS
    from flax import nnx

    v = 100
    cfg = HFConfig(vocab_size=v, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=2,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                   max_source_positions=30, max_target_positions=16, pad_token_id=v - 3, bos_token_id=v - 3,
                   eos_token_id=v - 3, decoder_start_token_id=v - 2, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # sharper attention than the default init, so the weights differ visibly
        for p in hf.parameters():
            p.mul_(4.0)
    sd = {k: t.numpy() for k, t in hf.state_dict().items()}
    abstract = abstract_module(lambda rngs: Whisper(WhisperConfig.from_hf(cfg.to_dict()), rngs=rngs))
    state = load_streaming(abstract, KeyTable(KEYS), ((k, lambda a=a: a) for k, a in sd.items()),
                           ignore=lambda k: k in TIED_KEYS)
    return hf, nnx.merge(nnx.graphdef(abstract), state)


def test_cross_attention_weights_match_pytorch():
    hf, model = _tiny_whisper()
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 16, 60)).astype(np.float32)
    toks = rng.integers(0, 97, (2, 9))
    with torch.no_grad():
        ref = hf(input_features=torch.from_numpy(feats), decoder_input_ids=torch.from_numpy(toks),
                 output_attentions=True)
    run = jax.jit(lambda m, f, t: m.decoder(t, m.encoder(f), cross_weights=True))
    logits, weights = run(model, jnp.asarray(feats), jnp.asarray(toks))
    assert len(weights) == 2
    for ours, theirs in zip(weights, ref.cross_attentions):
        assert ours.shape == tuple(theirs.shape) == (2, 4, 9, 30)
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=2e-6, rtol=0)
    # the weights are not uniform (the check above could not pass by accident) ...
    assert float(np.asarray(weights[1]).max()) > 5 / 30
    # ... and asking for them changes nothing else
    plain = jax.jit(lambda m, f, t: m.decoder(t, m.encoder(f)))(model, jnp.asarray(feats), jnp.asarray(toks))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))
    np.testing.assert_allclose(np.asarray(logits), ref.logits.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(3, 2, 5, 40), (1, 4, 3), (2, 3)])
def test_median_filter_matches_transformers(shape):
    x = np.random.default_rng(1).standard_normal(shape)
    ref = gw._median_filter(torch.from_numpy(x), 7).numpy()
    np.testing.assert_array_equal(al.median_filter(x), ref)


def test_dtw_matches_transformers():
    rng = np.random.default_rng(2)
    for n, m in [(1, 1), (1, 9), (7, 1), (12, 80), (30, 300)]:
        x = rng.standard_normal((n, m))
        x[:, ::7] = x[:, :1]  # repeated columns: cost ties, which both must break alike
        rows, cols = al.dtw(x)
        ref_rows, ref_cols = gw._dynamic_time_warping(x)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_array_equal(cols, ref_cols)


def test_words_of_groups_tokens():
    texts = [" He", " was", " ill", "-", "dis", "posed", ".", " OK", " ,"]
    times = np.arange(len(texts) + 1) / 10
    words = al.words_of(texts, times)
    assert [w.text for w in words] == ["He", "was", "ill-disposed.", "OK ,"]
    assert [(w.start, w.end) for w in words] == [(0.0, 0.1), (0.1, 0.2), (0.2, 0.7), (0.7, 0.9)]


# ----------------------------------------------------------------------------------------------
# real Whisper base on real speech

# DTW paths are discrete: a float32 difference between two implementations can move a path by a
# frame where two costs nearly tie, and a move shifts the times of the tokens around it. JAX and
# PyTorch give the same attention weights to ~1e-6 here, so every token should land on the same
# 20 ms frame; we allow one token in twenty to differ, by at most one frame.
SAME_FRAME = 0.95
MAX_SECONDS = 0.02 + 1e-9


@pytest.fixture(scope="module")
def base(real_whisper, librivox):
    """Whisper base (converted, loaded), its alignment heads, two LibriVox clips and their alignment."""
    ckpt, cache, model, processor, hcfg = real_whisper("base")
    heads = al.alignment_heads(ckpt)
    clips = librivox[:2]
    waves, texts = [w for _, w in clips], [it["text"] for it, _ in clips]
    got = al.align(model, processor, heads, waves, texts, batch_size=2)
    return dict(ckpt=ckpt, cache=cache, model=model, processor=processor, hcfg=hcfg, heads=heads, clips=clips,
                waves=waves, texts=texts, got=got)


@pytest.mark.slow
def test_token_times_match_transformers_on_real_speech(base):
    from transformers import GenerationConfig, WhisperForConditionalGeneration
    from transformers import WhisperConfig as HFConfig
    from transformers.generation.utils import GenerateEncoderDecoderOutput

    from affjax.data.assets import whisper_ct2_dir
    from affjax.models.whisper import ct2
    from affjax.models.whisper.decoding import prompt_ids, whisper_features

    model, processor, heads, waves, texts = (base[k] for k in ("model", "processor", "heads", "waves", "texts"))
    assert heads == tuple(map(tuple, GenerationConfig.from_pretrained(base["ckpt"]).alignment_heads))
    assert len(heads) == 8
    sd = ct2.ct2_to_hf_state_dict(ct2.read_ct2(need_asset(whisper_ct2_dir, "base") / "model.bin"), base["hcfg"],
                                  dtype=np.float32)
    hf = WhisperForConditionalGeneration(HFConfig(**base["hcfg"], attn_implementation="sdpa")).eval()
    hf.load_state_dict({k: torch.from_numpy(a) for k, a in sd.items()}, strict=True)
    prompt = prompt_ids(processor.tokenizer, model.cfg)
    feats = whisper_features(processor, waves, 2, model.cfg)
    # the reference encoder with SDPA attention (the same attention, twice as fast on the CPU as eager
    # over 1500 frames); then eager, which the cross-attention weights need
    with torch.no_grad():
        enc = hf.model.encoder(torch.from_numpy(feats)).last_hidden_state
    hf.set_attn_implementation("eager")
    assert hf.model.decoder.config._attn_implementation == "eager"
    for b, (wave, text, g) in enumerate(zip(waves, texts, base["got"])):
        toks = processor.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        assert g.tokens == toks
        with torch.no_grad():
            out = hf(encoder_outputs=(enc[b:b + 1],), decoder_input_ids=torch.tensor([prompt + toks]),
                     output_attentions=True)
        gen = GenerateEncoderDecoderOutput(sequences=torch.tensor([prompt + toks + [model.cfg.eos_token_id]]),
                                           cross_attentions=(out.cross_attentions,))
        # transformers' rows start one query later than ours (module docstring): starting its DTW at the
        # query before the first text token gives it the same rows
        ts = hf._extract_token_timestamps(gen, [list(h) for h in heads], num_frames=-(-len(wave) // 160),
                                          num_input_ids=len(prompt) - 1)[0].numpy()
        ref = ts[len(prompt) - 1:len(prompt) + len(toks)]
        assert g.times.shape == ref.shape == (len(toks) + 1,)
        diff = np.abs(g.times - ref)
        assert np.mean(diff < 1e-6) >= SAME_FRAME and diff.max() <= MAX_SECONDS, (g.times, ref)
        # the words are the transcript's, in order, with monotonic times inside the clip
        assert [w.text for w in g.words] == text.split()
        starts = np.array([w.start for w in g.words])
        ends = np.array([w.end for w in g.words])
        assert np.all(np.diff(starts) >= 0) and np.all(ends >= starts) and ends[-1] <= len(wave) / 16000 + 0.02
        assert ends[-1] > 0.5 * len(wave) / 16000  # the path crosses the clip, not a corner of it


@pytest.mark.slow
def test_word_alignments_file(base, tmp_path, monkeypatch):
    """`eval --oracle`'s alignment step: the installed Whisper base (found as `--model whisper-base`
    finds it) aligns each manifest row once; the file is reused while the texts stay the same."""
    from affjax.data.manifest import ManifestRow
    from affjax.eval import oracle

    monkeypatch.setenv("AFFJAX_CACHE", str(base["cache"]))
    loads = []
    monkeypatch.setattr(oracle, "load_whisper", lambda ckpt: loads.append(ckpt) or
                        (base["model"], base["processor"], base["hcfg"]))  # already loaded (and compiled)
    rows = [ManifestRow(k + 1, it["id"], {"audio": str(it["audio"]), "reference": it["text"]}, None)
            for k, (it, _) in enumerate(base["clips"])]
    path = tmp_path / "alignment.jsonl"
    words = oracle.word_alignments(rows, "asr", path, batch_size=2, log=lambda s: None)
    assert loads == [base["ckpt"]]
    for r, g in zip(rows, base["got"]):
        assert words[r.id] == g.words
    stored = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["id"], r["source"], r["text"]) for r in stored] == [(r.id, "reference", r.item["reference"])
                                                                  for r in rows]
    again = oracle.word_alignments(rows, "asr", path, batch_size=2, log=lambda s: None)
    assert again == words and len(loads) == 1  # read back, nothing aligned
    texts = []
    monkeypatch.setattr(oracle, "align", lambda model, proc, heads, waves, t, **kw: texts.append(t) or base["got"][:1])
    rows[0].item["reference"] += " extra"       # a changed text is aligned again, alone
    oracle.word_alignments(rows, "asr", path, batch_size=2, log=lambda s: None)
    assert texts == [[rows[0].item["reference"]]]
