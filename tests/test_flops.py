"""Prefill FLOPs: the analytic count (docs/pooling.md section 5), XLA's cost analysis of the engine's
compiled programs, per-stage fixed-capacity retention, and the ratios in a pooled job summary."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from affjax.runtime.costs import prefill_cost, program_costs
from affjax.runtime.flops import (analytic_lm_flops, lm_prefill_flops, lm_xla_flops, loop_corrected_flops,
                          pooled_vs_unpooled, tokens_per_layer, total_flops)
from affjax.models.qwen2.modeling import TextConfig

# ----------------------------------------------------------------------------------------------
# analytic count

TINY = TextConfig(vocab_size=10, hidden=4, layers=2, heads=2, kv_heads=1, head_dim=2, intermediate=6)


def _hand_layer(n):
    """One layer of TINY at n tokens, multiply-add by multiply-add (2 FLOPs each)."""
    q = n * 4 * (2 * 2)          # hidden -> heads * head_dim
    k = n * 4 * (1 * 2)          # hidden -> kv_heads * head_dim
    v = n * 4 * (1 * 2)
    o = n * (2 * 2) * 4          # heads * head_dim -> hidden
    scores = 2 * n * n * 2       # per head: n x n x head_dim, 2 heads
    values = 2 * n * n * 2
    mlp = n * 4 * 6 * 2 + n * 6 * 4  # gate + up, down
    return 2 * (q + k + v + o + scores + values + mlp)


HEAD = 2 * 4 * 10  # LM head on one position


def test_analytic_count_by_hand():
    assert lm_prefill_flops(TINY, [5, 5]) == 2 * _hand_layer(5) + HEAD == 3280
    # a stage after layer 1 leaves 3 tokens for layer 2
    assert tokens_per_layer(2, [1], [5, 3]) == [5, 3]
    assert analytic_lm_flops(TINY, [[5, 3]]) == _hand_layer(5) + _hand_layer(3) + HEAD == 2544
    # two items: attention squares per item, one head position each
    assert analytic_lm_flops(TINY, [[5, 3], [4, 4]]) == 2544 + 2 * _hand_layer(4) + HEAD
    assert pooled_vs_unpooled(TINY, [1], [[5, 3], [4, 2]]) == pytest.approx(
        (2544 + _hand_layer(4) + _hand_layer(2) + HEAD) / (3280 + 2 * _hand_layer(4) + HEAD))
    with pytest.raises(ValueError):
        analytic_lm_flops(TINY, [[5]])
    with pytest.raises(ValueError):
        tokens_per_layer(2, [1], [5])


# Qwen2-Audio-7B's language model
Q7B = TextConfig(vocab_size=156032, hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008)


def _layer(t, n):
    return 2 * n * (2 * t.hidden * t.heads * t.head_dim + 2 * t.hidden * t.kv_heads * t.head_dim
                    + 3 * t.hidden * t.intermediate) + 4 * n * n * t.heads * t.head_dim


def test_ratio_input_deep_dap():
    """30 s clip (750 audio tokens) + 40 text tokens; paper retentions: 590 audio tokens after the
    input stage, 112 after layer 29."""
    f, h = (lambda n: _layer(Q7B, n)), 2 * Q7B.hidden * Q7B.vocab_size
    unpooled = 32 * f(790) + h
    assert tokens_per_layer(32, [0], [790, 630]) == [630] * 32
    assert tokens_per_layer(32, [29], [790, 152]) == [790] * 29 + [152] * 3
    assert tokens_per_layer(32, [0, 29], [790, 630, 152]) == [630] * 29 + [152] * 3
    r_in = pooled_vs_unpooled(Q7B, [0], [[790, 630]])
    r_deep = pooled_vs_unpooled(Q7B, [29], [[790, 152]])
    r_dap = pooled_vs_unpooled(Q7B, [0, 29], [[790, 630, 152]])
    assert r_in == pytest.approx((32 * f(630) + h) / unpooled, rel=1e-12)
    assert r_deep == pytest.approx((29 * f(790) + 3 * f(152) + h) / unpooled, rel=1e-12)
    assert r_dap == pytest.approx((29 * f(630) + 3 * f(152) + h) / unpooled, rel=1e-12)
    assert r_dap < r_in < 1 and r_dap < r_deep < 1
    # the paper's theory for dap-aggressive is 72.52 % (its own token counts): same regime
    assert 0.70 < r_dap < 0.76
    # no stage merging anything: exactly 1
    assert pooled_vs_unpooled(Q7B, [0, 29], [[790, 790, 790]]) == 1.0


def test_loop_correction_counts_every_iteration():
    """XLA's cost analysis counts a while body once; the correction multiplies by the trip count."""
    w = jnp.ones((32, 48), jnp.float32)
    x = jnp.ones((6, 16, 32), jnp.float32)
    compiled = jax.jit(lambda x, w: jax.lax.map(lambda a: a @ w, x)).lower(x, w).compile()
    flops, raw, loops = loop_corrected_flops(compiled)
    exact = 2 * 6 * 16 * 32 * 48
    assert loops >= 1 and raw < exact
    assert flops == pytest.approx(exact, rel=0.02)


# ----------------------------------------------------------------------------------------------
# XLA cost of the engine's programs (a small model built in JAX, no checkpoint)

SMALL = {"model_type": "qwen2_audio", "audio_token_index": 500,
         "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 16, "d_model": 32, "encoder_layers": 1,
                          "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "max_source_positions": 200},
         "text_config": {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 3,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256}}


@pytest.fixture(scope="module")
def small():
    from flax import nnx

    from affjax.models.qwen2_audio.inputs import Encoded, collate
    from affjax.models.qwen2_audio.modeling import Qwen2Audio, Qwen2AudioConfig
    cfg = Qwen2AudioConfig.from_hf(SMALL)
    model = Qwen2Audio(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    frames = cfg.audio.mel_frames
    n_audio = int(cfg.audio.output_lengths(frames))  # 100
    items = []
    for _ in range(2):
        ids = np.concatenate([rng.integers(0, 400, 7), np.full(n_audio, 500), rng.integers(0, 400, 7)])
        feats = rng.standard_normal((1, 16, frames)).astype(np.float32)
        items.append(Encoded(ids.astype(np.int32), feats, np.array([frames], np.int32)))
    n = len(items[0].ids)
    batch = collate(items, batch_size=2, audio_token_id=500, out_frames_of=cfg.audio.output_lengths, seq_len=n)
    return model, cfg, batch, n, n_audio


def test_xla_unpooled_prefill_matches_analytic(small):
    """Bucket = valid length, LM head on one position: XLA's count of the LM programs is the
    analytic count plus the element-wise work (norms, RoPE, softmax, masks), a few %."""
    from affjax.runtime.engine import TRACES, Engine
    model, cfg, batch, n, _ = small
    engine = Engine(model)
    before = TRACES.copy()
    costs = prefill_cost(engine, batch, unpooled=True)  # shapes only: nothing runs
    assert list(costs) == ["embed", "layers[0:3)", "last_head"]
    lm = sum(costs.values()) - costs["embed"]
    analytic = analytic_lm_flops(cfg.text, [[n] * 3] * 2)
    assert 1.0 <= lm / analytic < 1.05, (lm, analytic)
    # the cost analysis traced each piece once (counted); a real prefill at the same shapes runs
    # the same programs and traces nothing again
    counted = {k: v - before.get(k, 0) for k, v in TRACES.items() if v != before.get(k, 0)}
    assert counted == {"embed": 1, "group": 1, "last_head": 1}, counted
    after = TRACES.copy()
    assert prefill_cost(engine, batch) == costs
    assert TRACES == after


@pytest.mark.slow
def test_fixed_capacity_per_stage_and_cost(small):
    """Fixed mode with one retention per stage and tau > 1 (no natural merges): each stage keeps
    exactly ceil(r * T) of the tokens each span has when entering it; one compiled program."""
    from affjax.runtime.engine import Engine
    from affjax.pooling.spec import PoolingConfig, Stage
    model, cfg, batch, n, n_audio = small
    pooling = PoolingConfig((Stage(0, 2.0, 1), Stage(2, 2.0, 3)))
    with pytest.raises(ValueError, match="retentions"):
        Engine(model, pooling=pooling, pool_mode="fixed", capacity=(0.5,))
    engine = Engine(model, pooling=pooling, pool_mode="fixed", capacity=(0.5, 0.3))
    out = engine.prefill(batch)
    st = [jax.device_get(s) for s in out.stats]
    first = math.ceil(0.5 * n_audio)
    assert list(st[0]["audio_out"]) == [first] * 2 and list(st[0]["forced"]) == [n_audio - first] * 2
    assert list(st[1]["audio_out"]) == [math.ceil(0.3 * first)] * 2
    costs = prefill_cost(engine, batch)
    assert list(costs) == ["prefill_fixed"]
    unpooled = prefill_cost(engine, batch, unpooled=True)
    pooled_lm, unpooled_lm = costs["prefill_fixed"] - unpooled["embed"], sum(unpooled.values()) - unpooled["embed"]
    counts = [[n, int(st[0]["n_valid"][b]), int(st[1]["n_valid"][b])] for b in range(2)]
    analytic = pooled_vs_unpooled(cfg.text, pooling.stages, counts)
    # XLA sees the buffers: 114 slots unpooled, the smallest bucket (64) after each stage
    assert analytic < pooled_lm / unpooled_lm < 1


@pytest.mark.slow
def test_bucketed_programs_recorded(small):
    from affjax.runtime.engine import Engine
    from affjax.pooling.spec import PoolingConfig, Stage
    model, cfg, batch, n, n_audio = small
    engine = Engine(model, pooling=PoolingConfig((Stage(0, -1.0, 1), Stage(2, -1.0, 1))))
    engine.record = True
    engine.prefill(batch)
    labels = [p.label for p in engine.programs]
    assert labels == ["embed", "pool@0", "layers[0:2)", "pool@2", "layers[2:3)", "last_head"]
    costs = program_costs(engine.programs)
    unpooled = program_costs(engine.unpooled_programs(batch))
    assert costs["embed"] == unpooled["embed"]
    ratio = lm_xla_flops(costs, unpooled["embed"]["flops"]) / lm_xla_flops(unpooled, unpooled["embed"]["flops"])
    # each clip merged into one token: 15 of 114 tokens left, in the smallest bucket (64)
    analytic = pooled_vs_unpooled(cfg.text, engine.pooling.stages, [[n, 15, 15]] * 2)
    assert analytic < 0.2 < ratio < 0.6
    assert total_flops(costs) > 0 and all(c["peak_bytes"] > 0 for c in costs.values())


# ----------------------------------------------------------------------------------------------
# job summary


@pytest.mark.slow
def test_pooled_job_summary_has_flops_ratios(tiny_qwen2_audio_ckpt, tmp_path):
    import soundfile as sf

    from affjax.eval.runner import JobConfig, run_eval
    from affjax.testing import AUDIO_PLACEHOLDER, synth_speech_like
    ckpt = tiny_qwen2_audio_ckpt
    rows = []
    for i, secs in enumerate((2.0, 3.5)):
        wav = tmp_path / f"a{i}.wav"
        sf.write(wav, synth_speech_like(secs, seed=i), 16000, subtype="PCM_16")
        rows.append({"id": f"u{i}", "audio": str(wav), "prompt": f"Audio: {AUDIO_PLACEHOLDER} What is it?",
                     "continuation": " a sound"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_eval(JobConfig(task="score", ckpt=str(ckpt), manifest=str(manifest), out=str(tmp_path / "o.jsonl"),
                            batch_size=2, pooling="0:tau=2,window=1;1:tau=-1,window=1", progress=False),
                  log=lambda *a: None)
    assert summary["ok"] == 2
    ra, rx = summary["lm_prefill_flops_ratio_analytic"], summary["lm_prefill_flops_ratio_xla"]
    assert 0 < ra < 1 and 0 < rx < 1, summary
    f = summary["lm_prefill_flops"]
    assert f["analytic_pooled"] < f["analytic_unpooled"] and f["xla_pooled"] < f["xla_unpooled"]
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    for rec in out:
        a = rec["audio_tokens"]
        assert a[0] == a[1] > a[2] == 1  # tau > 1 keeps every token, tau = -1 leaves one per clip
