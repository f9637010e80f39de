"""`affjax eval` on Qwen2-Audio checkpoints (affjax.eval.lslm): tiny random checkpoints written
with save_pretrained, checked against transformers (PyTorch, float32), plus the job's behaviour:
two-pass scheduling equal to in-order, 30 s windowing, resuming, error rows, compile counts.

Tolerances: choice log-likelihoods within 1e-3 of transformers (sums over a few tokens; observed
~1e-6), two-pass vs in-order within 1e-4, greedy tokens identical.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import need_module, need_asset
torch = need_module("torch")
sf = need_module("soundfile")

SR = 16000


@pytest.fixture(scope="module")
def ckpt(tiny_qwen2_audio_ckpt):
    return tiny_qwen2_audio_ckpt


@pytest.fixture(scope="module")
def processor(ckpt):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def hf_model(tiny_qwen2_audio_dir):
    from transformers import Qwen2AudioForConditionalGeneration
    return Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio_dir, dtype=torch.float32).eval()


def _wav(path, seconds, seed, sr=SR, channels=1):
    from affjax.testing import synth_speech_like
    x = synth_speech_like(seconds, sr=sr, seed=seed)
    if channels > 1:
        x = np.stack([x, 0.5 * x], axis=1)
    sf.write(str(path), x, sr)
    return path


def _manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(ckpt, manifest, out, **kw):
    from affjax.eval.runner import JobConfig, run_eval
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 2)
    kw.setdefault("max_new_tokens", 8)
    cfg = JobConfig(ckpt=str(ckpt), manifest=None if manifest is None else str(manifest), out=str(out), **kw)
    return run_eval(cfg, log=lambda *_: None)


def _results(out):
    return [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]


def _prompt(processor, words, seed):
    """A prompt of about `words` words with one audio block (affjax.testing.long_prompt)."""
    from affjax.models.qwen2_audio.inputs import audio_block
    from affjax.testing import long_prompt
    p = long_prompt(words, seed=seed)
    assert p.count(audio_block(processor)) == 1
    return p


QA_CHOICES = [" red", " a green tree", " blue sky over the sea", " yes"]


@pytest.fixture(scope="module")
def qa_manifest(processor, tmp_path_factory):
    d = tmp_path_factory.mktemp("qa")
    rows = []
    for i, (sec, words) in enumerate([(2.0, 300), (9.0, 40), (30.0, 120), (4.5, 200), (17.0, 10)]):
        rows.append({"id": f"q{i}", "audio": _wav(d / f"q{i}.wav", sec, seed=i).name,
                     "prompt": _prompt(processor, words, seed=i), "choices": QA_CHOICES, "answer": i % 4})
    return _manifest(d / "qa.jsonl", rows)


def _hf_choice_logprob(hf_model, processor, prompt, wav, choice):
    x = processor(text=[prompt], audio=[wav], sampling_rate=SR, return_tensors="pt")
    c = processor.tokenizer(choice, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([x["input_ids"], c], 1)
    n, k = x["input_ids"].shape[1], c.shape[1]
    with torch.no_grad():  # the head only where the choice is predicted (positions n - 1 .. n + k - 2)
        h = hf_model.model(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=x["input_features"],
                           feature_attention_mask=x["feature_attention_mask"]).last_hidden_state[0, n - 1:n - 1 + k]
        lp = torch.log_softmax(hf_model.lm_head(h).double(), -1)
    return float(sum(lp[j, c[0, j]] for j in range(k)))


@pytest.fixture(scope="module")
def qa_run(ckpt, qa_manifest, tmp_path_factory):
    """The unpooled qa job on `qa_manifest`, run once: (summary, run folder). Read-only: the choice
    scores are checked against transformers, and the resume test works on a copy of the folder."""
    out = tmp_path_factory.mktemp("qa_run") / "run"
    return _eval(ckpt, qa_manifest, out, task="qa"), out


@pytest.mark.slow
def test_qa_choice_scores_match_transformers(qa_run, qa_manifest, hf_model, processor):
    """Two-pass scheduling: the audio is encoded once per item and each choice is appended to the
    stored row; the choice log-likelihoods equal transformers' on prompt + choice."""
    from affjax.data.audio import load_audio
    s, run = qa_run
    res = _results(run)
    assert [r["id"] for r in res] == [f"q{i}" for i in range(5)] and s["errors"] == 0
    items = [json.loads(l) for l in qa_manifest.read_text().splitlines()]
    for r, it in zip(res, items):
        wav = load_audio(qa_manifest.parent / it["audio"], sr=SR)
        ref = [_hf_choice_logprob(hf_model, processor, it["prompt"], wav, c) for c in QA_CHOICES]
        np.testing.assert_allclose(r["choice_logprobs"], ref, atol=1e-3, rtol=0)
        assert r["pred"] == int(np.argmax(ref))
    acc = np.mean([r["pred"] == it["answer"] for r, it in zip(res, items)])
    assert s["primary"][0] == "accuracy" and s["primary"][1] == pytest.approx(acc)


# The position policy that stores the most per row (positions re-indexed, proportional attention);
# every policy against the reference is in test_pooled_model.py.
POOLED = dict(pooling="0:tau=0.5,window=2;1:tau=0.3,window=3", positions="reindex", proportional=True)


@pytest.mark.slow
def test_two_pass_equals_in_order(ckpt, qa_manifest, tmp_path):
    """The stored-row path (pass 2 batches by pooled length) gives the in-order path's numbers, with
    input and deep pooling; and it pads less."""
    setting = POOLED
    a = _eval(ckpt, qa_manifest, tmp_path / "two", task="qa", **setting)
    b = _eval(ckpt, qa_manifest, tmp_path / "one", task="qa", schedule="in-order", **setting)
    ra, rb = _results(tmp_path / "two"), _results(tmp_path / "one")
    assert a["final_retention"] < 0.9  # the stages really merged
    for x, y in zip(ra, rb):
        assert x["audio_tokens"] == y["audio_tokens"] and x["lm_tokens"] == y["lm_tokens"]
        np.testing.assert_allclose(x["choice_logprobs"], y["choice_logprobs"], atol=1e-4, rtol=0)
    assert a["padding_fraction"] <= b["padding_fraction"]


@pytest.mark.slow
def test_generation_two_pass_equals_in_order_and_fixed(ckpt, processor, tmp_path):
    d = tmp_path
    rows = [{"id": f"a{i}", "audio": _wav(d / f"a{i}.wav", s, seed=20 + i).name,
             "prompt": _prompt(processor, w, seed=i), "reference": "hello world"}
            for i, (s, w) in enumerate([(3.0, 250), (12.0, 30), (25.0, 90)])]
    m = _manifest(d / "asr.jsonl", rows)
    # one batch of 3 (each bucket compiles its own programs; two batches would double them)
    setting = dict(pooling="0:tau=0.5,window=2;1:tau=0.3,window=3", proportional=True, batch_size=3)
    a = _eval(ckpt, m, d / "two", **setting)
    b = _eval(ckpt, m, d / "one", schedule="in-order", **setting)
    c = _eval(ckpt, m, d / "fixed", pool_mode="fixed", capacity=1.0, **setting)
    ta, tb, tc = ([r["tokens"] for r in _results(d / x)] for x in ("two", "one", "fixed"))
    assert ta == tb == tc and all(len(t) for t in ta)
    assert a["primary"][0] == "wer" and a["metrics"] == b["metrics"]
    assert c["schedule"] == "in-order" and c["forced_merges"] == 0


def test_long_audio_windows_match_transformers(ckpt, processor, hf_model, tmp_path):
    """75 s of audio becomes three consecutive clips (30 + 30 + 15 s); greedy tokens equal
    transformers' on the same three windows with the prompt's block repeated."""
    from affjax.data.audio import load_audio
    from affjax.data.audio import split_windows
    from affjax.models.qwen2_audio.inputs import WINDOW_SECONDS, audio_block
    wav_path = _wav(tmp_path / "long.wav", 75.0, seed=5)
    prompt = _prompt(processor, 60, seed=3)
    m = _manifest(tmp_path / "m.jsonl", [{"id": "long", "audio": "long.wav", "prompt": prompt}])
    _eval(ckpt, m, tmp_path / "run", max_new_tokens=12, pooling="none")
    (r,) = _results(tmp_path / "run")
    assert r["windows"] == 3 and r["audio_seconds"] == pytest.approx(75.0)
    assert r["audio_tokens"] == [750 + 750 + 375]
    wins = split_windows(load_audio(wav_path, sr=SR), SR, WINDOW_SECONDS)
    assert [len(w) for w in wins] == [30 * SR, 30 * SR, 15 * SR]
    text = prompt.replace(audio_block(processor), audio_block(processor) * 3)
    x = processor(text=[text], audio=wins, sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        g = hf_model.generate(**x, max_new_tokens=12, do_sample=False, num_beams=1)
    ref = g[0, x["input_ids"].shape[1]:].tolist()
    eos = set(hf_model.generation_config.eos_token_id if isinstance(hf_model.generation_config.eos_token_id, list)
              else [hf_model.generation_config.eos_token_id])
    ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert r["tokens"] == ref


def test_bad_items_become_error_rows(ckpt, processor, tmp_path):
    d = tmp_path
    good = _wav(d / "good.wav", 2.0, seed=1).name
    _wav(d / "odd_rate.wav", 2.0, seed=2, sr=11025)
    _wav(d / "stereo.wav", 2.0, seed=3, channels=2)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    sf.write(str(d / "empty.wav"), np.zeros((0,), np.float32), SR)
    p = _prompt(processor, 20, seed=0)
    lines = [json.dumps(r) for r in [
        {"id": "ok", "audio": good, "prompt": p},
        {"id": "missing", "audio": "nope.wav", "prompt": p},
        {"id": "corrupt", "audio": "corrupt.wav", "prompt": p},
        {"id": "empty", "audio": "empty.wav", "prompt": p},
        {"id": "odd_rate", "audio": "odd_rate.wav", "prompt": p},
        {"id": "stereo", "audio": "stereo.wav", "prompt": p},
        {"id": "no_audio", "prompt": p},
        {"id": "ok", "audio": good, "prompt": p},
        {"id": "two_blocks", "audio": good, "prompt": p + " " + p},
        {"id": "extra_fields", "audio": good, "prompt": p, "speaker": 7},
    ]]
    lines.insert(3, '{"id": "broken", "audio": ')
    raw = ("\n".join(lines) + "\n").encode() + b'{"id": "latin1", "audio": "good.wav", "prompt": "caf\xe9"}\n'
    (d / "m.jsonl").write_bytes(raw)
    s = _eval(ckpt, d / "m.jsonl", d / "run", max_new_tokens=4)
    res = {r["id"]: r for r in _results(d / "run")}
    for rid in ("ok", "odd_rate", "stereo", "extra_fields"):
        assert "error" not in res[rid], res[rid]
    causes = {"missing": "not found", "corrupt": "corrupt", "empty": "empty", "no_audio": "audio",
              "two_blocks": "audio block", "line-4": "malformed JSON", "line-12": "UTF-8"}
    for rid, cause in causes.items():
        assert cause in res[rid]["error"], (rid, res[rid])
    assert "duplicate id" in res["ok@line9"]["error"]
    assert s["errors"] == len(causes) + 1
    assert s["ok"] == 4 and s["items"] == 12


def test_resume_skips_done_items_and_survives_a_torn_line(ckpt, qa_manifest, qa_run, tmp_path):
    import shutil

    from affjax.runtime.engine import TRACES
    first, done_run = qa_run
    out = tmp_path / "run"
    shutil.copytree(done_run, out)  # the finished run (the same job as test_qa_choice_scores_match_transformers)
    full = (out / "results.jsonl").read_text().splitlines()
    # a kill mid-write: two rows lost, the third torn in half
    (out / "results.jsonl").write_text("\n".join(full[:2]) + "\n" + full[2][: len(full[2]) // 2])
    again = _eval(ckpt, qa_manifest, out, task="qa")
    assert again["items_this_run"] == 3
    assert (out / "results.jsonl").read_text().splitlines() == full  # same rows, order, no duplicates
    assert again["metrics"] == first["metrics"]
    before = sum(TRACES.values())
    done = _eval(ckpt, qa_manifest, out, task="qa")
    assert done["items_this_run"] == 0 and sum(TRACES.values()) == before
    with pytest.raises(ValueError, match="other inputs or settings"):
        _eval(ckpt, qa_manifest, out, task="qa", pooling="input")
    md = (out / "summary.md").read_text()
    assert "accuracy" in md and "affjax" in json.loads((out / "summary.json").read_text())["versions"]


def test_new_lengths_in_a_bucket_do_not_recompile(ckpt, processor, tmp_path):
    from affjax.runtime.engine import TRACES
    from affjax.models.qwen2_audio.inputs import encode
    from affjax.runtime.shapes import bucket
    d = tmp_path
    prompt = _prompt(processor, 30, seed=0)

    def n_tokens(seconds):  # the prompt's tokens with a clip of this length (25 audio tokens per second)
        return len(encode(processor, prompt, [np.zeros(int(seconds * SR), np.float32)]).ids)

    # eight clip lengths whose sequences share one bucket of the grid: the runs differ in length only
    base = next(b for b in np.arange(10.0, 20.0, 0.04) if bucket(n_tokens(b)) == bucket(n_tokens(b + 0.3)))
    a, b = [base + 0.08 * k for k in range(4)], [base + 0.04 + 0.08 * k for k in range(4)]
    assert len({n_tokens(x) for x in a + b}) > 4  # the lengths really differ

    def run(tag, seconds):
        rows = [{"id": f"{tag}{i}", "audio": _wav(d / f"{tag}{i}.wav", s, seed=i).name, "prompt": prompt}
                for i, s in enumerate(seconds)]
        return _eval(ckpt, _manifest(d / f"{tag}.jsonl", rows), d / tag, pooling="none", max_new_tokens=4)

    run("a", a)
    before = dict(TRACES)
    s = run("b", b)
    assert s["compiles"] == {} and dict(TRACES) == before


def test_hf_recipe_end_to_end(ckpt, tmp_path):
    """`--data hf:PATH:openbookqa:test` on a tiny data set in VoiceBench's form (real LibriVox audio,
    one row without audio): the recipe's manifest, choices scored, the recipe's error cause kept."""
    datasets = need_module("datasets")
    from affjax.data.assets import librivox_items
    clips = need_asset(librivox_items)[:2]
    # cells as hub parquet files hold them: the encoded file's bytes (datasets needs torchcodec to
    # encode arrays itself)
    audio = [{"bytes": Path(c["audio"]).read_bytes(), "path": Path(c["audio"]).name} for c in clips]
    cols = {"audio": audio + [None], "reference": ["B", "A", "C"],
            "prompt": ["Which one?\nA. a cat.\nB. a dog.\nC. a bird."] * 3}
    ds = datasets.Dataset.from_dict(cols).cast_column("audio", datasets.Audio(sampling_rate=16000))
    src = tmp_path / "voicebench"
    datasets.DatasetDict({"test": ds}).save_to_disk(str(src))
    s = _eval(ckpt, None, tmp_path / "run", data=f"hf:{src}:openbookqa:test", task="qa")
    res = _results(tmp_path / "run")
    assert len(res) == 3 and s["ok"] == 2 and s["errors"] == 1
    assert "missing audio" in res[2]["error"]
    assert all(len(r["choice_logprobs"]) == 3 for r in res[:2])
    assert s["primary"][0] == "accuracy" and s["metrics"]["mc"] == 2
    assert json.loads((tmp_path / "run" / "data" / "recipe.json").read_text())["task"] == "qa"
    with pytest.raises(ValueError, match="qa data set"):
        _eval(ckpt, None, tmp_path / "run2", data=f"hf:{src}:openbookqa:test", task="asr")
