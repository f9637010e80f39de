"""Whisper (encoder + decoder + greedy transcription) against transformers, on REAL weights.

Real assets (skipped with the install command when missing): Whisper tiny.en and base
(multilingual) in CTranslate2 float16 format, and five LibriVox read-speech clips. Both models'
geometry and prompts are checked; the parity runs use tiny.en (base runs the same code, and
tests/test_whisper_eval.py transcribes real speech with it). The float16 weights are widened to
float32 for both sides, so both models hold identical numbers and the only differences are
float32 rounding. Tolerances: encoder output relative to its magnitude 1e-4, decoder logits 1e-3
absolute; greedy tokens identical to `generate`.

Without assets: the CT2 reader on a synthetic file, the CT2 -> HF mapping, and the decoder
(full pass, KV-cache steps, cross-attention mask and key bias) on a tiny random HF Whisper.
"""

from __future__ import annotations

import functools
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import need_asset, need_module

torch = need_module("torch")

from affjax.models.layers import abstract_module  # noqa: E402
from affjax.models.whisper import ct2 as ct2mod  # noqa: E402
from affjax.runtime.compiles import TRACES  # noqa: E402
from affjax.models.whisper.decoding import (  # noqa: E402
    encode, greedy_tokens, prompt_ids, transcribe, whisper_features)
from affjax.models.whisper.modeling import Whisper, WhisperConfig  # noqa: E402

BATCH = 5  # fixed batch size: the 5 clips (the encoder runs every row, padding rows too: no spare rows)
MAX_NEW = 128


# ----------------------------------------------------------------------------------------------
# No assets needed


def _ct2_str(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def _ct2_var(name: str, arr: np.ndarray, code: int) -> bytes:
    raw = arr.tobytes()
    return (_ct2_str(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
            + struct.pack("<B", code) + struct.pack("<I", len(raw)) + raw)


def test_read_ct2_synthetic(tmp_path):
    f16 = (np.arange(6, dtype=np.float16) / 4).reshape(2, 3)
    f32 = np.array([1.5, -2.0], np.float32)
    bf16 = np.array([0x3F80, 0xC000], np.uint16)  # 1.0, -2.0
    data = (struct.pack("<I", 6) + _ct2_str("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", 4)
            + _ct2_var("a/weight", f16, 4) + _ct2_var("b", f32, 0) + _ct2_var("c", bf16, 5)
            + _ct2_var("flag", np.array(7, np.int8), 1)
            + struct.pack("<I", 1) + _ct2_str("proj/weight") + _ct2_str("a/weight"))
    p = tmp_path / "model.bin"
    p.write_bytes(data)
    v, meta = ct2mod.read_ct2(p, with_meta=True)
    assert meta["spec"] == "WhisperSpec" and meta["revision"] == 3
    assert v["a/weight"].dtype == np.float16 and np.array_equal(v["a/weight"], f16)
    assert np.array_equal(v["b"], f32) and np.array_equal(v["c"], [1.0, -2.0])
    assert v["flag"].shape == () and int(v["flag"]) == 7
    assert v["proj/weight"] is v["a/weight"]
    p.write_bytes(data[:60])
    with pytest.raises(ct2mod.CT2Error, match="truncated"):
        ct2mod.read_ct2(p)
    p.write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(ct2mod.CT2Error, match="version 5"):
        ct2mod.read_ct2(p)


def _tiny_hf(vocab=120, d=64, layers=2, heads=4, seed=0):
    from transformers import WhisperConfig as HFConfig
    from transformers import WhisperForConditionalGeneration

    cfg = HFConfig(vocab_size=vocab, num_mel_bins=16, d_model=d, encoder_layers=layers, decoder_layers=layers,
                   encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d,
                   decoder_ffn_dim=2 * d, max_source_positions=40, max_target_positions=32,
                   pad_token_id=vocab - 3, bos_token_id=vocab - 3, eos_token_id=vocab - 3,
                   decoder_start_token_id=vocab - 2, suppress_tokens=None, begin_suppress_tokens=None)
    torch.manual_seed(seed)
    m = WhisperForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero biases, varied norm weights; the embedding stays tied to proj_out
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)  # logits of a useful size
            else:
                p.copy_(0.05 * noise)
    return m.eval(), cfg


def _hf_to_ct2(sd: dict, n_enc: int, n_dec: int) -> dict:
    """The inverse mapping (what CTranslate2's converter writes), for a round-trip test."""
    g = lambda k: sd[k].detach().numpy().astype(np.float16)
    z = lambda k: np.zeros_like(g(k))
    v = {"encoder/conv1/weight": g("model.encoder.conv1.weight"), "encoder/conv1/bias": g("model.encoder.conv1.bias"),
         "encoder/conv2/weight": g("model.encoder.conv2.weight"), "encoder/conv2/bias": g("model.encoder.conv2.bias"),
         "encoder/position_encodings/encodings": g("model.encoder.embed_positions.weight"),
         "encoder/layer_norm/gamma": g("model.encoder.layer_norm.weight"),
         "encoder/layer_norm/beta": g("model.encoder.layer_norm.bias"),
         "decoder/embeddings/weight": g("model.decoder.embed_tokens.weight"),
         "decoder/position_encodings/encodings": g("model.decoder.embed_positions.weight"),
         "decoder/layer_norm/gamma": g("model.decoder.layer_norm.weight"),
         "decoder/layer_norm/beta": g("model.decoder.layer_norm.bias"),
         "encoder/num_heads": np.array(4, np.int16), "decoder/scale_embeddings": np.array(0, np.int8)}
    v["decoder/projection/weight"] = v["decoder/embeddings/weight"]

    def common(c, h):
        a = f"{h}.self_attn"
        v[f"{c}/self_attention/linear_0/weight"] = np.concatenate([g(f"{a}.{p}_proj.weight") for p in "qkv"])
        v[f"{c}/self_attention/linear_0/bias"] = np.concatenate(
            [g(f"{a}.q_proj.bias"), z(f"{a}.q_proj.bias"), g(f"{a}.v_proj.bias")])
        v[f"{c}/self_attention/linear_1/weight"] = g(f"{a}.out_proj.weight")
        v[f"{c}/self_attention/linear_1/bias"] = g(f"{a}.out_proj.bias")
        v[f"{c}/self_attention/layer_norm/gamma"] = g(f"{h}.self_attn_layer_norm.weight")
        v[f"{c}/self_attention/layer_norm/beta"] = g(f"{h}.self_attn_layer_norm.bias")
        for i, n in enumerate(("fc1", "fc2")):
            v[f"{c}/ffn/linear_{i}/weight"] = g(f"{h}.{n}.weight")
            v[f"{c}/ffn/linear_{i}/bias"] = g(f"{h}.{n}.bias")
        v[f"{c}/ffn/layer_norm/gamma"] = g(f"{h}.final_layer_norm.weight")
        v[f"{c}/ffn/layer_norm/beta"] = g(f"{h}.final_layer_norm.bias")

    for i in range(n_enc):
        common(f"encoder/layer_{i}", f"model.encoder.layers.{i}")
    for i in range(n_dec):
        c, h = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        common(c, h)
        a = f"{h}.encoder_attn"
        v[f"{c}/attention/linear_0/weight"] = g(f"{a}.q_proj.weight")
        v[f"{c}/attention/linear_0/bias"] = g(f"{a}.q_proj.bias")
        v[f"{c}/attention/linear_1/weight"] = np.concatenate([g(f"{a}.k_proj.weight"), g(f"{a}.v_proj.weight")])
        v[f"{c}/attention/linear_1/bias"] = np.concatenate([z(f"{a}.v_proj.bias"), g(f"{a}.v_proj.bias")])
        v[f"{c}/attention/linear_2/weight"] = g(f"{a}.out_proj.weight")
        v[f"{c}/attention/linear_2/bias"] = g(f"{a}.out_proj.bias")
        v[f"{c}/attention/layer_norm/gamma"] = g(f"{h}.encoder_attn_layer_norm.weight")
        v[f"{c}/attention/layer_norm/beta"] = g(f"{h}.encoder_attn_layer_norm.bias")
    return v


@pytest.fixture(scope="module")
def tiny_random():
    from flax import nnx

    from affjax.models.whisper.params import KEYS, TIED_KEYS
    from affjax.models.weights import KeyTable, load_streaming

    hf, hcfg = _tiny_hf()
    sd = hf.state_dict()
    # CT2 round trip: HF -> CT2 layout -> HF keys (exact after float16)
    back = ct2mod.ct2_to_hf_state_dict(_hf_to_ct2(sd, 2, 2), hcfg.to_dict())
    assert set(back) == set(sd)
    for k, a in back.items():
        np.testing.assert_array_equal(a, sd[k].detach().numpy().astype(np.float16), err_msg=k)
    with torch.no_grad():  # both sides use the float16-rounded weights from here on
        hf.load_state_dict({k: torch.from_numpy(a.astype(np.float32)) for k, a in back.items()}, strict=True)
    cfg = WhisperConfig.from_hf(hcfg.to_dict())
    abstract = abstract_module(lambda rngs: Whisper(cfg, rngs=rngs))
    state = load_streaming(abstract, KeyTable(KEYS), ((k, lambda a=a: a) for k, a in back.items()),
                           ignore=lambda k: k in TIED_KEYS)
    return hf, nnx.merge(nnx.graphdef(abstract), state), cfg


def test_tiny_random_decoder_full_and_incremental(tiny_random):
    hf, model, cfg = tiny_random
    rng = np.random.default_rng(0)
    b, t = 3, 12
    feats = rng.standard_normal((b, 16, 80)).astype(np.float32)
    toks = rng.integers(0, cfg.vocab_size, (b, t))
    with torch.no_grad():
        ref = hf(input_features=torch.from_numpy(feats), decoder_input_ids=torch.from_numpy(toks)).logits.numpy()
        enc_ref = hf.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    enc = jax.jit(lambda m, x: m(x))(model.encoder, jnp.asarray(feats))
    np.testing.assert_allclose(np.asarray(enc), enc_ref, atol=1e-4)
    full = np.asarray(jax.jit(lambda m, x, t: m(x, t))(model, jnp.asarray(feats), jnp.asarray(toks)))
    np.testing.assert_allclose(full, ref, atol=1e-4, rtol=0)
    # incremental: a 5-token prefill, then one token at a time, through a fixed 20-slot cache
    dec = model.decoder
    step = jax.jit(lambda d, t, pos, cache, cross: d.step(t, pos, cache, cross))
    cross = jax.jit(lambda d, e: d.cross_kv(e))(dec, enc)
    cache = dec.init_cache(b, 20)
    lg, cache = step(dec, jnp.asarray(toks[:, :5]), 0, cache, cross)
    steps = [np.asarray(lg)]
    for i in range(5, t):
        lg, cache = step(dec, jnp.asarray(toks[:, i:i + 1]), i, cache, cross)
        steps.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(steps, 1), ref, atol=1e-4, rtol=0)


def test_tiny_random_cross_attention_mask_and_bias(tiny_random):
    _, model, cfg = tiny_random
    rng = np.random.default_rng(1)
    enc = jnp.asarray(rng.standard_normal((2, 10, cfg.d_model)).astype(np.float32))
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)))
    dec = jax.jit(lambda d, t, e, v=None, b=None: d(t, e, enc_valid=v, enc_bias=b))
    dec = functools.partial(dec, model.decoder)
    # masking keys == dropping them
    valid = jnp.asarray([[True] * 7 + [False] * 3, [True] * 10])
    masked = dec(toks, enc, valid)
    np.testing.assert_allclose(np.asarray(masked[0]), np.asarray(dec(toks[:1], enc[:1, :7]))[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(masked[1]), np.asarray(dec(toks[1:], enc[1:]))[0], atol=1e-5)
    # a frame repeated n times == that frame once with key bias log(n) (what pooled outputs use)
    rep = jnp.concatenate([enc[:, :3], jnp.repeat(enc[:, 3:4], 4, axis=1), enc[:, 4:]], axis=1)
    bias = jnp.zeros((2, 10)).at[:, 3].set(jnp.log(4.0))
    np.testing.assert_allclose(np.asarray(dec(toks, enc, None, bias)), np.asarray(dec(toks, rep)), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Real weights and real speech


@pytest.fixture(scope="module")
def clips(librivox):
    return [it["id"] for it, _ in librivox], [x for _, x in librivox], [it["text"] for it, _ in librivox]


_REAL = {}


def _real(name, clips, real_whisper):
    """JAX model + processor (saved and reloaded), the HF reference from the same weights, and
    everything both sides computed on the five clips (shared by the tests of one model)."""
    if name in _REAL:
        return _REAL[name]
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor
    from transformers import WhisperConfig as HFConfig
    from transformers.modeling_outputs import BaseModelOutput

    from affjax.data.assets import whisper_ct2_dir
    d = need_asset(whisper_ct2_dir, name)
    pdir, _, model, _, hcfg = real_whisper(name)  # converted by the checkpoint converter, as jobs do
    processor = WhisperProcessor.from_pretrained(pdir)  # the saved processor, offline
    gen = GenerationConfig.from_pretrained(pdir)

    sd = ct2mod.ct2_to_hf_state_dict(ct2mod.read_ct2(d / "model.bin"), hcfg, dtype=np.float32)
    hf = WhisperForConditionalGeneration(HFConfig(**hcfg)).eval()
    hf.load_state_dict({k: torch.from_numpy(a) for k, a in sd.items()}, strict=True)
    del sd

    _, waves, _ = clips
    feats = whisper_features(processor, waves, BATCH, model.cfg)  # ['5 80 3000']
    with torch.no_grad():
        enc_ref = hf.model.encoder(torch.from_numpy(feats[:5])).last_hidden_state
        out = hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc_ref), generation_config=gen,
                          max_new_tokens=MAX_NEW)
    eos = model.cfg.eos_token_id
    ref_tokens = []
    for row in out.tolist():
        ref_tokens.append(row[:row.index(eos)] if eos in row else row)
    prompt = prompt_ids(processor.tokenizer, model.cfg)
    with jax.default_matmul_precision("highest"):
        enc = encode(model, feats)
        tokens, finished = greedy_tokens(model, enc, 5, prompt, max_new_tokens=MAX_NEW)
    r = dict(model=model, processor=processor, hf=hf, hcfg=hcfg, feats=feats, enc_ref=enc_ref.numpy(),
             enc=np.asarray(enc), ref_tokens=ref_tokens, tokens=tokens, finished=finished, prompt=prompt)
    _REAL[name] = r
    return r


@pytest.fixture(scope="module")
def real(clips, real_whisper):
    """The parity runs use tiny.en: base runs the same code (its real-speech WER and pooling are
    in tests/test_whisper_eval.py, its bf16 gate in tests/test_bf16.py)."""
    return "tiny.en", _real("tiny.en", clips, real_whisper)


@pytest.mark.parametrize("name", ["base", "tiny.en"])
def test_real_config_and_prompt(name, real_whisper):
    _, _, model, processor, hc = real_whisper(name)
    cfg, tok = model.cfg, processor.tokenizer
    geometry = {"base": (512, 6, 8, 51865, True), "tiny.en": (384, 4, 6, 51864, False)}[name]
    assert (hc["d_model"], hc["encoder_layers"], hc["encoder_attention_heads"], hc["vocab_size"],
            cfg.is_multilingual) == geometry
    assert len(tok) == cfg.vocab_size
    expected = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"] if cfg.is_multilingual \
        else ["<|startoftranscript|>", "<|notimestamps|>"]
    prompt = prompt_ids(tok, cfg)
    assert tok.convert_ids_to_tokens(prompt) == expected
    kw = dict(language="en", task="transcribe") if cfg.is_multilingual else {}
    assert prompt == [cfg.decoder_start_token_id] + [i for _, i in tok.get_decoder_prompt_ids(**kw)]


def test_real_encoder_matches_transformers(real):
    name, r = real
    # float32 on both sides; XLA:CPU and PyTorch sum the layers in different orders: the gap scales with
    # the output's magnitude, so it is bounded relative to it (1e-3 absolute failed on base: 1.3e-3)
    diff = np.abs(r["enc"][:5] - r["enc_ref"])
    scale = np.abs(r["enc_ref"]).max()
    assert diff.max() < 1e-4 * scale, f"{name}: encoder max |diff| {diff.max():.2e} (max |ref| {scale:.1f})"


def test_real_decoder_logits_match_transformers(real):
    name, r = real
    model, hf = r["model"], r["hf"]
    eos = model.cfg.eos_token_id
    toks = np.array([r["prompt"] + (t + [eos] * 24)[:24] for t in r["ref_tokens"]])  # prompt + 24 tokens
    with torch.no_grad():
        h = hf.model.decoder(input_ids=torch.from_numpy(toks),
                             encoder_hidden_states=torch.from_numpy(r["enc_ref"])).last_hidden_state
        ref = hf.proj_out(h).numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lambda d, t, e: d(t, e))(model.decoder, jnp.asarray(toks), jnp.asarray(r["enc_ref"])))
    diff = np.abs(got - ref)
    assert diff.max() < 1e-3, f"{name}: logits max |diff| {diff.max():.2e} (logits up to {np.abs(ref).max():.0f})"


def test_real_greedy_matches_generate(real):
    name, r = real
    assert all(r["finished"])
    assert r["tokens"] == r["ref_tokens"], name
    tok = r["processor"].tokenizer
    texts = [tok.decode(t, skip_special_tokens=True).strip() for t in r["tokens"]]
    assert all(texts)


def test_real_wer(real, clips):
    import jiwer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    name, r = real
    norm = EnglishTextNormalizer({})
    tok = r["processor"].tokenizer
    hyp = [norm(tok.decode(t, skip_special_tokens=True)) for t in r["tokens"]]
    ref = [norm(t) for t in clips[2]]
    wer = jiwer.wer(ref, hyp)
    # tiny.en hears "ill disposed" as "old-sposed"
    assert wer <= 0.10, f"{name}: WER {wer:.3f}\n" + "\n".join(f"  {h!r} | {t!r}" for h, t in zip(hyp, ref))


@pytest.mark.slow
def test_real_transcribe_compiles_once(clips, real_whisper):
    """The public API with a fixed batch size of 5: a second batch of different content (3 of the
    clips, reversed, so 2 padding rows) compiles neither the encoder nor the greedy loop again
    (the first batch, the 5 clips, went through the same jitted functions in the fixture) and
    gives each clip the tokens it got in the first batch."""
    r = _real("tiny.en", clips, real_whisper)
    _, waves, _ = clips
    counts = dict(TRACES)
    assert counts["whisper_encode"] >= 1 and counts["whisper_greedy"] >= 1
    with jax.default_matmul_precision("highest"):
        out = transcribe(r["model"], r["processor"], waves[4:1:-1], batch_size=BATCH, max_new_tokens=MAX_NEW)
    assert dict(TRACES) == counts, f"recompiled: {counts} -> {dict(TRACES)}"
    assert out.tokens == r["tokens"][4:1:-1] and all(out.finished)
    tok = r["processor"].tokenizer
    assert out.texts == [tok.decode(t, skip_special_tokens=True).strip() for t in r["ref_tokens"][4:1:-1]]
    assert out.texts[-1].startswith("Unless to be rather cold-hearted")
    assert len({len(t) for t in out.tokens}) > 1  # rows stop at different steps
