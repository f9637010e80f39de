"""Affinity Pooling through the whole model: batched, bucketed, pooled `score` and `generate`
against a per-item, unpadded reference that pools with the plain sequential implementation
(tests/pooling_reference.py) and then runs the decoder layers on the shortened sequence.

Random weights give arbitrary similarities, so thresholds are set from the observed similarities
of these inputs (a quantile, moved to the middle of a gap between observed values so no decision
is a near tie; the reference reports its closest call and the test checks it).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import need_module, need_qwen2_tokenizer

torch = need_module("torch")

from affjax.pooling.spec import Stage  # noqa: E402
from pooling_reference import gap_tau, ref_cos, ref_stage  # noqa: E402

LAYERS = 4
DEEP = 2
_HF = {}


def _hf_model():
    return _HF["model"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    need_qwen2_tokenizer()
    from affjax.models.checkpoint import convert
    from affjax.eval.lslm import load_for_inference
    from affjax.models.qwen2_audio.inputs import encode
    from affjax.testing import AUDIO_PLACEHOLDER, long_prompt, synth_speech_like
    from affjax.testing import make_tiny_qwen2_audio
    src = make_tiny_qwen2_audio(tmp_path_factory.mktemp("hf"), text_layers=LAYERS, heads=4, kv_heads=2, seed=3)
    dst = tmp_path_factory.mktemp("ck") / "ckpt"
    convert(src, dst, progress=False)
    from transformers import Qwen2AudioForConditionalGeneration
    _HF["model"] = Qwen2AudioForConditionalGeneration.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager").eval()
    model, cfg, processor, eos, pad = load_for_inference(str(dst))
    two = long_prompt(40, seed=7) + " Then " + AUDIO_PLACEHOLDER + " and compare."
    specs = [(long_prompt(60, seed=1), [2.0], " yes it is"), (two, [3.0, 4.5], " the second one"),
             (long_prompt(90, seed=2), [6.0], " no")]
    items = []
    for i, (p, secs, cont) in enumerate(specs):
        wavs = [synth_speech_like(s, seed=20 + 3 * i + k) for k, s in enumerate(secs)]
        items.append((encode(processor, p, wavs, cont), encode(processor, p, wavs)))
    taus = _pick_taus(model, cfg, [g for _, g in items])
    return model, cfg, processor, eos, pad, items, taus


# ----------------------------------------------------------------------------------------------
# The per-item reference


_AUDIO_CACHE = {}
# jitted: eager, every op of the encoder and of the head would compile on its own
_encode_audio = jax.jit(lambda m, f, n: m.encode_audio(f, n))
_head = jax.jit(lambda m, x: m.language_model.logits(x))


def _head_logits(model, x) -> np.ndarray:
    """Logits of the rows of x, padded to a multiple of 16 rows (one compile for every item)."""
    n = len(x)
    return np.asarray(_head(model, jnp.asarray(np.pad(x, ((0, -(-n // 16) * 16 - n), (0, 0))))))[:n]


def _clip_tokens(model, enc, k):
    """Encoder output of one clip, alone (memoised by the clip's features: the score and generate
    encodings of an item hold the same clips, and the reference calls this for every setting)."""
    feats, length = enc.features[k:k + 1], enc.feature_lengths[k:k + 1]
    key = (id(model), feats.shape, feats.tobytes(), length.tobytes())
    if key not in _AUDIO_CACHE:
        _AUDIO_CACHE[key] = np.asarray(_encode_audio(model, jnp.asarray(feats), jnp.asarray(length)))[0]
    return _AUDIO_CACHE[key]


def _item_embeddings(model, cfg, enc, extra_ids=()):
    ids = np.concatenate([enc.ids, np.asarray(extra_ids, np.int32)]).astype(np.int32)
    x = np.array(model.language_model.embed(jnp.asarray(ids)), np.float32)
    span = np.zeros(len(ids), np.int32)
    is_audio = ids == cfg.audio_token_id
    starts = [t for t in range(len(ids)) if is_audio[t] and (t == 0 or not is_audio[t - 1])]
    for k, s in enumerate(starts):
        audio = _clip_tokens(model, enc, k)
        e = s
        while e < len(ids) and is_audio[e]:
            e += 1
        x[s:e] = audio[: e - s]
        span[s:e] = k + 1
    return ids, x, span


def reference(model, cfg, enc, stages, positions, proportional, extra_ids=(), capture=None):
    """Unpadded single item: returns final hidden states, slot of each original token, stage counts.

    The decoder layers are transformers' own (PyTorch, eager attention, float32) with the same
    weights; the proportional bias is added to their additive attention mask."""
    hf = _hf_model()
    ids, x, span = _item_embeddings(model, cfg, enc, extra_ids)
    n = len(ids)
    pos = np.arange(n, dtype=np.float32)
    size = np.ones(n, np.float32)
    slot_of = np.arange(n)
    cuts = [s.layer for s in stages]
    counts, margin = [int((span > 0).sum())], math.inf
    lm = hf.model.language_model
    for g, (start, end) in enumerate(zip([0] + cuts, cuts + [LAYERS])):
        if g > 0:
            st = stages[g - 1]
            if capture is not None:
                capture.append((np.array(x), span.copy()))
            r = ref_stage(np.asarray(x, np.float32), span, pos, size, tau=st.tau, window=st.window,
                          weighted=st.weighted, positions=positions)
            x, pos, size, span = r["h"], r["pos"], r["size"], r["span"]
            slot_of = r["group_of"][slot_of]
            counts.append(r["audio_out"])
            margin = min(margin, r["margin"])
        h = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None]
        m = len(pos)
        mask = torch.full((m, m), torch.finfo(torch.float32).min).triu(1)
        if proportional and g > 0:
            mask = mask + torch.log(torch.from_numpy(size))[None, :]
        pe = lm.rotary_emb(h, torch.from_numpy(pos)[None])
        with torch.no_grad():
            for layer in lm.layers[start:end]:
                out = layer(h, attention_mask=mask[None, None], position_embeddings=pe)
                h = out[0] if isinstance(out, tuple) else out
        x = h[0].numpy()
    return x, slot_of, counts, margin


def ref_score(model, cfg, enc, stages, positions, proportional):
    x, slot_of, counts, margin = reference(model, cfg, enc, stages, positions, proportional, enc.cont_ids)
    n = len(enc.ids)
    slots = slot_of[n - 1 + np.arange(len(enc.cont_ids))]
    lp = np.asarray(jax.nn.log_softmax(_head_logits(model, x[slots]), axis=-1))
    return float(lp[np.arange(len(slots)), enc.cont_ids].sum()), counts, margin


def ref_generate(model, cfg, enc, stages, positions, proportional, tokens):
    """The reference's greedy choice after the prompt and after each prefix of `tokens`, from one
    causal pass over prompt + tokens[:-1] (teacher forcing): it equals `tokens` iff greedy decoding
    of the reference gives `tokens`. Appended text tokens never join a group nor change an earlier
    token's states, so each position sees what step-by-step decoding would."""
    x, slot_of, _, _ = reference(model, cfg, enc, stages, positions, proportional, list(tokens[:-1]))
    slots = slot_of[len(enc.ids) - 1 + np.arange(len(tokens))]
    return [int(t) for t in np.argmax(_head_logits(model, x[slots]), axis=-1)]


def _pick_taus(model, cfg, encs):
    """Input-stage tau from neighbour similarities of the input embeddings, deep-stage tau from those
    after layer DEEP (no earlier pooling): both near the median, so about half the joins happen."""
    inp, deep = [], []
    for enc in encs:
        ids, x0, span = _item_embeddings(model, cfg, enc)
        seen = []
        reference(model, cfg, enc, (Stage(DEEP, 1.1, 1),), "first", False, capture=seen)
        hd = seen[0][0]
        for t in range(1, len(ids)):
            if span[t] > 0 and span[t] == span[t - 1]:
                inp.append(ref_cos(x0[t], x0[t - 1]))
                deep.append(ref_cos(hd[t], hd[t - 1]))
    return gap_tau(inp, 0.5), gap_tau(deep, 0.5)


# ----------------------------------------------------------------------------------------------


def _settings(kind, taus):
    t_in, t_deep = taus
    return {"input": f"0:tau={t_in!r},window=1",
            "deep": f"{DEEP}:tau={t_deep!r},window=3",
            "dap": f"0:tau={t_in!r},window=1;{DEEP}:tau={t_deep!r},window=2,weighted"}[kind]


# every kind of stage, every position policy and both bias settings, each at least once (not the
# whole product: each case compiles its own programs)
CASES = [("input", "first", False), ("dap", "first", False), ("deep", "mean", True), ("dap", "mean", False),
         ("deep", "reindex", False), ("dap", "reindex", True), ("dap", "first", True)]
FAST_CASE = ("dap", "first", True)  # both stages and the proportional bias; the others are slow
CASES = [c if c == FAST_CASE else pytest.param(*c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("kind,positions,proportional", CASES)
def test_pooled_score_and_generate_match_reference(setup, kind, positions, proportional):
    from affjax.runtime.engine import Engine
    from affjax.models.qwen2_audio.inputs import collate
    from affjax.pooling.spec import parse_pooling
    model, cfg, processor, eos, pad, items, taus = setup
    pooling = parse_pooling(_settings(kind, taus), LAYERS, positions=positions, proportional=proportional)
    engine = Engine(model, pooling=pooling, eos_ids=(), pad_id=pad)
    mk = lambda encs: collate(encs, batch_size=4, audio_token_id=cfg.audio_token_id,
                              out_frames_of=cfg.audio.output_lengths, pad_id=pad)
    lp, stats = engine.score(mk([s for s, _ in items]))
    merged = 0
    for b, (s_enc, _) in enumerate(items):
        ref, counts, margin = ref_score(model, cfg, s_enc, pooling.stages, positions, proportional)
        assert margin > 1e-5, f"near-tie in the reference ({margin}); pick other thresholds"
        got = [int((mk([s_enc]).span[0] > 0).sum())] + [int(st["audio_out"][b]) for st in stats]
        assert got == counts, (b, got, counts)
        assert abs(lp[b] - ref) < 1e-4, (b, lp[b], ref)
        merged += counts[0] - counts[-1]
    assert merged > 0, "thresholds merged nothing: the test would not exercise pooling"
    toks, _ = engine.generate(mk([g for _, g in items]), 8)
    for b, (_, g_enc) in enumerate(items):
        assert len(toks[b]) == 8, toks[b]  # no EOS ids: every row decodes 8 tokens
        assert toks[b] == ref_generate(model, cfg, g_enc, pooling.stages, positions, proportional, toks[b]), b


@pytest.mark.slow
def test_fixed_capacity_with_room_equals_bucketed(setup):
    from affjax.runtime.engine import Engine
    from affjax.models.qwen2_audio.inputs import collate
    from affjax.pooling.spec import parse_pooling
    model, cfg, processor, eos, pad, items, taus = setup
    pooling = parse_pooling(_settings("dap", taus), LAYERS)
    batch = collate([s for s, _ in items], batch_size=4, audio_token_id=cfg.audio_token_id,
                    out_frames_of=cfg.audio.output_lengths, pad_id=pad)
    a, sa = Engine(model, pooling=pooling).score(batch)
    b, sb = Engine(model, pooling=pooling, pool_mode="fixed", capacity=1.0).score(batch)
    np.testing.assert_allclose(a[:3], b[:3], atol=1e-5)
    assert all(int(s["forced"].sum()) == 0 for s in sb)
    low = Engine(model, pooling=pooling, pool_mode="fixed", capacity=0.1)
    c, sc = low.score(batch)
    audio_in = (batch.span[:3] > 0).sum(1)
    assert (sc[0]["audio_out"][:3] <= np.ceil(0.1 * audio_in) + 1).all()  # two spans in item 1
    assert int(sc[0]["forced"][:3].sum()) > 0


@pytest.mark.slow
def test_stage_programs_and_ynnpack_fusions(setup):
    """The bucketed mode's stage program is compiled without XLA:CPU's YNNPACK fusions (its
    multiply-and-sum lag dots are fastest so); the layer programs and the one-program fixed-capacity
    prefill keep them (its decoder layers need them; its stage uses the matrix-vector lag dots)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the option is XLA:CPU's")
    from affjax.runtime.engine import Engine
    from affjax.models.qwen2_audio.inputs import collate
    from affjax.pooling.spec import parse_pooling
    model, cfg, processor, eos, pad, items, taus = setup
    pooling = parse_pooling(_settings("dap", taus), LAYERS)
    batch = collate([s for s, _ in items], batch_size=4, audio_token_id=cfg.audio_token_id,
                    out_frames_of=cfg.audio.output_lengths, pad_id=pad)
    texts = {}
    for engine in (Engine(model, pooling=pooling), Engine(model, pooling=pooling, pool_mode="fixed", capacity=0.5)):
        engine.record = True
        engine.score(batch)
        texts.update({p.label: p.lower().compile().as_text() for p in engine.programs})
    ynn = {label: "__ynn" in text for label, text in texts.items()}
    assert ynn["pool@0"] is False and ynn[f"pool@{DEEP}"] is False, ynn
    assert ynn[f"layers[0:{DEEP})"] is True and ynn["prefill_fixed"] is True, ynn


@pytest.mark.slow
def test_tau_above_one_is_the_unpooled_model(setup):
    from affjax.runtime.engine import Engine
    from affjax.models.qwen2_audio.inputs import collate
    from affjax.pooling.spec import parse_pooling
    model, cfg, processor, eos, pad, items, taus = setup
    batch = collate([s for s, _ in items], batch_size=4, audio_token_id=cfg.audio_token_id,
                    out_frames_of=cfg.audio.output_lengths, pad_id=pad)
    plain, _ = Engine(model).score(batch)
    pooled, _ = Engine(model, pooling=parse_pooling(f"0:tau=1.1,window=1;{DEEP}:tau=1.1,window=3", LAYERS,
                                                    positions="mean", proportional=True)).score(batch)
    np.testing.assert_allclose(plain[:3], pooled[:3], atol=1e-6)


def test_a_new_tau_does_not_recompile(setup):
    """tau is a traced value of the pooling programs: stages that differ only in tau run the same
    compiled stage program (bucketed: the input stage of `front`) and the same one-program prefill
    (fixed capacity, the settings of test_stage_programs_and_ynnpack_fusions), and each engine
    still pools with its own tau (other counts)."""
    from affjax.runtime.engine import TRACES, Engine
    from affjax.models.qwen2_audio.inputs import collate
    from affjax.pooling.spec import parse_pooling
    model, cfg, processor, eos, pad, items, taus = setup
    batch = collate([s for s, _ in items], batch_size=4, audio_token_id=cfg.audio_token_id,
                    out_frames_of=cfg.audio.output_lengths, pad_id=pad)

    def counts(t):
        _, front = Engine(model, pooling=parse_pooling(_settings("input", t), LAYERS)).front(batch)
        _, fixed = Engine(model, pooling=parse_pooling(_settings("dap", t), LAYERS), pool_mode="fixed",
                          capacity=0.5).score(batch)
        return [[np.asarray(st["audio_out"])[:3].tolist() for st in stats] for stats in (front, fixed)]

    first = counts(taus)
    before = TRACES.copy()
    second = counts((-1.0, -1.0))  # every span merged into one token
    assert before["pool"] >= 1 and before["prefill_fixed"] >= 1, before
    assert TRACES["pool"] == before["pool"] and TRACES["prefill_fixed"] == before["prefill_fixed"], TRACES
    assert first[0] != second[0] and first[1] != second[1], (first, second)
    assert counts(taus) == first  # the cached programs give the first taus' counts again


@pytest.mark.slow
def test_each_segment_compiles_once(setup):
    """12 items of different lengths (clips one audio token, 0.04 s, apart) in one bucket of
    affjax.runtime.shapes.SEQ_BUCKETS, whose pooled lengths share one bucket too (tau = -1 leaves one token
    per clip): every segment compiles once over 3 batches."""
    from affjax.runtime import shapes
    from affjax.runtime.engine import TRACES, Engine
    from affjax.models.qwen2_audio.inputs import collate, encode
    from affjax.pooling.spec import parse_pooling
    from affjax.testing import long_prompt, synth_speech_like
    model, cfg, processor, eos, pad, items, taus = setup
    prompt = long_prompt(60, seed=50)
    n0 = len(encode(processor, prompt, [synth_speech_like(13.0, seed=0)]).ids)
    # the 12 lengths start just above the lower edge of the first bucket from n0 on wide enough to hold them
    lo = next(a for a, b in zip(shapes.SEQ_BUCKETS, shapes.SEQ_BUCKETS[1:]) if a >= n0 and b - a >= 12)
    start = 13.0 + 0.04 * (lo + 1 - n0)
    encs = [encode(processor, prompt, [synth_speech_like(start + 0.04 * i + 0.01, seed=i)]) for i in range(12)]
    lengths = [len(e.ids) for e in encs]
    assert len(set(lengths)) == 12 and len({shapes.bucket(n) for n in lengths}) == 1, lengths
    engine = Engine(model, pooling=parse_pooling(f"0:tau=-1,window=1;{DEEP}:tau=0.5,window=2", LAYERS))
    jax.clear_caches()
    TRACES.clear()
    for k in range(3):
        engine.generate(collate(encs[4 * k:4 * k + 4], batch_size=4, audio_token_id=cfg.audio_token_id,
                                out_frames_of=cfg.audio.output_lengths, pad_id=pad), 4)
    assert TRACES == {"embed": 1, "pool": 2, "group": 2, "last_head": 1, "decode": 1}, TRACES
