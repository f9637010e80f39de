"""Kimi-Audio through the jobs (engine, `affjax score / generate / eval`) against the PyTorch
reference (tests/kimi_reference.py, float32) on the tiny random release of tests/test_kimi_audio.py:

- greedy decoding: the engine's jitted loop (each step feeds (audio blank, token)) gives the
  reference's greedy tokens for a padded batch of a 2 s and a 12 s clip;
- Affinity Pooling: an input stage (layer 0, on the fused embeddings) and a deep stage, under each
  position policy, give the continuation log-probs of a reference that pools with the plain
  sequential implementation (tests/pooling_reference.py) and runs the reference's own layers;
- the CLI: score, generate and eval asr on a manifest with a bad item, unpooled and pooled,
  resumable; the unpooled numbers against the reference.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import need_module

torch = need_module("torch")
sf = need_module("soundfile")

from kimi_reference import (  # noqa: E402
    TEXT_BLANK, TEXT_EOS, TOKEN_OFFSET, KimiReference, asr_streams, random_items)
from pooling_reference import gap_tau, ref_cos, ref_stage  # noqa: E402

SECONDS = (2.0, 12.0)
PROMPT_WORDS = (40, 8)
CONTINUATIONS = ("The speaker says hello.", "twelve")
MAX_NEW = 8
DEEP = 2  # the deep stage: after decoder layer 2 of the tiny model's 3


@pytest.fixture(scope="module")
def setup(tiny_kimi_release, tiny_kimi_ckpt):
    """Two items (instruction + clip, random codes) as affjax batches and as the reference's fused
    embeddings, and thresholds from the reference's similarities."""
    from affjax.eval.frontends import load
    from affjax.models.kimi_audio import inputs as ki
    from affjax.models.kimi_audio.tokenizer import encode_text

    model, cfg, frontend = load(tiny_kimi_ckpt)
    tok, fe = frontend.tokenizer, frontend.fe
    ref = KimiReference.from_release(tiny_kimi_release)
    gen, score, items = [], [], []
    for i, (wave, codes, instruction) in enumerate(random_items(SECONDS, PROMPT_WORDS, rng_seed=1, wave_seed=40,
                                                                prompt_seed=10)):
        gen.append(ki.encode(tok, fe, instruction, wave, codes))
        score.append(ki.encode(tok, fe, instruction, wave, codes, CONTINUATIONS[i]))
        feats = [ref.whisper_features(wave)]
        a, t, c = asr_streams(encode_text(tok, instruction), codes)
        prompt = ref.embed(a, t, c, feats)
        a, t, c = asr_streams(encode_text(tok, instruction), codes, score[-1].cont_ids.tolist())
        items.append(SimpleNamespace(prompt=prompt, x=ref.embed(a, t, c, feats), span=np.asarray(c, np.int32),
                                     n_prompt=len(prompt), cont_ids=score[-1].cont_ids))
    mk = lambda encs: ki.collate(encs, batch_size=2, tokens_per_window=cfg.tokens_per_window)  # noqa: E731
    # thresholds near the median of neighbouring codes' similarities, unpooled: input and after layer DEEP
    inp, deep = [], []
    for it in items:
        x0 = it.x.numpy()
        hd = ref.layers(it.x, np.arange(len(x0)), 0, DEEP).numpy()
        for t in np.flatnonzero(it.span[1:] & it.span[:-1]) + 1:
            inp.append(ref_cos(x0[t], x0[t - 1]))
            deep.append(ref_cos(hd[t], hd[t - 1]))
    return SimpleNamespace(model=model, cfg=cfg, frontend=frontend, ref=ref, items=items, gen_batch=mk(gen),
                           score_batch=mk(score), taus=(gap_tau(inp, 0.5), gap_tau(deep, 0.5)))


def test_greedy_tokens_match_reference(setup):
    from affjax.runtime.engine import Engine

    b = setup.gen_batch
    assert b.n_prompt[0] != b.n_prompt[1] and b.valid[1].sum() < b.valid.shape[1]  # mixed lengths, padded
    toks, _ = Engine(setup.model, eos_ids=(TEXT_EOS,), pad_id=TEXT_BLANK).generate(b, MAX_NEW)
    for i, it in enumerate(setup.items):
        want, gap = setup.ref.greedy(it.prompt, MAX_NEW)
        assert gap > 1e-3, f"near-tie in the reference's greedy choice ({gap}); pick another seed"
        assert toks[i] == want, (i, toks[i], want)
    assert all(len(t) == MAX_NEW for t in toks)  # no EOS in 8 steps: every step compared


def test_speech_code_ids_decode_as_the_official_loop(setup):
    """Text output over the whole vocabulary, as kimia_infer does: its sampler takes the argmax of
    the full text logits (no mask to the text ids), a speech-code id is fed back like any token,
    and only the returned text leaves out ids >= kimia_token_offset. With lm_head edited so that
    a speech code beats the best text id at item 0's first step, the engine's greedy tokens are the
    reference's (both pick the code) and the text is that of the tokens without it."""
    import jax.numpy as jnp
    from flax import nnx

    from affjax.runtime.engine import Engine

    code = TOKEN_OFFSET + 7
    head = setup.ref.lm_head.weight
    saved = head.detach().clone()
    edited = saved.clone()
    # 3x the first pick's row: the top logit is positive, so the code's is larger
    edited[code] = 3 * saved[setup.ref.greedy(setup.items[0].prompt, 1)[0][0]]
    try:
        with torch.no_grad():
            head.copy_(edited)
        wants = [setup.ref.greedy(it.prompt, MAX_NEW) for it in setup.items]
    finally:
        with torch.no_grad():
            head.copy_(saved)
    model = nnx.clone(setup.model)
    model.language_model.lm_head[...] = jnp.asarray(edited.numpy())
    toks, _ = Engine(model, eos_ids=(TEXT_EOS,), pad_id=TEXT_BLANK).generate(setup.gen_batch, MAX_NEW)
    for i, (want, gap) in enumerate(wants):
        assert gap > 1e-3, f"near-tie in the reference's greedy choice ({gap})"
        assert toks[i] == want, (i, toks[i], want)
    assert toks[0][0] == code
    kept = [t for t in toks[0] if t < TOKEN_OFFSET]  # what kimia.py's generate decodes
    assert setup.frontend.text(toks[0]) == setup.frontend.text(kept), (toks[0], kept)


def ref_pooled_logprobs(ref, it, stages, positions):
    """The reference of a pooled score: each stage by the plain sequential implementation on the
    reference's fused embeddings (layer 0) or hidden states, the layer groups between stages by
    the reference's own layers -> (log-probs of the continuation, audio tokens after each stage,
    the closest call of any merge decision)."""
    x, span = it.x.numpy(), it.span
    n = len(x)
    pos, size, slot_of = np.arange(n, dtype=np.float32), np.ones(n, np.float32), np.arange(n)
    counts, margin = [int((span > 0).sum())], math.inf
    cuts = [st.layer for st in stages]
    for g, (start, end) in enumerate(zip([0] + cuts, cuts + [len(ref.model.layers)])):
        if g > 0:
            st = stages[g - 1]
            r = ref_stage(x, span, pos, size, tau=st.tau, window=st.window, weighted=st.weighted, positions=positions)
            x, pos, size, span, slot_of = r["h"], r["pos"], r["size"], r["span"], r["group_of"][slot_of]
            counts.append(r["audio_out"])
            margin = min(margin, r["margin"])
        x = ref.layers(torch.from_numpy(x), pos, start, end).numpy()
    k = len(it.cont_ids)
    with torch.no_grad():
        logits = ref.lm_head(ref.model.norm(torch.from_numpy(x[slot_of[it.n_prompt - 1 + np.arange(k)]])))
    return torch.log_softmax(logits, -1)[torch.arange(k), torch.as_tensor(it.cont_ids).long()].numpy(), counts, margin


@pytest.mark.parametrize("positions", ["first", "mean", "reindex"])
def test_pooled_logprobs_match_reference(setup, positions):
    import jax

    from affjax.pooling.spec import parse_pooling
    from affjax.runtime.engine import Engine

    t_in, t_deep = setup.taus
    pooling = parse_pooling(f"0:tau={t_in!r},window=1;{DEEP}:tau={t_deep!r},window=2", setup.cfg.text.layers,
                            positions=positions)
    out = Engine(setup.model, pooling=pooling).prefill(setup.score_batch, score=True)
    lp, stats = np.asarray(out.logprobs), jax.device_get(out.stats)
    merged = 0
    for b, it in enumerate(setup.items):
        want, counts, margin = ref_pooled_logprobs(setup.ref, it, pooling.stages, positions)
        assert margin > 1e-5, f"near-tie in the reference ({margin}); pick other thresholds"
        assert [int((setup.score_batch.span[b] > 0).sum())] + [int(s["audio_out"][b]) for s in stats] == counts
        np.testing.assert_allclose(lp[b, :len(want)], want, atol=1e-3, rtol=0)
        merged += counts[0] - counts[-1]
        assert counts[1] < counts[0] and counts[2] < counts[1], counts  # both stages merge
    assert merged > 0


# ----------------------------------------------------------------------------------------------
# the CLI


POOLING = "0:tau=0.5,window=1;2:tau=0.5,window=2"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """a: 2 s; b: 10 ms (one 12.5 Hz token, one code: a valid Kimi-Audio item); c: an empty file."""
    from affjax.testing import synth_speech_like

    d = tmp_path_factory.mktemp("kimi_items")
    sf.write(str(d / "a.wav"), synth_speech_like(2.0, seed=1), 16000)
    sf.write(str(d / "b.wav"), synth_speech_like(0.01, seed=2), 16000)
    sf.write(str(d / "c.wav"), np.zeros(0, np.float32), 16000)
    rows = [{"id": k, "audio": f"{k}.wav", "prompt": "Please transcribe the spoken content into written text.",
             "continuation": "hello there", "reference": "hello there"} for k in "abc"]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl"


def _cli(args, capsys):
    from affjax.cli import main

    rc = main([str(a) for a in args] + ["--no-progress", "--no-compile-cache", "--batch-size", "2"])
    return rc, capsys.readouterr()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference_row(fe, ref, manifest):
    """Item a as the job builds it (the instruction, then the clip with the checkpoint's speech
    codes): the reference's log-prob of its continuation and its greedy tokens."""
    from affjax.data.audio import load_audio

    wave = load_audio(manifest.parent / "a.wav")
    enc, _ = fe.encode("Please transcribe the spoken content into written text.", [wave])
    enc = fe.fill_codes([enc])[0]  # the job fills the speech codes of a window's items in one run
    cont = fe.tokens("hello there").tolist()
    audio, text = enc.ids[:, 0].tolist(), enc.ids[:, 1].tolist()
    x = ref.embed(audio + [TEXT_BLANK] * len(cont), text + cont, enc.continuous.tolist() + [False] * len(cont),
                  [ref.whisper_features(wave)])
    with torch.no_grad():
        h = ref.layers(x, np.arange(len(x)), 0, len(ref.model.layers))
        logp = torch.log_softmax(ref.lm_head(ref.model.norm(h[len(audio) - 1:-1])), -1)
    return float(logp[torch.arange(len(cont)), torch.as_tensor(cont)].sum()), ref.greedy(x[:len(audio)], 3)[0]


@pytest.mark.parametrize("pooling", [None, POOLING])
def test_cli_score_generate_eval(tiny_kimi_ckpt, setup, manifest, tmp_path, capsys, pooling):
    base = ["--ckpt", tiny_kimi_ckpt, "--manifest", manifest] + (["--pooling", pooling] if pooling else [])
    xla = ["--no-xla-cost"] if pooling else []  # in-order pooled runs would compile the unpooled programs too
    runs = {"score": ["score", "--out", tmp_path / "s.jsonl"] + xla,
            "generate": ["generate", "--out", tmp_path / "g.jsonl", "--max-new-tokens", "3"] + xla,
            "asr": ["eval", "--task", "asr", "--out", tmp_path / "run", "--max-new-tokens", "3"]}
    rows = {}
    for name, args in runs.items():
        rc, _ = _cli(args[:1] + base + args[1:], capsys)
        assert rc == 0, name
        rows[name] = _rows(tmp_path / "run" / "results.jsonl" if name == "asr" else args[2])
        assert [r["id"] for r in rows[name]] == ["a", "b", "c"], name
        assert "audio is empty" in rows[name][2]["error"] and "c.wav" in rows[name][2]["error"], rows[name][2]
        for r in rows[name][:2]:
            assert "error" not in r, r
            assert len(r["audio_tokens"]) == (3 if pooling else 1)
    a, b = rows["score"][:2]
    assert (a["audio_tokens"][0], b["audio_tokens"][0]) == (25, 1)  # 12.5 Hz: 2 s and 10 ms
    assert a["num_tokens"] == 2  # "hello there": the end token <|im_kimia_text_eos|> is not scored
    assert rows["generate"][0]["tokens"] == rows["asr"][0]["tokens"]
    assert "wer" in json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    if pooling:
        assert a["audio_tokens"][2] <= a["audio_tokens"][1] < a["audio_tokens"][0]
    else:
        logprob, tokens = _reference_row(setup.frontend, setup.ref, manifest)
        assert abs(a["logprob"] - logprob) < 2e-3, (a["logprob"], logprob)
        assert rows["generate"][0]["tokens"] == tokens
        # the same command again resumes: nothing runs, the rows stay
        before = (tmp_path / "g.jsonl").read_text()
        rc, out = _cli(runs["generate"][:1] + base + runs["generate"][1:], capsys)
        assert rc == 0 and "3 of 3 items already done" in out.out
        assert (tmp_path / "g.jsonl").read_text() == before


def test_speech_codes_filled_for_a_window_at_once(setup):
    """The job leaves an item's speech codes pending and fills a window's in one tokenizer run: the
    same audio stream as filling each item alone, codes at the continuous positions only."""
    from affjax.testing import synth_speech_like

    fe = setup.frontend
    encs = [fe.encode("Transcribe.", [synth_speech_like(s, seed=i)])[0] for i, s in enumerate((2.0, 0.5, 31.0))]
    assert all(e.pending is not None and not (e.ids[e.continuous, 0] > TOKEN_OFFSET).any() for e in encs)
    together = fe.fill_codes(encs)
    for e, t in zip(encs, together):
        alone = fe.fill_codes([e])[0]
        assert t.pending is None and np.array_equal(t.ids, alone.ids)
        assert np.array_equal(t.ids[~t.continuous], e.ids[~e.continuous])
        assert (t.ids[t.continuous, 0] >= TOKEN_OFFSET).all()
