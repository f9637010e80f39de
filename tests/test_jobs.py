"""The one job runner (affjax.eval.runner) as a user meets it through the CLI: `score`, `generate` and
`eval` on a tiny random Qwen2-Audio checkpoint. Each test is a defect found by trying the CLI:
per-item errors, streaming and resuming rows (kill -9 included), content fingerprints, long
audio, option checks before any heavy work, reference field names, batch failures retried item
by item."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import need_module

torch = need_module("torch")
sf = need_module("soundfile")

SR = 16000


@pytest.fixture(scope="module")
def ckpt(tiny_qwen2_audio_ckpt):
    return tiny_qwen2_audio_ckpt


@pytest.fixture(scope="module")
def block(ckpt):
    from transformers import AutoProcessor

    from affjax.models.qwen2_audio.inputs import audio_block
    return audio_block(AutoProcessor.from_pretrained(str(ckpt)))


def _wav(path, seconds, seed=0):
    from affjax.testing import synth_speech_like
    sf.write(str(path), synth_speech_like(seconds, sr=SR, seed=seed), SR)
    return path.name


def _manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(args, capsys=None):
    from affjax.cli import main
    rc = main(args + ["--no-progress", "--no-compile-cache"])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _items(d, block, n, seconds=(2.0, 3.0, 2.5, 4.0, 1.5, 3.5), short=()):
    rows = []
    for i in range(n):
        secs = 0.02 if i in short else seconds[i % len(seconds)]
        rows.append({"id": f"u{i}", "audio": _wav(d / f"u{i}.wav", secs, seed=i),
                     "prompt": f"Listen: {block} What was said?", "continuation": " a sound of words",
                     "reference": "a sound of words"})
    return rows


# -- defect 1: a clip of 20 ms gives no audio token -> an error row for that item, the job goes on


@pytest.mark.parametrize("cmd", ["score", "generate", "eval"])
def test_short_clip_is_an_error_row_and_the_job_goes_on(ckpt, block, tmp_path, capsys, cmd):
    m = _manifest(tmp_path / "m.jsonl", _items(tmp_path, block, 4, short=(1,)))
    out = tmp_path / ("run" if cmd == "eval" else "out.jsonl")
    extra = ["--max-new-tokens", "3"] if cmd != "score" else []
    rc, _ = _cli([cmd, "--ckpt", str(ckpt), "--manifest", str(m), "--out", str(out), "--batch-size", "2"] + extra,
                 capsys)
    assert rc == 0
    rows = _rows(out / "results.jsonl" if cmd == "eval" else out)
    assert [r["id"] for r in rows] == ["u0", "u1", "u2", "u3"]
    assert "too short" in rows[1]["error"] and "audio clip 1" in rows[1]["error"]
    for r in (rows[0], rows[2], rows[3]):
        assert "error" not in r, r
        assert ("logprob" in r) if cmd == "score" else ("text" in r)


@pytest.mark.slow
def test_a_failing_batch_is_retried_item_by_item(ckpt, block, tmp_path, monkeypatch):
    from affjax.runtime.engine import Engine
    from affjax.eval.runner import JobConfig, run_eval

    real = Engine.score

    def flaky(self, batch):  # a batch-level failure (as a compile error or OOM would be) for 2+ rows
        if batch.rows > 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return real(self, batch)
    monkeypatch.setattr(Engine, "score", flaky)
    m = _manifest(tmp_path / "m.jsonl", _items(tmp_path, block, 3))
    logs = []
    s = run_eval(JobConfig(task="score", ckpt=str(ckpt), manifest=str(m), out=str(tmp_path / "o.jsonl"),
                           batch_size=3, progress=False), log=logs.append)
    assert s["ok"] == 3 and any("one by one" in line for line in logs)
    ref = {r["id"]: r["logprob"] for r in _rows(tmp_path / "o.jsonl")}
    # the same items in batches of one give the same numbers
    s1 = run_eval(JobConfig(task="score", ckpt=str(ckpt), manifest=str(m), out=str(tmp_path / "o1.jsonl"),
                            batch_size=1, progress=False), log=logs.append)
    assert s1["ok"] == 3
    for r in _rows(tmp_path / "o1.jsonl"):
        assert abs(r["logprob"] - ref[r["id"]]) < 1e-4


# -- defect 2: score / generate stream rows per batch and resume; kill -9 loses nothing


@pytest.mark.slow
def test_kill_9_then_rerun_gives_every_item_exactly_once(ckpt, block, tmp_path):
    m = _manifest(tmp_path / "m.jsonl", _items(tmp_path, block, 6))
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--ckpt", str(ckpt), "--manifest", str(m), "--out", str(out), "--batch-size", "1",
            "--max-new-tokens", "4", "--no-progress", "--no-compile-cache"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "affjax.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _rows(out)
    assert 2 <= len(partial) < 6  # rows were on disk before the end of the job
    rc, _ = _cli(args[:-2])
    assert rc == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"u{i}" for i in range(6)]
    clean = tmp_path / "clean.jsonl"
    rc, _ = _cli(args[:6] + [str(clean)] + args[7:-2])
    assert rc == 0
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in _rows(clean)]


@pytest.mark.slow
def test_score_output_is_not_silently_replaced_and_restart_starts_over(ckpt, block, tmp_path, capsys):
    m = _manifest(tmp_path / "m.jsonl", _items(tmp_path, block, 2))
    out = tmp_path / "s.jsonl"
    base = ["score", "--ckpt", str(ckpt), "--manifest", str(m), "--out", str(out)]
    assert _cli(base, capsys)[0] == 0
    first = out.read_text()
    rc, err = _cli(base + ["--pooling", "input"], capsys)
    assert rc == 1 and "other inputs or settings" in err and "pooling" in err
    assert out.read_text() == first
    rc, _ = _cli(base + ["--pooling", "input", "--restart"], capsys)
    assert rc == 0 and out.read_text() != first


# -- defect 3: resume checks the contents of the manifest and checkpoint, not their paths


def test_resume_refuses_an_edited_manifest(ckpt, block, tmp_path, capsys):
    rows = _items(tmp_path, block, 2)
    m = _manifest(tmp_path / "m.jsonl", rows)
    run = tmp_path / "run"
    base = ["eval", "--ckpt", str(ckpt), "--task", "asr", "--manifest", str(m), "--out", str(run),
            "--max-new-tokens", "3"]
    assert _cli(base, capsys)[0] == 0
    for r in rows:
        r["reference"] = "something else entirely"
    _manifest(m, rows)
    rc, err = _cli(base, capsys)
    assert rc == 1 and "data" in err and "--restart" in err
    assert _cli(base + ["--restart"], capsys)[0] == 0
    assert [r["reference"] for r in _rows(run / "results.jsonl")] == ["something else entirely"] * 2


def test_resume_refuses_a_rewritten_checkpoint(ckpt, block, tmp_path, capsys):
    import shutil
    m = _manifest(tmp_path / "m.jsonl", _items(tmp_path, block, 1))
    c2 = tmp_path / "ckpt2"
    shutil.copytree(ckpt, c2)
    base = ["score", "--ckpt", str(c2), "--manifest", str(m), "--out", str(tmp_path / "s.jsonl")]
    assert _cli(base, capsys)[0] == 0
    cfg = c2 / "affjax_config.json"
    meta = json.loads(cfg.read_text())
    meta["dtype"] = "bfloat16"  # a checkpoint converted again, in another dtype, at the same path
    cfg.write_text(json.dumps(meta))
    rc, err = _cli(base, capsys)
    assert rc == 1 and "ckpt" in err


# -- defect 4: long audio is windowed in score / generate as in eval


@pytest.mark.slow
def test_score_and_generate_window_long_audio(ckpt, block, tmp_path, capsys):
    rows = [{"id": "long", "audio": _wav(tmp_path / "long.wav", 40.0), "prompt": f"Hear {block} now.",
             "continuation": " yes"}]
    m = _manifest(tmp_path / "m.jsonl", rows)
    for cmd in ("score", "generate"):
        out = tmp_path / f"{cmd}.jsonl"
        rc, _ = _cli([cmd, "--ckpt", str(ckpt), "--manifest", str(m), "--out", str(out), "--batch-size", "1"]
                     + (["--max-new-tokens", "2"] if cmd == "generate" else []), capsys)
        assert rc == 0
        (r,) = _rows(out)
        assert r["windows"] == 2 and "truncated" not in r and "error" not in r, r
        assert r["audio_tokens"][0] == 750 + 250  # 30 s + 10 s of audio tokens, nothing cut


# -- defect 6: options checked before any heavy work, one clear line, non-zero exit


@pytest.mark.parametrize("extra, words", [
    (["--window", "0"], "--window"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--batch-size", "0"], "--batch-size"),
    (["--capacity", "0.5"], "--capacity"),
    (["--pool-mode", "fixed", "--pooling", "input"], "--capacity"),
    (["--pooling", "0:tau=0.8,window=0"], "--pooling"),
    (["--mesh", "data=x"], "--mesh"),
])
def test_bad_options_fail_before_the_checkpoint_loads(ckpt, block, tmp_path, capsys, monkeypatch, extra, words):
    import affjax.runtime.sharding

    def no_load(*a, **k):
        raise AssertionError("the checkpoint was loaded before the options were checked")
    monkeypatch.setattr(affjax.runtime.sharding, "load", no_load)
    m = _manifest(tmp_path / "m.jsonl", _items(tmp_path, block, 1))
    rc, err = _cli(["generate", "--ckpt", str(ckpt), "--manifest", str(m), "--out", str(tmp_path / "o.jsonl")]
                   + extra, capsys)
    assert rc == 1 and words in err and len(err.strip().splitlines()) == 1, err


def test_empty_manifest_and_all_failed_exit_non_zero(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rc, err = _cli(["score", "--ckpt", str(ckpt), "--manifest", str(empty), "--out", str(tmp_path / "a.jsonl")],
                   capsys)
    assert rc == 1 and "no items" in err
    bad = _manifest(tmp_path / "bad.jsonl", [{"id": "x", "audio": "missing.wav", "prompt": "p", "continuation": "c"}])
    rc, err = _cli(["score", "--ckpt", str(ckpt), "--manifest", str(bad), "--out", str(tmp_path / "b.jsonl")], capsys)
    assert rc == 1 and "every item failed" in err
    assert "not found" in _rows(tmp_path / "b.jsonl")[0]["error"]


# -- defect 7: the reference field under its common names


def test_asr_reference_under_common_names(ckpt, block, tmp_path):
    """Each name on its own row of one manifest (one job: a job per name would compile alike)."""
    from affjax.eval.runner import JobConfig, run_eval
    fields = ("reference", "text", "transcript")
    rows = _items(tmp_path, block, len(fields))
    for r, field in zip(rows, fields):
        r[field] = r.pop("reference")
    assert [next(k for k in fields if k in r) for r in rows] == list(fields)
    m = _manifest(tmp_path / "m.jsonl", rows)
    s = run_eval(JobConfig(task="asr", ckpt=str(ckpt), manifest=str(m), out=str(tmp_path / "run"),
                           max_new_tokens=3, progress=False), log=lambda *_: None)
    assert s["metrics"]["wer"] is not None
    assert all(r["reference"] == "a sound of words" for r in _rows(tmp_path / "run" / "results.jsonl"))


def test_asr_manifest_without_references_says_so(ckpt, block, tmp_path):
    from affjax.eval.runner import JobConfig, run_eval
    rows = _items(tmp_path, block, 1)
    rows[0].pop("reference")
    rows[0]["answer_text"] = "a sound"
    logs = []
    s = run_eval(JobConfig(task="asr", ckpt=str(ckpt), manifest=str(_manifest(tmp_path / "m.jsonl", rows)),
                           out=str(tmp_path / "run"), max_new_tokens=3, progress=False), log=logs.append)
    assert s["metrics"]["wer"] is None
    assert any("no item has a transcript" in line and "'reference'" not in line and "reference" in line
               for line in logs)


def test_run_batch_rule():
    from affjax.eval.runner import run_batch
    failed = []

    def fn(units):
        if len(units) > 1 or units[0] == 2:
            raise MemoryError("too big") if len(units) > 1 else ValueError("bad item")
        return [u * 10 for u in units]
    done = run_batch(fn, [1, 2, 3], lambda u, cause: failed.append((u, cause)), log=lambda *_: None)
    assert done == [(1, 10), (3, 30)] and failed == [(2, "ValueError: bad item")]
    np.testing.assert_equal(run_batch(lambda us: [0 for _ in us], [5], None), [(5, 0)])


def test_windows_follow_the_processors_feature_window():
    """A processor whose feature extractor hears 4 s: 10 s of audio becomes 4 + 4 + 2 s windows
    (nothing is left for the extractor to cut), each its own audio block in the prompt."""
    from types import SimpleNamespace

    from affjax.models.qwen2_audio.inputs import window_prompt
    proc = SimpleNamespace(audio_bos_token="<b>", audio_token="<a>", audio_eos_token="<e>",
                           feature_extractor=SimpleNamespace(chunk_length=4))
    wave = np.arange(10 * 16000, dtype=np.float32)
    prompt, clips = window_prompt(proc, "x <b><a><e> y", [wave], 16000)
    assert [len(c) for c in clips] == [4 * 16000, 4 * 16000, 2 * 16000]
    assert prompt == "x " + "<b><a><e>" * 3 + " y"
    np.testing.assert_array_equal(np.concatenate(clips), wave)
    _, clips = window_prompt(proc, "<b><a><e>", [wave], 16000, seconds=30)  # an explicit window wins
    assert len(clips) == 1
