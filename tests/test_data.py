"""Audio loading, manifests, offline assets and the tiny Qwen2-Audio test checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import need_module, need_asset
import soundfile as sf

from affjax.data import assets
from affjax.data.assets import AssetMissing
from affjax.data.audio import AudioError, load_audio
from affjax.data.manifest import ManifestRow, read_manifest


def _asset(fn, *args):
    return need_asset(fn, *args)


# ----------------------------------------------------------------------------------------------
# audio


def test_wav_8k_stereo_resampled_to_16k_mono(tmp_path):
    sr = 8000
    t = np.arange(sr) / sr  # 1 s
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.25 * np.sin(2 * np.pi * 440 * t)
    p = tmp_path / "stereo.wav"
    sf.write(p, np.stack([left, right], axis=1), sr, subtype="PCM_16")
    x = load_audio(p)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) <= 2
    mid = x[2000:-2000]  # away from resampler edges
    assert abs(np.max(np.abs(mid)) - 0.375) < 0.01  # mean of the two channels
    # the tone survives at 440 Hz
    spec = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spec) * 16000 / len(x) - 440) < 2


def test_flac_same_rate_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.uniform(-0.5, 0.5, 4000) * 32767).astype(np.int16)
    p = tmp_path / "a.flac"
    sf.write(p, y, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(p), y.astype(np.float32) / 32768.0)


def test_target_rate_argument(tmp_path):
    p = tmp_path / "a.wav"
    sf.write(p, np.zeros(16000, np.float32) + 0.1, 16000)
    assert abs(len(load_audio(p, sr=8000)) - 8000) <= 1


def test_raw_int16_le_16k(tmp_path):
    y = np.array([0, 1000, -1000, 32767, -32768], dtype="<i2")
    p = tmp_path / "a.raw"
    p.write_bytes(y.tobytes())
    np.testing.assert_array_equal(load_audio(p), y.astype(np.float32) / 32768.0)
    assert len(load_audio(p, sr=8000)) in (2, 3)


def test_raw_odd_bytes(tmp_path):
    p = tmp_path / "odd.raw"
    p.write_bytes(b"\x01\x02\x03")
    with pytest.raises(AudioError, match="odd number of bytes"):
        load_audio(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="not found") as ei:
        load_audio(p)
    assert "nope.wav" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_corrupt_file(tmp_path):
    p = tmp_path / "bad.wav"
    p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio" * 3)
    with pytest.raises(AudioError, match="unreadable or corrupt") as ei:
        load_audio(p)
    assert "bad.wav" in str(ei.value)


@pytest.mark.parametrize("name", ["empty.wav", "empty.raw"])
def test_empty(tmp_path, name):
    p = tmp_path / name
    if name.endswith(".wav"):
        sf.write(p, np.zeros(0, np.float32), 16000)
    else:
        p.write_bytes(b"")
    with pytest.raises(AudioError, match="empty") as ei:
        load_audio(p)
    assert name in str(ei.value)


def test_nan_samples(tmp_path):
    y = np.zeros(100, np.float32)
    y[10] = np.nan
    y[20] = np.inf
    p = tmp_path / "nan.wav"
    sf.write(p, y, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN/inf"):
        load_audio(p)


# ----------------------------------------------------------------------------------------------
# manifest


def test_manifest_rows_and_errors(tmp_path):
    (tmp_path / "clips").mkdir()
    lines = [
        json.dumps({"id": "a", "audio": "clips/a.wav", "prompt": "p"}).encode(),   # 1 ok, relative
        b"",                                                                       # 2 blank
        json.dumps({"id": "b", "audio": "/abs/b.wav", "prompt": "p"}).encode(),    # 3 ok, absolute
        b'{"id": "c", "audio": ',                                                  # 4 malformed
        b"[1, 2, 3]",                                                              # 5 not an object
        json.dumps({"id": "d", "audio": "d.wav"}).encode(),                        # 6 missing prompt
        b'{"id": "e", "audio": "e.wav", "prompt": "\xff\xfe"}',                    # 7 not UTF-8
        json.dumps({"id": "a", "audio": "a2.wav", "prompt": "p"}).encode(),        # 8 duplicate id
        json.dumps({"audio": "f.wav", "prompt": "p"}).encode(),                    # 9 no id
        b"   ",                                                                    # 10 blank
    ]
    m = tmp_path / "m.jsonl"
    m.write_bytes(b"\n".join(lines) + b"\n")

    rows = read_manifest(m, required=("audio", "prompt"))
    assert all(isinstance(r, ManifestRow) for r in rows)
    by_line = {r.index: r for r in rows}
    assert sorted(by_line) == [1, 3, 4, 5, 6, 7, 8, 9]

    assert by_line[1].error is None and by_line[1].id == "a"
    assert Path(by_line[1].item["audio"]) == (tmp_path / "clips" / "a.wav").resolve()
    assert by_line[3].item["audio"] == "/abs/b.wav"

    assert by_line[4].item is None and "line 4" in by_line[4].error and "malformed JSON" in by_line[4].error
    assert "line 5" in by_line[5].error and "JSON object" in by_line[5].error
    assert "line 6" in by_line[6].error and "'d'" in by_line[6].error and "prompt" in by_line[6].error
    assert "line 7" in by_line[7].error and "UTF-8" in by_line[7].error
    assert "line 8" in by_line[8].error and "duplicate id 'a'" in by_line[8].error and "line 1" in by_line[8].error
    assert by_line[9].error is None and by_line[9].id == "line-9"

    # "id" itself required: the id-less line becomes an error row
    rows = read_manifest(m, required=("id", "audio", "prompt"))
    r9 = next(r for r in rows if r.index == 9)
    assert r9.error is not None and "id" in r9.error and r9.id == "line-9"


def test_manifest_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "none.jsonl")


def test_manifest_crlf_and_bom(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'\xef\xbb\xbf{"id": 1, "audio": "x.wav"}\r\n{"id": "2", "audio": "y.wav"}\r\n')
    rows = read_manifest(m)
    assert [r.error for r in rows] == [None, None]
    assert [r.id for r in rows] == ["1", "2"]


# ----------------------------------------------------------------------------------------------
# assets


def test_asset_missing_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AFFJAX_ASSETS", str(tmp_path / "empty"))
    with pytest.raises(AssetMissing, match="python -m affjax.data.assets install"):
        assets.qwen2_tokenizer_json()
    assert assets.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "[missing] qwen2-tokenizer" in out and "[missing] whisper base" in out


def test_parse_sphinx_transcription(tmp_path):
    p = tmp_path / "t"
    p.write_text("<s> hello  world </s> (utt-1)\n\n<s> second one </s> (utt_2)\n")
    assert assets.parse_sphinx_transcription(p) == [("utt-1", "hello world"), ("utt_2", "second one")]


def test_qwen2_tokenizer_asset():
    from tokenizers import Tokenizer

    p = _asset(assets.qwen2_tokenizer_json)
    tok = Tokenizer.from_file(str(p))
    assert tok.token_to_id("<|endoftext|>") == 151643
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.decode(tok.encode("Hello world").ids) == "Hello world"


@pytest.mark.parametrize("name,d_model,vocab", [("tiny.en", 384, 51864), ("base", 512, 51865)])
def test_whisper_ct2_assets(name, d_model, vocab):
    d = _asset(assets.whisper_ct2_dir, name)
    for f in ("model.bin", "config.json", "tokenizer.json"):
        assert (d / f).is_file()
    with open(d / "model.bin", "rb") as f:
        assert int.from_bytes(f.read(4), "little") == 6  # CTranslate2 binary version
    if name == "base":
        assert (d / "model.bin").stat().st_size == assets.WHISPER_BASE_SIZE
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    # the shipped tokenizer.json stops at <|notimestamps|>: the 1501 timestamp tokens
    # <|0.00|>..<|30.00|> that fill the model's vocabulary are not in it
    assert tok.get_vocab_size(with_added_tokens=True) == vocab - 1501
    assert tok.token_to_id("<|notimestamps|>") == vocab - 1502
    cfg = json.loads((d / "config.json").read_text())
    assert "suppress_ids" in cfg and "lang_ids" in cfg


def test_whisper_unknown_name():
    with pytest.raises(ValueError):
        assets.whisper_ct2_dir("large")


def test_smollm2_gguf_asset():
    p = _asset(assets.smollm2_gguf)
    with open(p, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_librivox_items():
    items = _asset(assets.librivox_items)
    assert len(items) == 5
    assert items[0]["id"] == "sense_and_sensibility_01_austen_64kb-0870"
    assert items[1]["text"] == "he was not an ill disposed young man"
    for it in items:
        x = load_audio(it["audio"])
        assert 2.5 <= len(x) / 16000 <= 8.0
        assert it["text"] == it["text"].lower() and "<s>" not in it["text"]


# ----------------------------------------------------------------------------------------------
# synthetic inputs


def test_synth_speech_like_and_long_prompt():
    from affjax.testing import AUDIO_PLACEHOLDER, long_prompt, synth_speech_like

    a = synth_speech_like(2.5, seed=3)
    assert a.dtype == np.float32 and a.shape == (40000,)
    assert np.all(np.isfinite(a)) and abs(np.max(np.abs(a)) - 0.5) < 1e-6
    np.testing.assert_array_equal(a, synth_speech_like(2.5, seed=3))
    assert not np.array_equal(a, synth_speech_like(2.5, seed=4))
    p = long_prompt(320, seed=1)
    assert p.count(AUDIO_PLACEHOLDER) == 1 and p == long_prompt(320, seed=1)
    assert 300 <= len(p.split()) <= 340


# ----------------------------------------------------------------------------------------------
# tiny Qwen2-Audio checkpoint


def test_tiny_qwen2_audio_roundtrip(tiny_qwen2_audio_dir):
    import torch
    from safetensors import safe_open
    from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

    from affjax.testing import AUDIO_PLACEHOLDER, SAVED_KEY_PREFIXES, long_prompt, synth_speech_like

    d = Path(tiny_qwen2_audio_dir)
    proc = Qwen2AudioProcessor.from_pretrained(d)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(d).eval()
    tok = proc.tokenizer
    audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")
    assert model.config.audio_token_index == audio_id == proc.audio_token_id
    assert model.config.text_config.vocab_size == len(tok)
    ids = tok.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"])
    assert len(set(ids)) == 3 and min(ids) >= 151643
    assert tok.decode([ids[1], ids[0], ids[2]], skip_special_tokens=True) == ""
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|endoftext|>"),
                                                   tok.convert_tokens_to_ids("<|im_end|>")]

    # key layout on disk
    keys = []
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "np") as sf_:
            keys += list(sf_.keys())
    assert keys and all(k.startswith(SAVED_KEY_PREFIXES) for k in keys)
    assert "language_model.lm_head.weight" in keys and "audio_tower.layers.0.self_attn.q_proj.bias" in keys

    # processor: 5 s of audio -> the right number of <|AUDIO|> tokens
    audio = synth_speech_like(5.0, seed=0)
    text = long_prompt(300, seed=0)
    out = proc(text=[text], audio=[audio], return_tensors="pt")
    L = int(out["feature_attention_mask"].sum())
    assert L == 500
    n_audio = int((out["input_ids"] == audio_id).sum())
    assert n_audio == (((L - 1) // 2 + 1) - 2) // 2 + 1 == 125
    assert out["input_features"].shape == (1, 80, 3000)
    assert out["input_ids"].shape[1] > 300 + n_audio
    assert text.count(AUDIO_PLACEHOLDER) == 1

    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape == (1, out["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tiny_qwen2_audio_sharded_tied(tmp_path):
    need_module("torch")
    _asset(assets.qwen2_tokenizer_json)
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    from affjax.testing import make_tiny_qwen2_audio

    d = make_tiny_qwen2_audio(tmp_path / "m", sharded=True, tie_word_embeddings=True, kv_heads=2, seed=1)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (d / "model.safetensors.index.json").is_file()
    m = Qwen2AudioForConditionalGeneration.from_pretrained(d)
    assert m.config.text_config.num_key_value_heads == 2
    assert torch.equal(m.lm_head.weight, m.model.language_model.embed_tokens.weight)
    ln = m.model.audio_tower.layers[0].self_attn_layer_norm
    assert not torch.all(ln.weight == 1) and not torch.all(ln.bias == 0)
