"""Whisper checkpoints, pooled transcription and the `eval --task asr` job.

Without assets: converting a tiny random `WhisperForConditionalGeneration.save_pretrained` folder.
With the real assets (skipped with the install command when missing): the CT2 tiny.en folder
through the converter; pooling that merges nothing reproduces the unpooled transcripts exactly;
the static-shape pooled encoder output equals the sequential reference; base's WER on the five
LibriVox clips, unpooled and at the default pooled setting; error rows; the CLI end to end.

The tiny.en tests all run batches of 2 with up to 128 new tokens, as the eval jobs of 2 items
below do, so they share compiled programs (the encoder pieces, the pooling stages, the greedy
loop) instead of compiling each batch size anew; tests/test_whisper_sweep.py decodes the same
batch (the first two clips).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import need_asset, need_module
from affjax.runtime.flops import whisper_encoder_flops


# ----------------------------------------------------------------------------------------------
# No assets needed


def test_convert_hf_whisper_dir(tmp_path):
    torch = need_module("torch")
    from transformers import WhisperConfig as HFConfig
    from transformers import WhisperForConditionalGeneration

    from affjax.models.checkpoint import convert, load
    from affjax.models.whisper.modeling import Whisper

    vocab = 100
    hcfg = HFConfig(vocab_size=vocab, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_source_positions=20, max_target_positions=16, pad_token_id=vocab - 3,
                    bos_token_id=vocab - 3, eos_token_id=vocab - 3, decoder_start_token_id=vocab - 2,
                    suppress_tokens=None, begin_suppress_tokens=None)
    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(hcfg).eval()
    with torch.no_grad():  # non-trivial biases and norms; the embedding stays tied to proj_out
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    hf.save_pretrained(tmp_path / "hf")
    dst = convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    model, cfg, meta = load(dst)
    assert isinstance(model, Whisper) and meta["model_type"] == "whisper"
    assert meta["source_format"] == "huggingface" and cfg.encoder.layers == 2

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 16, 40)).astype(np.float32)
    toks = rng.integers(0, vocab, (2, 7))
    with torch.no_grad():
        ref = hf(input_features=torch.from_numpy(feats), decoder_input_ids=torch.from_numpy(toks)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lambda m, f, t: m(f, t))(model, jnp.asarray(feats), jnp.asarray(toks)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

    # older checkpoints store the tied projection too: accepted when equal, refused when not
    from safetensors.numpy import load_file, save_file

    from affjax.models.weights import WeightError
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    assert "proj_out.weight" not in sd
    emb = sd["model.decoder.embed_tokens.weight"]
    save_file({**sd, "proj_out.weight": emb.copy()}, tmp_path / "hf" / "model.safetensors")
    convert(tmp_path / "hf", tmp_path / "ckpt2", progress=False)
    save_file({**sd, "proj_out.weight": emb + 1}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(WeightError, match="proj_out"):
        convert(tmp_path / "hf", tmp_path / "ckpt3", progress=False)
    assert not (tmp_path / "ckpt3").exists()


# ----------------------------------------------------------------------------------------------
# Real weights and real speech


@pytest.fixture(scope="module")
def clips(librivox):
    return [it for it, _ in librivox], [x for _, x in librivox]


def _ct2(name):
    from affjax.data.assets import whisper_ct2_dir
    return need_asset(whisper_ct2_dir, name)


@pytest.fixture(scope="module")
def tiny_ckpt(real_whisper):
    """tiny.en converted through checkpoints_convert's code path, placed where `--model` looks
    (`$AFFJAX_CACHE/models/whisper-tiny.en`): (checkpoint dir, cache dir)."""
    return real_whisper("tiny.en")[:2]


@pytest.fixture(scope="module")
def tiny(real_whisper, clips):
    """(model, processor, unpooled transcription of the first two clips) from the converted checkpoint."""
    from affjax.models.whisper.decoding import transcribe
    _, _, model, processor, _ = real_whisper("tiny.en")
    ref = transcribe(model, processor, clips[1][:2], batch_size=2)
    return model, processor, ref


def test_convert_ct2_folder(tiny_ckpt):
    from transformers import GenerationConfig, WhisperProcessor

    from affjax.models.checkpoint import load
    from affjax.models.whisper.ct2 import read_ct2
    dst, _ = tiny_ckpt
    model, cfg, meta = load(dst)
    assert meta["source_format"] == "ctranslate2" and meta["hf_config"]["model_type"] == "whisper"
    assert (cfg.encoder.layers, cfg.d_model, cfg.vocab_size) == (4, 384, 51864)
    proc = WhisperProcessor.from_pretrained(str(dst))
    assert len(proc.tokenizer) == cfg.vocab_size
    assert GenerationConfig.from_pretrained(str(dst)).decoder_start_token_id == cfg.decoder_start_token_id
    v = read_ct2(_ct2("tiny.en") / "model.bin")
    np.testing.assert_array_equal(np.asarray(model.decoder.embed_tokens[...]),
                                  v["decoder/embeddings/weight"].astype(np.float32))
    q = np.split(v["encoder/layer_1/self_attention/linear_0/weight"], 3)[0].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.encoder.layers[1].q_proj.kernel[...]), q.T)
    # the suppressed tokens travel into the checkpoint, so `affjax eval` decodes as `generate` does
    ct2_cfg = json.loads((_ct2("tiny.en") / "config.json").read_text())
    assert cfg.suppress_tokens == tuple(ct2_cfg["suppress_ids"]) and len(cfg.suppress_tokens) > 50
    assert cfg.begin_suppress_tokens == tuple(ct2_cfg["suppress_ids_begin"])


def test_cached_model_of_an_older_converter_is_converted_again(tmp_path, monkeypatch):
    """`--model` reconverts a cached checkpoint whose format is older than the converter's."""
    from affjax.models.checkpoint import CONFIG_NAME, FORMAT
    from affjax.eval.runner import JobConfig, resolve_checkpoint
    _ct2("tiny.en")
    monkeypatch.setenv("AFFJAX_CACHE", str(tmp_path))
    stale = tmp_path / "models" / "whisper-tiny.en"
    stale.mkdir(parents=True)
    (stale / CONFIG_NAME).write_text(json.dumps({"model_type": "whisper"}))  # format 1: no "format" key
    logs = []
    dst, _ = resolve_checkpoint(JobConfig(model="whisper-tiny.en"), log=logs.append)
    assert dst == stale and "older converter" in logs[0]
    assert json.loads((dst / CONFIG_NAME).read_text())["format"] == FORMAT
    logs.clear()
    resolve_checkpoint(JobConfig(model="whisper-tiny.en"), log=logs.append)
    assert logs == []


@pytest.mark.slow
def test_pooling_that_merges_nothing_is_unpooled(tiny, clips):
    """tau > 1 at every kind of stage (stem, deep, encoder output), proportional on: the same
    tokens as the unpooled model, and every frame kept."""
    from affjax.models.whisper import asr
    model, processor, ref = tiny
    pooling = asr.parse_whisper_pooling("0:tau=2,window=1;2:tau=1.5,window=2;4:tau=2,window=1", model.cfg, True)
    out = asr.transcribe_pooled(model, processor, clips[1][:2], pooling, batch_size=2)
    assert out.tokens == ref.tokens and out.texts == ref.texts and all(ref.finished)
    assert all(a[1:] == [a[0]] * 3 for a in out.audio_tokens)
    assert out.enc_len == [1500] * 2 and all(lt == [1500] * 4 for lt in out.layer_tokens)


def test_pooled_encoder_output_matches_reference(tiny, clips):
    """The static-shape stage on the real encoder output of one clip (inside a padded batch)
    equals the sequential reference stage on that clip alone. The steps of `pooled_encode` (start,
    the encoder, the stage, finish), so the stage's input is at hand without a second encoder run."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pooling_reference import ref_stage

    from affjax.models.whisper import asr
    from affjax.models.whisper.decoding import whisper_features
    from affjax.runtime import shapes
    model, processor, _ = tiny
    wave = clips[1][1]
    feats = whisper_features(processor, [wave], 2, model.cfg)
    frames = asr.audio_frames(len(wave), model.cfg.encoder)
    pooling = asr.parse_whisper_pooling("4:tau=0.9,window=2", model.cfg)
    (stage,) = pooling.stages
    st = asr.encoder_advance(model, asr.encoder_start(model, feats, np.array([frames, 0]), 1), stage.layer)
    assert st.finished and st.key_valid is None and st.bias is None  # the unpooled encoder output
    h = np.asarray(st.x)[0]
    e = asr.encoder_finish(model, asr.encoder_stage(st, stage, proportional=pooling.proportional,
                                                    buckets=shapes.encoder_buckets(1500)))
    span = (np.arange(1500) < frames).astype(np.int32)
    r = ref_stage(h, span, np.arange(1500, dtype=np.float32), np.ones(1500, np.float32), tau=0.9, window=2)
    n = len(r["h"])
    assert r["audio_out"] < r["audio_in"] == frames and n == int(e.enc_len[0])
    assert list(e.audio_tokens[0]) == [frames, r["audio_out"]]
    np.testing.assert_allclose(np.asarray(e.enc[0, :n]), r["h"], atol=1e-5, rtol=0)
    assert not np.asarray(e.valid[0, n:]).any() and not np.asarray(e.valid[1]).any()


@pytest.mark.slow
def test_deep_stage_runs_with_fewer_encoder_flops(tiny, clips):
    from affjax.models.whisper import asr
    model, processor, _ = tiny
    pooling = asr.parse_whisper_pooling("2:tau=0.95,window=1", model.cfg, proportional=True)
    out = asr.transcribe_pooled(model, processor, clips[1][:2], pooling, batch_size=2)
    assert all(a[1] < a[0] for a in out.audio_tokens) and all(out.texts)
    full = whisper_encoder_flops(model.cfg.encoder, [1500] * 4)
    for lt, n in zip(out.layer_tokens, out.enc_len):
        assert lt[:2] == [1500, 1500] and lt[2] == lt[3] == n < 1500
        assert whisper_encoder_flops(model.cfg.encoder, lt) < full


@pytest.mark.slow
def test_base_wer_pooled(clips, real_whisper):
    """The accuracy bench: Whisper base on the five LibriVox clips at the main job's default pooled
    setting (encoder output, tau 0.95, window 1, proportional) merges frames and stays within the
    5 % WER that test_whisper.py::test_real_wer holds the unpooled transcripts to."""
    from affjax.eval.whisper import corpus_wer, make_normalizer
    from affjax.models.whisper import asr
    items, waves = clips
    _, _, model, processor, _ = real_whisper("base")
    norm, _ = make_normalizer(processor.tokenizer)
    out = asr.transcribe_pooled(model, processor, waves, asr.default_pooling(model.cfg), batch_size=5)
    a = np.asarray(out.audio_tokens)
    assert a[:, 1].sum() < 0.9 * a[:, 0].sum()
    wer = corpus_wer([norm(it["text"]) for it in items], [norm(t) for t in out.texts])
    assert wer <= 0.05, wer


@pytest.mark.slow
def test_eval_job_error_rows(tiny_ckpt, clips, tmp_path):
    from affjax.eval.runner import JobConfig, run_eval
    items, _ = clips
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 3)
    lines = [json.dumps({"id": "good", "audio": str(items[4]["audio"]), "text": items[4]["text"]}),
             json.dumps({"id": "missing", "audio": "nope.wav", "text": "x"}),
             json.dumps({"id": "corrupt", "audio": "corrupt.wav", "text": "x"}),
             "{not json",
             json.dumps({"id": "noref", "audio": str(items[4]["audio"])})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    s = run_eval(JobConfig(ckpt=str(tiny_ckpt[0]), manifest=str(tmp_path / "m.jsonl"), out=str(tmp_path / "out"),
                            pooling="4:tau=0.95,window=1", proportional=True, progress=False))
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["good", "missing", "corrupt", "line-4", "noref"]
    assert "not found" in rows[1]["error"] and "corrupt" in rows[2]["error"] and "JSON" in rows[3]["error"]
    assert rows[0]["text"].startswith("He might even") and rows[4]["reference"] is None
    assert rows[0]["audio_tokens"][1] < rows[0]["audio_tokens"][0]
    assert (s["ok"], s["errors"], s["scored"]) == (2, 3, 1) and s["wer"] == 0.0
    assert s["final_retention"] < 1 and s["decoder_flops_rel"] < 1 and s["encoder_flops_rel"] == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["wer"] == 0.0


@pytest.mark.slow
def test_cli_eval_model_librivox(tiny_ckpt, clips, tmp_path, capsys, monkeypatch):
    """`affjax eval --model whisper-tiny.en --data librivox --limit 2` end to end through the CLI's
    main (the converted model is found in $AFFJAX_CACHE): unpooled and the default pooled setting.
    In this process, so the programs compiled by the tests above (batches of 2, as here) are reused;
    the `python -m affjax.cli` entry point itself runs in a subprocess in test_jobs.py (the kill -9
    test)."""
    from affjax.cli import main
    monkeypatch.setenv("AFFJAX_CACHE", str(tiny_ckpt[1]))
    # --no-compile-cache: keep the session's compile cache settings (conftest) for the later tests
    rc = main(["eval", "--model", "whisper-tiny.en", "--data", "librivox", "--limit", "2", "--out",
               str(tmp_path / "run"), "--no-progress", "--no-compile-cache"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert "converting" not in out.out and "WER" in out.out
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    unpooled, pooled = s["runs"]
    assert unpooled["pooling"] == "none" and pooled["pooling"] == "4:tau=0.95,window=1" and pooled["proportional"]
    assert unpooled["wer"] <= 0.10 and pooled["wer"] <= 0.10 and pooled["final_retention"] < 1
    for sub in ("unpooled", "pooled"):
        assert len((tmp_path / "run" / sub / "results.jsonl").read_text().splitlines()) == 2
