"""The Whisper pooling sweep (`affjax bench-whisper-pooling`) and what it is built on: the
fixed-rate controls (uniform average pooling, uniform dropping), suppressed tokens in greedy
decoding, and piper speech.

No assets needed: the controls against a plain numpy reference; suppression against transformers'
`generate` on a tiny random Whisper (torch). Real assets (skipped with the install command when
missing): controls that keep every frame reproduce the unpooled transcripts (Whisper tiny.en); a
tiny sweep end to end, resumed; piper generation (skipped when piper is not installed).

The two real-asset decoding tests run the same batch (the first two LibriVox clips, batch size 2,
up to 128 new tokens) as tests/test_whisper_eval.py, so they share compiled programs with each
other and, through the run's persistent compile cache, with that module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import missing, need_asset, need_module
from affjax.models.layers import abstract_module
from affjax.models.whisper import asr
from affjax.pooling import uniform

# ----------------------------------------------------------------------------------------------
# Controls vs a numpy reference


def ref_uniform(h, span, valid, pos, size, k, kind):
    """One row, plainly: the audio span split into k groups (avg) or k kept frames (drop); every
    other valid frame kept. Returns the packed outputs as lists."""
    audio = [t for t in range(len(h)) if valid[t] and span[t] > 0]
    n = len(audio)
    k = min(max(k, 1), max(n, 1))
    groups = []  # lists of input positions, in order
    if kind == "avg":
        members = {}
        for i, t in enumerate(audio):
            members.setdefault(i * k // n, []).append(t)
        starts = {m[0]: m for m in members.values()}
    else:
        kept = {audio[(2 * j + 1) * n // (2 * k)] for j in range(k)} if n else set()
        starts = {t: [t] for t in kept}
    for t in range(len(h)):
        if valid[t] and span[t] <= 0:
            groups.append([t])
        elif t in starts:
            groups.append(starts[t])
    return {
        "h": [np.mean([h[t] for t in g], axis=0) for g in groups],
        "pos": [pos[g[0]] for g in groups],
        "size": [sum(size[t] for t in g) for g in groups],
        "span": [span[g[0]] for g in groups],
        "audio_out": sum(1 for g in groups if span[g[0]] > 0),
        "audio_in": n,
    }


@pytest.mark.parametrize("kind", uniform.CONTROLS)
def test_uniform_stage_matches_numpy(kind):
    rng = np.random.default_rng(0)
    b, n, d = 4, 23, 5
    h = rng.standard_normal((b, n, d)).astype(np.float32)
    # row 0: clip of 17 frames then 6 padding frames (kept); row 1: all clip; row 2: a batch
    # padding row; row 3: clip of 1 frame. Sizes > 1, as at a chained stage.
    frames = np.array([17, 23, 0, 1])
    valid = np.array([[True] * n, [True] * n, [False] * n, [True] * n])
    span = ((np.arange(n)[None] < frames[:, None]) & valid).astype(np.int32)
    size = rng.integers(1, 4, (b, n)).astype(np.float32)
    pos = np.broadcast_to(np.arange(n, dtype=np.float32), (b, n))
    cases = [[1, 23, 5, 1], [5, 7, 1, 3], [16, 22, 9, 1], [17, 40, 1, 1], [3, 1, 2, 2]]  # > n is clipped
    for groups in cases:
        out = uniform.uniform_stage_jit(jnp.asarray(h), jnp.asarray(span), jnp.asarray(valid), jnp.asarray(pos),
                                    jnp.asarray(size), jnp.asarray(groups), kind=kind, capacity=n)
        for r in range(b):
            ref = ref_uniform(h[r], span[r], valid[r], pos[r], size[r], groups[r], kind)
            m = len(ref["h"])
            assert int(out.n_valid[r]) == m, (groups, r)
            assert int(out.audio_out[r]) == ref["audio_out"] and int(out.audio_in[r]) == ref["audio_in"]
            assert np.asarray(out.valid[r]).tolist() == [True] * m + [False] * (n - m)
            if m:
                np.testing.assert_allclose(np.asarray(out.h[r, :m]), np.stack(ref["h"]), rtol=1e-6, atol=1e-6)
            assert not np.asarray(out.h[r, m:]).any()
            assert np.asarray(out.pos[r, :m]).tolist() == ref["pos"]
            assert np.asarray(out.size[r, :m]).tolist() == ref["size"]
            assert np.asarray(out.span[r, :m]).tolist() == ref["span"]
    # equal retention: the count asked for is the count kept (when the clip has that many frames)
    assert np.asarray(out.audio_out).tolist() == [3, 1, 0, 1]


def test_uniform_stage_shapes_are_static():
    """One compile serves every k (groups is traced)."""
    h = jnp.ones((2, 12, 3))
    span = jnp.ones((2, 12), jnp.int32)
    valid = jnp.ones((2, 12), bool)
    pos = jnp.zeros((2, 12))
    traces = []

    def stage(*args, **kw):
        traces.append(1)
        return uniform.uniform_stage(*args, **kw)

    f = jax.jit(stage, static_argnames=("kind", "capacity"))
    for g in ([1, 2], [12, 3], [6, 6]):
        f(h, span, valid, pos, pos + 1, jnp.asarray(g, jnp.int32), kind="avg", capacity=12)
    assert len(traces) == 1


def test_encoder_stage_compiles_once_for_every_tau():
    """The Whisper similarity stage passes tau traced: a threshold sweep runs one stage program
    (a state of 2 x 24 frames, width 5: a shape no other test uses), with each tau's own counts."""
    from affjax.pooling.affinity import pool_stage_jit
    from affjax.pooling.spec import Stage
    rng = np.random.default_rng(0)
    b, n = 2, 24
    x = np.repeat(rng.normal(size=(b, n // 3, 5)), 3, axis=1) + 0.3 * rng.normal(size=(b, n, 5))
    frames = np.array([n, 17])
    audio = np.arange(n)[None, :] < frames[:, None]
    st = asr.EncoderState(
        x=jnp.asarray(x, jnp.float32), valid=jnp.ones((b, n), bool), span=jnp.asarray(audio.astype(np.int32)),
        size=jnp.ones((b, n)), pos=jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (b, n)), key_valid=None,
        bias=None, present=np.full(b, n), layer_tokens=np.zeros((b, 4), np.int64),
        audio_tokens=[audio.sum(1)], buffers=[])
    before = pool_stage_jit._cache_size()
    kept = [asr.encoder_stage(st, Stage(4, tau, 1), buckets=(8, 16, n)).audio_tokens[-1].tolist()
            for tau in (1.1, 0.9, 0.5, -1.0)]
    assert pool_stage_jit._cache_size() - before == 1
    assert kept[0] == frames.tolist() and kept[-1] == [1, 1], kept
    assert len({tuple(k) for k in kept}) >= 3, kept


# ----------------------------------------------------------------------------------------------
# Suppressed tokens vs transformers' generate (tiny random Whisper)


@pytest.mark.slow
def test_greedy_suppression_matches_generate():
    torch = need_module("torch")
    from flax import nnx
    from transformers import GenerationConfig
    from transformers.modeling_outputs import BaseModelOutput

    from affjax.models.whisper.decoding import greedy_decode
    from affjax.models.whisper.modeling import Whisper, WhisperConfig
    from affjax.models.whisper.params import KEYS, TIED_KEYS
    from affjax.models.weights import KeyTable, load_streaming
    sys.path.insert(0, str(Path(__file__).parent))
    from test_whisper import _tiny_hf

    hf, hcfg = _tiny_hf(seed=3)
    v = hcfg.vocab_size
    cfg = WhisperConfig.from_hf(hcfg.to_dict())
    abstract = abstract_module(lambda rngs: Whisper(cfg, rngs=rngs))
    sd = {k: t.detach().numpy() for k, t in hf.state_dict().items()}
    state = load_streaming(abstract, KeyTable(KEYS), ((k, lambda a=a: a) for k, a in sd.items()),
                           ignore=lambda k: k in TIED_KEYS)
    model = nnx.merge(nnx.graphdef(abstract), state)
    feats = np.random.default_rng(0).standard_normal((3, 16, 80)).astype(np.float32)
    prompt = [v - 2, 5, 7]
    with torch.no_grad():
        enc_ref = hf.model.encoder(torch.from_numpy(feats)).last_hidden_state
    enc = jax.jit(lambda m, x: m(x))(model.encoder, jnp.asarray(feats))

    def both(suppress, begin):
        gen = GenerationConfig(decoder_start_token_id=v - 2, eos_token_id=v - 3, pad_token_id=v - 3,
                               bos_token_id=v - 3, do_sample=False, num_beams=1, max_new_tokens=8,
                               suppress_tokens=suppress, begin_suppress_tokens=begin)
        with torch.no_grad():
            ref = hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc_ref),
                              decoder_input_ids=torch.tensor([prompt] * 3), generation_config=gen).numpy()
        model.decoder.cfg = dataclasses.replace(cfg, suppress_tokens=tuple(suppress or ()),
                                                begin_suppress_tokens=tuple(begin or ()))
        with jax.default_matmul_precision("highest"):
            toks, _ = greedy_decode(model.decoder, enc, jnp.asarray(prompt), jnp.ones(3, bool), max_new_tokens=8)
        got = np.asarray(toks)[:, len(prompt):]
        np.testing.assert_array_equal(got, ref[:, -8:], err_msg=f"suppress {suppress}, begin {begin}")
        return got

    free = both(None, None)
    top = int(np.bincount(free.ravel()).argmax())
    sup = both([top], None)
    assert top not in sup  # suppression changed the output
    first = int(sup[0, 0])
    beg = both([top], [first])
    assert beg[0, 0] != first  # only the first generated token avoids `begin`


# ----------------------------------------------------------------------------------------------
# Real assets


def _skip_missing(fn):
    return need_asset(fn)


@pytest.fixture(scope="module")
def tiny_en(real_whisper, librivox):
    _, _, model, processor, _ = real_whisper("tiny.en")
    return model, processor, [x for _, x in librivox[:2]]


def test_suppress_tokens_come_from_the_ct2_config(tiny_en):
    model, _, _ = tiny_en
    assert len(model.cfg.suppress_tokens) > 50 and model.cfg.eos_token_id in model.cfg.begin_suppress_tokens
    assert model.decoder.cfg.suppress_tokens == model.cfg.suppress_tokens


@pytest.mark.slow
def test_controls_keeping_every_frame_are_unpooled(tiny_en):
    """r = 1 (k = the clip's frames): uniform average and uniform dropping, at the encoder output
    and after layer 2, with and without proportional (sizes are all 1, so the bias is 0): the
    unpooled transcripts (two clips, a batch of 2, as the sweep below runs them)."""
    from affjax.models.whisper.decoding import prompt_ids, whisper_features
    from affjax.pooling.spec import Stage
    model, processor, waves = tiny_en
    cfg = model.cfg
    prompt = prompt_ids(processor.tokenizer, cfg)
    feats = whisper_features(processor, waves, 2, cfg)
    frames = asr.batch_frames(waves, 2, cfg)
    start = asr.encoder_start(model, feats, frames, len(waves))
    out = asr.encoder_advance(model, start, cfg.encoder.layers)  # the whole unpooled encoder
    base, done = asr.decode_encoded(model, asr.encoder_finish(model, out), prompt, len(waves), 128)
    assert all(base) and all(done)
    deep = asr.encoder_advance(model, start, 2)
    for st, control, prop in ((deep, "avg", True), (deep, "drop", False), (out, "avg", False), (out, "drop", True)):
        e = asr.encoder_finish(model, asr.encoder_stage(st, Stage(st.layer, 0.9, 1), proportional=prop,
                                                        control=control, groups=frames))
        assert e.audio_tokens[:, -1].tolist() == frames.tolist()
        toks, _ = asr.decode_encoded(model, e, prompt, len(waves), 128)
        assert toks == base, (st.layer, control, prop)


@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_resumed(tmp_path, real_whisper, monkeypatch):
    """2 LibriVox clips, Whisper tiny.en, one threshold at the encoder output with the controls:
    the JSON, table and plot; a second run resumes (computes no cell again). `--model` finds the
    session's converted tiny.en in $AFFJAX_CACHE (converted once per run, never into ~/.cache); the
    first run loads it, the later runs of this process reuse that load."""
    from affjax.bench import whisper_pooling as bwp
    _skip_missing(lambda: __import__("affjax.data.assets", fromlist=["x"]).librivox_items())
    monkeypatch.setenv("AFFJAX_CACHE", str(real_whisper("tiny.en")[1]))
    loads, load = [], bwp.load_installed
    monkeypatch.setattr(bwp, "load_installed", functools.cache(lambda name: loads.append(name) or load(name)))
    cfg = bwp.SweepConfig(model="whisper-tiny.en", taus=(0.9,), windows=(1,), stages=("out",), control_taus=(0.9,),
                          utterances=0, librivox=2, max_new_tokens=128, out=str(tmp_path / "res"),
                          work=str(tmp_path / "work"), name="sweep", progress=False)
    doc = bwp.run_sweep(cfg, log=lambda *a: None)
    keys = [s["key"] for s in bwp.cell_specs(cfg)]
    assert keys == ["out/w1/tau0.9/sim", "out/w1/tau0.9/sim+prop", "out/w1/tau0.9/avg", "out/w1/tau0.9/avg+prop",
                    "out/w1/tau0.9/drop"]
    saved = json.loads((tmp_path / "res" / "sweep.json").read_text())
    assert saved["cells"].keys() == set(keys) and saved["setup"]["items"] == doc["setup"]["items"]
    assert len(saved["unpooled"]["texts"]) == 2 and saved["unpooled"]["wer"] <= 0.1
    sim = saved["cells"]["out/w1/tau0.9/sim"]
    for key in keys:
        c = saved["cells"][key]
        for field in ("retention", "wer", "changed", "encoder_flops_rel", "decoder_flops_rel", "seconds", "kept",
                      "unfinished", "wer_librivox"):
            assert field in c, (key, field)
        assert c["kept"] == sim["kept"] and c["retention"] == sim["retention"] < 1  # equal retention
        assert c["encoder_flops_rel"] == 1.0 and c["decoder_flops_rel"] < 1
    table = (tmp_path / "res" / "sweep_table.md").read_text()
    assert "### Stage: encoder output" in table and "| 1 | 0.9 |" in table and "Largest cut" in table
    assert (tmp_path / "res" / "sweep.png").stat().st_size > 10_000
    g = saved["group_stats"]["out/w1/tau0.9"]
    assert g["retention"] == sim["retention"] and g["weighted_mean_size"] >= g["mean_size"] > 1
    assert "How Affinity Pooling groups the frames" in table
    assert len((tmp_path / "work" / "transcripts.jsonl").read_text().splitlines()) == 5

    again = bwp.run_sweep(cfg, log=lambda *a: None)
    assert {k: c["seconds"] for k, c in again["cells"].items()} == {k: c["seconds"] for k, c in saved["cells"].items()}
    assert len((tmp_path / "work" / "transcripts.jsonl").read_text().splitlines()) == 5
    with pytest.raises(ValueError, match="another setup"):
        bwp.run_sweep(dataclasses.replace(cfg, librivox=1), log=lambda *a: None)
    assert loads == ["whisper-tiny.en"]


def test_tts_texts():
    from affjax.data.tts import tts_texts
    items = tts_texts()
    assert len(items) >= 30 and len({it["id"] for it in items}) == len(items)
    assert all(len(it["text"].split()) >= 15 for it in items)
    assert tts_texts(3) == items[:3]


def test_piper_generation(tmp_path):
    from affjax.data import tts
    reason = tts.piper_missing()
    if reason:
        missing(reason)  # piper and its voice ship in the assets extra
    text = "The committee met on Tuesday and approved a budget of three million dollars."
    (wave,) = tts.synthesize([text], cache_dir=tmp_path)
    seconds = len(wave) / tts.SAMPLE_RATE
    words = len(text.split())
    assert words / 5 < seconds < words / 1.5, seconds  # fluent speech: 1.5 to 5 words a second
    assert wave.dtype == np.float32 and 0.2 < np.abs(wave).max() <= 1.0
    files = list(tmp_path.glob("*.wav"))
    assert len(files) == 1
    (again,) = tts.synthesize([text], cache_dir=tmp_path)  # read back from the cache
    np.testing.assert_array_equal(again, wave)
