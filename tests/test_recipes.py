"""affjax.eval.recipes, offline: each recipe on a tiny data set built in that hub data set's own column
layout with real speech (the LibriVox clips of Debian's pocketsphinx-testdata), the ``Audio``
feature cast, written with ``save_to_disk`` and loaded back through the ``hf:`` spec string.

The audio cells hold encoded files ({"bytes", "path"}), the form hub parquet files store; casting
decoded arrays to ``Audio`` needs ``torchcodec`` in datasets 5, so arrays are covered by a data set
whose audio column is a plain {"array", "sampling_rate"} struct instead.
"""

import io
import json

import numpy as np
import pytest

from conftest import need_module
datasets = need_module("datasets", "the hf: recipes need the 'datasets' package")
sf = need_module("soundfile")

from affjax.eval import metrics, recipes  # noqa: E402
from affjax.eval.recipes import RecipeError  # noqa: E402


@pytest.fixture(scope="module")
def clips(librivox):
    """[(id, float32 samples at 16 kHz, transcript)] for the five real LibriVox clips."""
    return [(it["id"], x, it["text"]) for it, x in librivox]


def encoded(x, sr, fmt="WAV"):
    """An audio cell as hub parquet files hold it: the encoded file's bytes (+ a file name)."""
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype="PCM_16")
    return {"bytes": buf.getvalue(), "path": f"clip.{fmt.lower()}"}


def resampled(x, sr):
    import soxr

    return soxr.resample(x, 16000, sr).astype(np.float32)


def save(tmp_path, name, columns, audio_col="audio", sr=16000, split=None):
    ds = datasets.Dataset.from_dict(columns)
    if audio_col is not None:
        ds = ds.cast_column(audio_col, datasets.Audio(sampling_rate=sr))
    path = tmp_path / name
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(path))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_wav(path, expected=None, seconds=None):
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    y, _ = sf.read(str(path), dtype="float32")
    if expected is not None:  # 16 kHz source: the same samples, up to 16-bit quantisation
        assert y.shape == expected.shape
        assert np.max(np.abs(y - expected)) <= 1.5 / 32768
    if seconds is not None:
        assert len(y) / 16000 == pytest.approx(seconds, rel=0.01)
    return y


# ----------------------------------------------------------------------------------------------


def test_parse_spec():
    assert recipes.parse_spec("hf:openslr/librispeech_asr:clean:test") == ("openslr/librispeech_asr", "clean", "test")
    assert recipes.parse_spec("hf:TwinkStart/KeSpeech:test") == ("TwinkStart/KeSpeech", None, "test")
    assert recipes.parse_spec("hf:facebook/covost2:en_zh-CN:test[:10]") == ("facebook/covost2", "en_zh-CN", "test[:10]")
    for bad in ("openslr/librispeech_asr:test", "hf:only", "hf:a:b:c:d", "hf::test"):
        with pytest.raises(RecipeError):
            recipes.parse_spec(bad)


def test_librispeech_recipe(clips, tmp_path):
    (a, xa, ta), (b, xb, tb) = clips[0], clips[1]
    empty = encoded(np.zeros(0, np.float32), 16000)
    cols = {
        "file": ["a.flac", "b.flac", "c.flac", "d.flac", "e.flac"],
        # b is stored as 8 kHz FLAC: the recipe must resample it to 16 kHz
        "audio": [encoded(xa, 16000), encoded(resampled(xb, 8000), 8000, "FLAC"), None, empty,
                  {"bytes": b"this is not audio", "path": "x.wav"}],
        "text": [ta.upper(), tb.upper(), "NO AUDIO", "EMPTY", "CORRUPT"],
        "speaker_id": [1, 2, 3, 4, 5], "chapter_id": [10, 20, 30, 40, 50],
        "id": [a, b, "1-2-3", "4-5-6", "7/8:9"],
    }
    src = save(tmp_path, "librispeech_asr", cols)
    out = tmp_path / "out"
    items, task = recipes.load(f"hf:{src}:clean:test", out, progress=False)
    assert task == "asr"
    lines = read_jsonl(out / "manifest.jsonl")
    assert [it["id"] for it in lines] == [a, b, "1-2-3", "4-5-6", "7/8:9"] == [it["id"] for it in items]

    good, bad = lines[:2], lines[2:]
    for it, ref in zip(good, (ta.upper(), tb.upper())):
        assert it["task"] == "asr" and it["reference"] == ref and it["language"] == "en"
        assert it["prompt"] == metrics.default_prompt("asr", language="en")
        assert it["subset"] == "clean" and "error" not in it
        assert it["audio"].startswith("audio/") and it["audio"].endswith(".wav")
    check_wav(out / good[0]["audio"], expected=xa)
    check_wav(out / good[1]["audio"], seconds=len(xb) / 16000)
    assert items[0]["audio"] == str((out / good[0]["audio"]).resolve())

    assert all("audio" not in it and it["task"] == "asr" for it in bad)
    assert "missing audio" in bad[0]["error"]
    assert "empty audio" in bad[1]["error"]
    assert "undecodable audio" in bad[2]["error"] and "'7/8:9'" in bad[2]["error"]
    assert sorted(p.name for p in (out / "audio").iterdir()) == sorted(it["audio"][6:] for it in good)

    info = json.loads((out / "recipe.json").read_text())
    assert (info["recipe"], info["task"], info["metric"], info["items"], info["errors"]) == \
        ("librispeech", "asr", "wer", 5, 3)

    # the manifest reads back with the project's reader; references score 0 WER against themselves
    from affjax.data.manifest import read_manifest

    rows = read_manifest(out / "manifest.jsonl", required=("id",))
    assert [r.item["audio"] for r in rows[:2]] == [items[0]["audio"], items[1]["audio"]]
    m = metrics.task_metrics("asr", [dict(it, text=it.get("reference", "").lower()) for it in items])
    assert m["wer"] == 0.0 and m["num_scored"] == 2  # the error items are skipped

    items2, _ = recipes.load(f"hf:{src}:clean:test", tmp_path / "out2", limit=2, progress=False)
    assert len(items2) == 2 and len(read_jsonl(tmp_path / "out2" / "manifest.jsonl")) == 2


def test_decoded_array_cells(clips, tmp_path):
    """An audio column of {"array", "sampling_rate"} structs (decoded form) works too."""
    (a, xa, ta) = clips[2]
    cols = {"audio": [{"array": xa.tolist(), "sampling_rate": 16000}, {"array": [], "sampling_rate": 16000}],
            "text": [ta, "nothing"], "id": [a, "empty"]}
    src = save(tmp_path, "LibriSpeech", cols, audio_col=None)
    items, task = recipes.load(f"hf:{src}:other:test", tmp_path / "o", progress=False)
    assert task == "asr"
    check_wav(items[0]["audio"], expected=xa)
    assert "empty audio" in items[1]["error"]


def test_kespeech_recipe_saved_datasetdict(clips, tmp_path):
    (a, xa, _), (b, xb, _) = clips[0], clips[3]
    cols = {"ID": [a, b, "k3"], "Text": ["他明天要坐火车去上海。", "今天天气很好", ""],
            "audio": [encoded(xa, 16000), encoded(resampled(xb, 22050), 22050), encoded(xb, 16000)]}
    src = save(tmp_path, "KeSpeech", cols, split="test")
    items, task = recipes.load(f"hf:{src}:test", tmp_path / "o", progress=False)
    assert task == "asr"
    assert [it["id"] for it in items] == [a, b, "k3"]
    assert items[0]["reference"] == "他明天要坐火车去上海。" and items[0]["language"] == "zh"
    assert items[0]["prompt"] == metrics.default_prompt("asr", language="zh")
    assert items[0]["prompt"].endswith("<|zh|>")
    check_wav(items[0]["audio"], expected=xa)
    check_wav(items[1]["audio"], seconds=len(xb) / 16000)
    assert "empty reference transcript" in items[2]["error"] and "audio" not in items[2]
    with pytest.raises(RecipeError, match="no split 'validation'.*test"):
        recipes.load(f"hf:{src}:validation", tmp_path / "o2", progress=False)


def test_covost2_recipe_both_directions(clips, tmp_path):
    (_, xa, ta), (_, xb, _) = clips[1], clips[4]
    cols = {"client_id": ["c1", "c2"], "file": ["a.mp3", "b.mp3"],
            "audio": [encoded(xa, 16000), encoded(xb, 16000)],
            "sentence": [ta, "he was not an ill disposed young man"],
            "translation": ["达什伍德先生那时有空考虑他能为她们做多少。", "他并不是一个心地不好的年轻人。"],
            "id": ["common_voice_en_1", "common_voice_en_2"]}
    src = save(tmp_path, "covost2", cols, split="test")
    items, task = recipes.load(f"hf:{src}:en_zh-CN:test", tmp_path / "o", progress=False)
    assert task == "st" and [it["id"] for it in items] == ["common_voice_en_1", "common_voice_en_2"]
    it = items[0]
    assert (it["source_lang"], it["target_lang"]) == ("en", "zh")
    assert it["reference"] == cols["translation"][0] and it["source_text"] == ta
    assert it["prompt"] == metrics.default_prompt("st", source_lang="en", target_lang="zh")
    assert "into Chinese" in it["prompt"]
    check_wav(it["audio"], expected=xa)

    back = {**cols, "sentence": cols["translation"], "translation": [ta, "he was not an ill disposed young man"]}
    src2 = save(tmp_path / "zh", "covost2", back, split="test")
    items, task = recipes.load(f"hf:{src2}:zh-CN_en:test", tmp_path / "o2", progress=False)
    assert (items[0]["source_lang"], items[0]["target_lang"]) == ("zh", "en")
    assert "into English" in items[0]["prompt"] and items[0]["reference"] == ta
    with pytest.raises(RecipeError, match="language-pair config"):
        recipes.load(f"hf:{src}:test", tmp_path / "o3", progress=False)


def test_voicebench_openbookqa_and_sdqa(clips, tmp_path):
    (_, xa, _), (_, xb, _), (_, xc, _) = clips[0], clips[1], clips[2]
    q1 = ("Which of these would let the most heat travel through?\nA. a new pair of jeans.\n"
          "B. a steel spoon in a cafeteria.\nC. a cotton candy at a store.\nD. a calvin klein cotton hat.")
    q2 = "Which is a mammal? (A) shark (B) whale (C) trout (D) eel"
    q3 = "Pick one of the options read aloud."  # options not in the text: the letters are the choices
    cols = {"audio": [encoded(xa, 16000), encoded(xb, 16000), encoded(xc, 16000), None],
            "prompt": [q1, q2, q3, "What?\nA. x\nB. y"], "reference": ["B", "B", "D", "A"]}
    src = save(tmp_path, "voicebench", cols, split="test")
    items, task = recipes.load(f"hf:{src}:openbookqa:test", tmp_path / "o", progress=False)
    assert task == "qa"
    assert items[0]["choices"] == ["a new pair of jeans.", "a steel spoon in a cafeteria.",
                                   "a cotton candy at a store.", "a calvin klein cotton hat."]
    assert items[0]["answer"] == 1 and items[0]["question"] == q1
    assert items[1]["choices"] == ["shark", "whale", "trout", "eel"] and items[1]["answer"] == 1
    assert items[2]["choices"] == ["A", "B", "C", "D"] and items[2]["answer"] == 3
    assert all(it["prompt"] == metrics.default_prompt("qa") for it in items[:3])
    assert "missing audio" in items[3]["error"]
    assert len({it["id"] for it in items}) == 4
    check_wav(items[0]["audio"], expected=xa)
    # the runner's scores -> accuracy: choice 1 wins twice (right, right), choice 0 once (wrong)
    rows = [dict(items[0], choice_logprobs=[-3, -1, -4, -5]), dict(items[1], choice_logprobs=[-2, -1, -9, -9]),
            dict(items[2], choice_logprobs=[-1, -2, -3, -4])]
    assert metrics.task_metrics("qa", rows)["accuracy"] == pytest.approx(2 / 3, abs=1e-6)

    sd = {"audio": [encoded(xa, 16000)], "prompt": ["who wrote sense and sensibility"],
          "reference": ["Jane Austen"], "id": ["sd-1"]}
    src2 = save(tmp_path / "sd", "voicebench", sd, split="usa")
    items, task = recipes.load(f"hf:{src2}:sd-qa:usa", tmp_path / "o2", progress=False)
    assert task == "qa" and items[0]["answer"] == "Jane Austen" and "choices" not in items[0]
    assert items[0]["id"] == "sd-1"
    with pytest.raises(RecipeError, match="GPT"):
        recipes.load(f"hf:{src}:alpacaeval:test", tmp_path / "o3", progress=False)


def test_speech_triviaqa_layouts(clips, tmp_path):
    (_, xa, _), (_, xb, _) = clips[3], clips[4]
    twink = {"audio": [encoded(xa, 16000), encoded(xb, 16000)],
             "question": ["Which Lloyd Webber musical premiered in the US on 10th December 1993?",
                          "Who was the man behind The Chipmunks?"],
             "answer": ["Sunset Boulevard", "David Seville OR Ross Bagdasarian"]}
    src = save(tmp_path, "speech-triavia-qa", twink, split="test")
    items, task = recipes.load(f"hf:{src}:test", tmp_path / "o", progress=False)
    assert task == "qa"
    assert items[0]["answer"] == "Sunset Boulevard" and items[0]["question"] == twink["question"][0]
    assert items[1]["answer"] == ["David Seville", "Ross Bagdasarian"]
    assert items[0]["prompt"] == metrics.default_prompt("qa")
    check_wav(items[1]["audio"], expected=xb)

    fixie = {"question": ["Who was the man behind The Chipmunks?"], "question_id": ["tc_2"],
             "question_audio": [encoded(xb, 16000)],
             "answer": [{"value": "David Seville", "aliases": ["David Seville", "Ross Bagdasarian"],
                         "normalized_value": "david seville"}]}
    src2 = save(tmp_path, "trivia_qa-audio", fixie, audio_col="question_audio", split="validation")
    items, task = recipes.load(f"hf:{src2}:validation", tmp_path / "o2", progress=False)
    assert items[0]["id"] == "tc_2" and items[0]["answer"] == ["David Seville", "Ross Bagdasarian"]
    check_wav(items[0]["audio"], expected=xb)
    assert metrics.task_metrics("qa", [dict(items[0], text="Ross Bagdasarian.")])["accuracy"] == 1.0


def test_unknown_dataset_and_generic_columns(clips, tmp_path):
    (a, xa, ta) = clips[0]
    cols = {"wav": [encoded(xa, 16000)], "transcript": [ta], "utt": [a]}
    src = save(tmp_path, "my_speech", cols, audio_col="wav")
    with pytest.raises(RecipeError) as e:
        recipes.load(f"hf:{src}:train", tmp_path / "o", progress=False)
    for name in ("librispeech", "kespeech", "covost2", "voicebench", "speech_triviaqa"):
        assert name in str(e.value)
    items, task = recipes.load(f"hf:{src}:train", tmp_path / "o", progress=False, task="asr",
                               columns={"audio": "wav", "reference": "transcript", "id": "utt"})
    assert task == "asr" and items[0]["id"] == a and items[0]["reference"] == ta
    check_wav(items[0]["audio"], expected=xa)
    with pytest.raises(RecipeError, match="not in the dataset"):
        recipes.load(f"hf:{src}:train", tmp_path / "o", progress=False, task="asr",
                     columns={"audio": "wav", "reference": "text"})
