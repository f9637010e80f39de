"""Memory plans from abstract shapes (affjax.runtime.plan): parameter counts of the real Qwen2-Audio-7B
and Kimi-Audio-7B geometries against analytic counts (and transformers), KV-cache arithmetic, audio
positions, TPU mesh picking, and tiny configs against really instantiated models."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import need_module

from affjax.runtime.plan import (DTYPE_BYTES, KIMI_AUDIO_7B_CONFIG, QWEN2_AUDIO_7B_CONFIG, TOPOLOGIES, GiB,
                                 audio_span, format_plan, load_hf_config, param_bytes_per_chip, param_counts, plan)

TINY_AUDIO = {
    "model_type": "qwen2_audio",
    "audio_token_index": 95,
    "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 16, "d_model": 32, "encoder_layers": 2,
                     "encoder_attention_heads": 4, "encoder_ffn_dim": 48, "max_source_positions": 20},
    "text_config": {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 40, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 72,
                    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False},
}
TINY_LLAMA = {"model_type": "llama", "vocab_size": 90, "hidden_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 4, "intermediate_size": 40,
              "rms_norm_eps": 1e-5, "rope_theta": 1e5, "tie_word_embeddings": True}


def analytic_qwen2_audio_params(c: dict) -> dict[str, int]:
    """Parameter count written out from the config's numbers alone."""
    a, t = c["audio_config"], c["text_config"]
    d, f, mel = a["d_model"], a["encoder_ffn_dim"], a["num_mel_bins"]
    audio_layer = (4 * d * d + 3 * d      # q, k, v, out (k has no bias)
                   + 2 * d * f + f + d    # fc1, fc2
                   + 2 * 2 * d)           # two LayerNorms
    audio = (mel * d * 3 + d + d * d * 3 + d     # conv1, conv2
             + a["max_source_positions"] * d    # position table
             + a["encoder_layers"] * audio_layer
             + 2 * d)                           # final LayerNorm
    h, i, v = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    hd = h // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    text_layer = (h * q + q + 2 * (h * kv + kv)   # q, k, v with biases
                  + q * h                         # o
                  + 3 * h * i                     # gate, up, down
                  + 2 * h)                        # two RMSNorms
    return {"audio_tower": audio, "projector": d * h + h,
            "language_model": t["num_hidden_layers"] * text_layer + h,
            "embeddings": v * h, "lm_head": 0 if t["tie_word_embeddings"] else v * h}


@pytest.fixture(scope="module")
def plan_7b():
    return plan(QWEN2_AUDIO_7B_CONFIG, batch=1, seq_len=2048, topology="v5e-8")


def test_7b_config_is_the_real_geometry():
    from affjax.models.qwen2_audio.modeling import Qwen2AudioConfig

    cfg = Qwen2AudioConfig.from_hf(copy.deepcopy(QWEN2_AUDIO_7B_CONFIG))
    a, t = cfg.audio, cfg.text
    assert (a.num_mel_bins, a.d_model, a.layers, a.heads, a.ffn_dim, a.max_source_positions, a.avg_pool) == \
        (128, 1280, 32, 20, 5120, 1500, 2)
    assert (t.vocab_size, t.hidden, t.layers, t.heads, t.kv_heads, t.head_dim, t.intermediate) == \
        (156032, 4096, 32, 32, 32, 128, 11008)
    assert (t.rope_theta, t.rms_eps, t.tie_embeddings, t.qkv_bias) == (10000.0, 1e-5, False, True)
    assert cfg.audio_token_id == 151646
    assert QWEN2_AUDIO_7B_CONFIG["text_config"]["max_position_embeddings"] == 8192
    json.dumps(QWEN2_AUDIO_7B_CONFIG)  # config.json form


@pytest.mark.slow
def test_7b_param_count_from_abstract_shapes(plan_7b):
    counts = plan_7b["params"]
    want = analytic_qwen2_audio_params(QWEN2_AUDIO_7B_CONFIG)
    for part, n in want.items():
        assert counts[part] == n, part
    assert counts["total"] == sum(want.values()) == 8_397_094_912
    assert 8.3e9 < counts["total"] < 8.5e9  # "about 8.4 B parameters"
    assert plan_7b["param_bytes"]["bfloat16"] == 2 * counts["total"]
    assert plan_7b["param_bytes"]["float32"] == 4 * counts["total"]


@pytest.mark.slow
def test_7b_param_count_matches_transformers_on_meta_device():
    torch = need_module("torch")
    import transformers

    with torch.device("meta"):  # shapes only, no memory
        hf = transformers.Qwen2AudioForConditionalGeneration(
            transformers.Qwen2AudioConfig(**copy.deepcopy(QWEN2_AUDIO_7B_CONFIG)))
    counts = param_counts(QWEN2_AUDIO_7B_CONFIG)
    assert sum(p.numel() for p in hf.parameters()) == counts["total"]
    assert sum(p.numel() for p in hf.model.audio_tower.parameters()) == counts["audio_tower"]
    assert sum(p.numel() for p in hf.lm_head.parameters()) == counts["lm_head"]


def test_kv_cache_bytes_by_hand():
    r = plan(QWEN2_AUDIO_7B_CONFIG, batch=3, seq_len=1000)
    # K and V, 32 layers, 3 rows, 1000 positions, 32 KV heads of 128, 2 bytes
    assert r["kv_cache"]["bytes"]["bfloat16"] == 2 * 32 * 3 * 1000 * 32 * 128 * 2 == 1_572_864_000
    assert r["kv_cache"]["bytes"]["float32"] == 2 * r["kv_cache"]["bytes"]["bfloat16"]
    assert r["kv_cache"]["per_token_bytes"]["bfloat16"] == 512 * 1024
    # grouped-query attention: the cache scales with KV heads, not query heads
    g = plan(TINY_LLAMA, batch=5, seq_len=77)
    assert g["kv_cache"]["bytes"]["float32"] == 2 * 2 * 5 * 77 * 2 * 4 * 4
    for d in r["dtypes"]:
        assert r["total"][d] == r["param_bytes"][d] + r["kv_cache"]["bytes"][d] + r["activations"][d]["peak"]


def test_activation_estimate_terms():
    r = plan(TINY_LLAMA, batch=2, seq_len=64, dtypes=("float32",))
    dec = r["activations"]["float32"]["decoder"]
    # float32 logits + probabilities: 2 x B x H x T x T x 4, plus q, k, v, o
    assert dec["attention"] == 2 * 2 * 6 * 64 * 64 * 4 + 2 * 64 * (2 * 6 + 2 * 2) * 4 * 4
    assert dec["mlp"] == 3 * 2 * 64 * 40 * 4
    assert r["assumptions"] and any("activations" in a for a in r["assumptions"])
    longer = plan(TINY_LLAMA, batch=2, seq_len=128, dtypes=("float32",))["activations"]["float32"]["decoder"]
    assert longer["attention"] > 3.5 * dec["attention"]  # quadratic in length


def test_program_bytes_by_hand():
    """Per-program bytes of the 7B job on data=2,model=4 (docs/tpu.md compares them with the TPU
    compiler): 4 rows per chip, 8 of 32 heads, 2752 of 11008 MLP columns, bf16."""
    from affjax.runtime.plan import POOL_F32_COPIES, SEQ_SIDE_BYTES, program_bytes
    layout = {"groups": [(0, 0), (0, 29), (29, 32)], "sequence_buffer": 800, "stage_buffers": [640, 156],
              "windows": 8}
    est = program_bytes(QWEN2_AUDIO_7B_CONFIG, layout, batch=8, data=2, model=4, extra=128)
    b, hd = 4, 128
    seq = lambda n: b * n * (4096 * 2 + SEQ_SIDE_BYTES)  # noqa: E731
    kv = lambda layers, slots: 2 * layers * b * slots * 8 * hd * 2  # noqa: E731
    # a layer's float32 scores (8 heads) with q, k, v outweigh gate + up at 640 positions
    layer = b * 640 * 4096 * 2 + b * 640 * 24 * hd * 2 + b * 8 * 640 * 640 * 4
    assert est["layers[0:29)"] == 2 * seq(640) + kv(29, 640 + 128) + layer
    assert est["pool@29"] == seq(640) + seq(156) + int(POOL_F32_COPIES * b * 640 * 4096 * 4)
    assert est["last_head"] == 2 * seq(156) + b * (156032 // 4) * 4  # float32 logits, vocabulary over 'model'
    assert est["decode"] == 2 * (kv(29, 640 + 128) + kv(3, 156 + 128)) + 2 * b * (156032 // 4) * 4 + b * 128 * 4
    # the audio encoder: 4 windows per chip, 5 of 20 heads, float32 scores over 1500 frames
    enc = b * 1500 * 1280 * 2 + b * 5 * 1500 * 1500 * 4 + 3 * b * 1500 * 5 * 64 * 2
    assert est["embed"] == enc + seq(800)
    assert est["pool@0"] == seq(800) + seq(640) + int(POOL_F32_COPIES * b * 800 * 4096 * 4)  # the input stage


@pytest.mark.slow
def test_bf16_7b_needs_model_parallelism_on_v5e(plan_7b):
    topo = plan_7b["topology"]
    assert topo["chips"] == 8 and topo["hbm_per_chip"] == 16 * GiB
    # 15.6 GiB of bfloat16 weights: past the 80% budget of one chip, and over 16 GiB with the cache
    assert plan_7b["param_bytes"]["bfloat16"] > 0.8 * 16 * GiB
    assert plan_7b["total"]["bfloat16"] > 16 * GiB
    rows = {(m["dtype"], m["data"], m["model"]): m for m in topo["meshes"]}
    assert not rows[("bfloat16", 8, 1)]["fits"]
    pick = topo["choice"]["bfloat16"]
    assert pick is not None and pick["model"] > 1 and pick["data"] * pick["model"] == 8
    assert rows[("bfloat16", pick["data"], pick["model"])]["total"] <= 0.8 * 16 * GiB
    # the smallest model axis that fits: every smaller one does not
    assert all(not m["fits"] for m in topo["meshes"] if m["dtype"] == "bfloat16" and m["model"] < pick["model"])
    assert topo["choice"]["float32"]["model"] >= pick["model"]


def test_other_topologies():
    assert set(TOPOLOGIES) == {"v4-8", "v5e-8", "v5p-8"}
    v5p = plan(QWEN2_AUDIO_7B_CONFIG, batch=1, seq_len=2048, topology="v5p-8")["topology"]
    assert v5p["choice"]["bfloat16"] == {"data": 4, "model": 1, "mesh": "data=4,model=1"}  # 95 GiB chips hold it
    v4 = plan(QWEN2_AUDIO_7B_CONFIG, batch=1, seq_len=2048, topology="v4-8")["topology"]
    assert v4["choice"]["float32"]["model"] > 1  # 31 GiB of float32 weights on 32 GiB chips
    with pytest.raises(ValueError, match="unknown topology"):
        plan(QWEN2_AUDIO_7B_CONFIG, batch=1, seq_len=16, topology="v9-1")
    every = plan(QWEN2_AUDIO_7B_CONFIG, batch=1, seq_len=2048, topology="all")
    assert [t["name"] for t in every["topologies"]] == list(TOPOLOGIES) and every["topology"]["name"] == "v4-8"
    assert [t["name"] for t in plan(QWEN2_AUDIO_7B_CONFIG, batch=1, seq_len=16, topology=["v5p-8", "v4-8"])
            ["topologies"]] == ["v5p-8", "v4-8"]
    # a model axis that does not divide the KV heads is never picked
    tiny = plan(TINY_LLAMA, batch=1, seq_len=16, topology="v5e-8")["topology"]
    assert tiny["choice"]["float32"] == {"data": 8, "model": 1, "mesh": "data=8,model=1"}
    bad = [m for m in tiny["meshes"] if m["model"] == 4]
    assert bad and all(not m["fits"] and "does not divide" in m["note"] for m in bad)


@pytest.mark.slow
def test_params_per_chip_follow_the_sharding_rules(plan_7b):
    """Per-chip parameter bytes come from affjax.runtime.sharding's table: attention, MLP and vocabulary
    split over the model axis; the rest (norms, biases, conv stem, positions, projector) whole, and
    the audio encoder's attention too where its 20 heads do not divide the axis."""
    total = param_counts(QWEN2_AUDIO_7B_CONFIG)["total"]
    per = {m: param_bytes_per_chip(QWEN2_AUDIO_7B_CONFIG, model=m, dtype_bytes=2) for m in (1, 2, 4, 8)}
    assert per[1] == 2 * total
    for m in (2, 4):  # 20 audio heads divide: only the small replicated parts are whole
        assert 2 * total / m < per[m] < 1.01 * 2 * total / m
    # model=8: 32 audio layers x 4 attention matrices of 1280 x 1280 stay whole on every chip
    audio_attn = 32 * (4 * 1280 * 1280 + 3 * 1280)
    assert 2 * (total / 8 + audio_attn * 7 / 8) < per[8] < 1.01 * 2 * (total / 8 + audio_attn * 7 / 8)
    rows = {(r["dtype"], r["model"]): r for r in plan_7b["topology"]["meshes"]}
    assert rows[("bfloat16", 8)]["params"] == per[8] and rows[("float32", 4)]["params"] == 2 * per[4]


@pytest.mark.slow
def test_tiny_configs_match_instantiated_models():
    import jax
    from flax import nnx

    from affjax.models.qwen2.modeling import Qwen2ForCausalLM, TextConfig
    from affjax.models.qwen2_audio.modeling import Qwen2Audio, Qwen2AudioConfig

    def real_count(model):
        return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    audio = param_counts(TINY_AUDIO)
    assert audio["total"] == real_count(Qwen2Audio(Qwen2AudioConfig.from_hf(TINY_AUDIO), rngs=nnx.Rngs(0)))
    want = analytic_qwen2_audio_params(TINY_AUDIO)
    assert {k: audio[k] for k in want} == want
    llama = param_counts(TINY_LLAMA)
    assert llama["total"] == real_count(Qwen2ForCausalLM(TextConfig.from_hf(TINY_LLAMA), rngs=nnx.Rngs(0)))
    assert llama["lm_head"] == 0 and llama["embeddings"] == 90 * 24

    torch = need_module("torch")
    import transformers

    with torch.device("meta"):
        hf_audio = transformers.Qwen2AudioForConditionalGeneration(transformers.Qwen2AudioConfig(**TINY_AUDIO))
        cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
        hf_llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    assert sum(p.numel() for p in hf_audio.parameters()) == audio["total"]
    assert sum(p.numel() for p in hf_llama.parameters()) == llama["total"]  # tied head counted once


@pytest.mark.slow
def test_format_plan_and_cli(plan_7b, tmp_path, capsys):
    text = format_plan(plan_7b)
    assert "8,397,094,912" in text and "v5e-8" in text and "choice for bfloat16" in text
    assert "assumptions:" in text and "KV cache" in text

    from affjax.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_AUDIO))
    assert main(["plan", "--ckpt-config", str(tmp_path), "--batch", "1", "2", "--length", "32", "64",
                 "--topology", "v4-8"]) == 0
    out = capsys.readouterr().out
    assert f"{param_counts(TINY_AUDIO)['total']:,}" in out and "TPU v4-8" in out
    assert main(["plan", "--ckpt-config", "qwen2-audio-7b", "--batch", "1", "--length", "2048",
                 "--topology", "all"]) == 0
    seven = capsys.readouterr().out
    for name in TOPOLOGIES:
        assert f"TPU {name}" in seven and f"choice for bfloat16 on {name}" in seven
    assert "--mesh data=" in seven and "model v5e-8 bf16" in seven
    assert len([ln for ln in out.splitlines() if ln.split()[:2] in (["1", "32"], ["2", "64"])]) == 2
    assert main(["plan", "--ckpt-config", str(tmp_path / "missing")]) == 1
    assert set(DTYPE_BYTES) >= {"float32", "bfloat16"}


# ----------------------------------------------------------------------------------------------
# Kimi-Audio-7B


def analytic_kimi_audio_params(c: dict) -> dict[str, int]:
    """Kimi-Audio's parameter count written out from config.json's numbers alone: the Whisper
    encoder, vq_adaptor (Linear, SiLU, Linear, LayerNorm), the Qwen2 decoder with q/k/v biases, the
    MIMO layers with mimo_norm, and the untied lm_head and mimo_output."""
    w = c["whisper_config"]
    d, f, mel = w["d_model"], w["encoder_ffn_dim"], w["num_mel_bins"]
    audio_layer = 4 * d * d + 3 * d + 2 * d * f + f + d + 2 * 2 * d
    audio = mel * d * 3 + d + d * d * 3 + d + w["max_source_positions"] * d + w["encoder_layers"] * audio_layer + 2 * d
    h, i, v, a_in = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["kimia_adaptor_input_dim"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h
    return {"audio_tower": audio, "projector": a_in * h + h + h * h + h + 2 * h,
            "language_model": c["num_hidden_layers"] * layer + h, "embeddings": v * h, "lm_head": v * h,
            "mimo_layers": c["kimia_mimo_layers"] * layer + h, "mimo_output": v * h}


def test_kimi_7b_config_builds():
    from affjax.models.kimi_audio.modeling import KimiAudioConfig

    cfg = KimiAudioConfig.from_hf(copy.deepcopy(KIMI_AUDIO_7B_CONFIG))
    a, t = cfg.audio, cfg.text
    assert (a.num_mel_bins, a.d_model, a.layers, a.heads, a.ffn_dim, a.max_source_positions, a.avg_pool) == \
        (128, 1280, 32, 20, 5120, 1500, 0)
    assert (t.vocab_size, t.hidden, t.layers, t.heads, t.kv_heads, t.head_dim, t.intermediate) == \
        (168448, 3584, 28, 28, 4, 128, 18944)
    assert (t.rms_eps, t.tie_embeddings, t.qkv_bias) == (1e-6, False, True)
    assert (cfg.mimo_layers, cfg.mimo_from_layer, cfg.adaptor_input_dim) == (6, 21, 5120)
    assert (cfg.frames_per_token, cfg.tokens_per_window) == (4, 375)
    assert (cfg.token_offset, cfg.media_begin, cfg.media_end) == (152064, 151661, 151663)
    json.dumps(KIMI_AUDIO_7B_CONFIG)  # config.json form


def test_kimi_7b_param_count_from_abstract_shapes():
    import jax
    from flax import nnx

    from affjax.models.kimi_audio.modeling import KimiAudio, KimiAudioConfig
    from affjax.models.layers import abstract_module

    cfg = KimiAudioConfig.from_hf(copy.deepcopy(KIMI_AUDIO_7B_CONFIG))
    abstract = abstract_module(lambda rngs: KimiAudio(cfg, rngs=rngs))
    built = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    want = analytic_kimi_audio_params(KIMI_AUDIO_7B_CONFIG)
    counts = param_counts(KIMI_AUDIO_7B_CONFIG)
    assert built == sum(want.values()) == counts["total"] == 10_403_303_424
    assert {k: counts[k] for k in want} == want
    # the release's model.safetensors.index.json total_size: everything but the Whisper encoder, in
    # bfloat16, plus the 34 RoPE inv_freq buffers (28 + 6 layers x head_dim / 2) the model recomputes
    assert 2 * (counts["total"] - counts["audio_tower"] + 34 * 64) == 19_532_673_280
    total = counts["total"]
    for m in (2, 4):  # heads, MLP and vocabulary split; at most the small parts and mimo_output whole
        per = param_bytes_per_chip(KIMI_AUDIO_7B_CONFIG, model=m, dtype_bytes=2)
        assert 2 * total / m < per <= 2 * (total / m + want["mimo_output"] + 0.01 * total)


def test_kimi_kv_cache_by_hand():
    r = plan(KIMI_AUDIO_7B_CONFIG, batch=3, seq_len=1000, audio_seconds=60)
    # K and V, 28 text layers (the 6 MIMO layers hold none on the text path), 3 rows, 1000 positions,
    # 4 KV heads of 128, 2 bytes
    assert r["kv_cache"]["bytes"]["bfloat16"] == 2 * 28 * 3 * 1000 * 4 * 128 * 2 == 172_032_000
    assert r["kv_cache"]["bytes"]["float32"] == 2 * r["kv_cache"]["bytes"]["bfloat16"]
    assert r["kv_cache"]["per_token_bytes"]["bfloat16"] == 2 * 28 * 4 * 128 * 2 == 56 * 1024
    for d in r["dtypes"]:
        assert r["total"][d] == r["param_bytes"][d] + r["kv_cache"]["bytes"][d] + r["activations"][d]["peak"]
    assert r["model_type"] == "kimi_audio" and r["geometry"]["mimo"]["layers"] == 6


def test_kimi_audio_positions():
    # 12.5 Hz, one decoder position per token, consecutive 30 s windows of 375
    assert audio_span(KIMI_AUDIO_7B_CONFIG, 60)["positions"] == 750
    assert audio_span(KIMI_AUDIO_7B_CONFIG, 60)["windows"] == 2
    assert audio_span(KIMI_AUDIO_7B_CONFIG, 30)["positions"] == 375 == audio_span(KIMI_AUDIO_7B_CONFIG)["positions"]
    # a partial last window: the official ((samples - 1) // 1280 + 1) tokens
    assert audio_span(KIMI_AUDIO_7B_CONFIG, 45) == {"seconds": 45.0, "windows": 2, "tokens_per_window": 375,
                                                     "positions": 375 + (15 * 16000 - 1) // 1280 + 1,
                                                     "adaptor_input_dim": 5120}
    assert audio_span(KIMI_AUDIO_7B_CONFIG, 0.05)["positions"] == 1
    # Qwen2-Audio: one clip cut at 30 s, pooled by 2 after the conv stride 2
    qwen = QWEN2_AUDIO_7B_CONFIG
    assert audio_span(qwen, 30)["positions"] == 750 == audio_span(qwen, 60)["positions"]
    assert audio_span(QWEN2_AUDIO_7B_CONFIG, 10)["positions"] == 250
    with pytest.raises(ValueError, match="> 0"):
        audio_span(KIMI_AUDIO_7B_CONFIG, 0)
    # the encoder runs once per window: twice the windows, twice the encoder's audio tokens
    one = plan(KIMI_AUDIO_7B_CONFIG, batch=1, seq_len=1024, dtypes=("bfloat16",), audio_seconds=30)
    two = plan(KIMI_AUDIO_7B_CONFIG, batch=1, seq_len=1024, dtypes=("bfloat16",), audio_seconds=60)
    e1, e2 = one["activations"]["bfloat16"]["encoder"], two["activations"]["bfloat16"]["encoder"]
    assert e2["audio_tokens"] == 2 * e1["audio_tokens"] == 2 * 375 * 3584 * 2
    assert e2["residual"] == 2 * e1["residual"] and two["audio"]["positions"] == 750


def test_kimi_config_loading_and_cli(tmp_path, capsys):
    assert load_hf_config("kimi-audio-7b") == KIMI_AUDIO_7B_CONFIG
    assert load_hf_config("kimi-audio-7b") is not KIMI_AUDIO_7B_CONFIG
    # a release (or converted) folder: config.json without the Whisper config, which lies beside it
    release = {k: v for k, v in KIMI_AUDIO_7B_CONFIG.items() if k != "whisper_config"}
    (tmp_path / "config.json").write_text(json.dumps(release))
    assert load_hf_config(str(tmp_path))["whisper_config"] == KIMI_AUDIO_7B_CONFIG["whisper_config"]  # default
    (tmp_path / "whisper-large-v3").mkdir()
    small = {**KIMI_AUDIO_7B_CONFIG["whisper_config"], "encoder_layers": 2}
    (tmp_path / "whisper-large-v3" / "config.json").write_text(json.dumps(small))
    assert load_hf_config(str(tmp_path / "config.json"))["whisper_config"]["encoder_layers"] == 2

    from affjax.cli import main

    assert main(["plan", "--ckpt-config", "kimi-audio-7b", "--batch", "1", "--length", "1024",
                 "--topology", "v5e-8", "--audio-seconds", "60"]) == 0
    out = capsys.readouterr().out
    assert "10,403,303,424" in out and "mimo_output" in out and "TPU v5e-8" in out
    assert "audio 60 s per row: 2 encoder window(s), 750 decoder positions" in out
    assert "(model axis 8 does not divide 28 heads / 4 KV heads)" in out
