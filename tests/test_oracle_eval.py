"""Oracle interventions wired into the speech-LM jobs: the engine feeds the language model the
intervened audio tokens (checked value by value against the unmodified embeddings), and `affjax eval
--oracle` aligns real LibriVox speech with real Whisper base, then runs each intervention on a tiny
random Qwen2-Audio checkpoint, its audio token counts matching the alignment."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import need_module

from affjax.pooling import oracle as orc

need_module("torch")


def _groups(n_audio: int, words, o: orc.Oracle) -> list[list[int]]:
    """merge-words / drop-uniform on one span of n_audio tokens, plainly: the token indices of each group."""
    if o.kind == "drop-uniform":
        k = max(n_audio - int(np.floor(o.p * n_audio + 0.5)), 1)
        return [[(2 * j + 1) * n_audio // (2 * k)] for j in range(k)]
    centre = lambda i: (i + 0.5) * orc.TOKEN_SECONDS + orc.TIE_SECONDS
    word = [next((w for w, (s, e) in enumerate(words) if s <= centre(i) < e), -1) for i in range(n_audio)]
    groups = []
    for i, w in enumerate(word):
        if groups and w >= 0 and word[i - 1] == w:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@pytest.mark.parametrize("o", [orc.Oracle("merge-words"), orc.Oracle("drop-uniform", p=0.5)],
                         ids=lambda o: o.to_text())
def test_engine_feeds_the_intervened_tokens(tiny_qwen2_audio_ckpt, o):
    """Rows of different lengths in one batch: after the intervention, each row's audio slots hold the
    means of the unmodified audio embeddings over the groups of the rule, and the text is untouched."""
    import dataclasses

    from affjax.eval import frontends
    from affjax.runtime.engine import Engine
    from affjax.testing import synth_speech_like

    model, cfg, fe = frontends.load(tiny_qwen2_audio_ckpt)
    prompt = fe.default_prompt("asr", {})
    words = [np.array([[0.1, 0.35], [0.35, 0.52], [0.6, 1.3]], np.float32),
             np.array([[0.0, 0.5], [0.5, 0.9], [1.0, 1.05], [1.2, 2.1], [2.1, 2.4]], np.float32)]
    encs = []
    for k, seconds in enumerate((1.2, 1.7)):
        enc, _ = fe.encode(prompt, [synth_speech_like(seconds, seed=k)])
        encs.append(dataclasses.replace(enc, words=words[k], seed=k))
    batch = fe.collate(encs, 2)
    plain = Engine(model).front_rows(batch)
    rows = Engine(model, oracle=o).front_rows(batch)
    for b, (p, r) in enumerate(zip(plain, rows)):
        audio = np.flatnonzero(p.span > 0)
        groups = _groups(len(audio), words[b], o)
        assert r.audio == [len(audio), len(groups)] and len(groups) < len(audio)
        a0 = audio[0]
        want = np.concatenate([p.x[:a0], np.stack([p.x[a0 + np.array(g)].mean(0) for g in groups]),
                               p.x[audio[-1] + 1:]])
        np.testing.assert_allclose(r.x, want, rtol=1e-6, atol=1e-6)
        assert r.lm == [p.lm[0], p.lm[0] - len(audio) + len(groups)]
        assert len(r.x) == r.lm[1]


@pytest.mark.slow
def test_eval_oracle_cli(tiny_qwen2_audio_ckpt, tmp_path, capsys):
    """Interventions through `affjax eval --oracle` on two clips of different lengths in one batch,
    from a stored alignment (its texts match the references, so it is reused: computing it is
    tests/test_alignment.py's part)."""
    import soundfile as sf

    from affjax.cli import main
    from affjax.testing import synth_speech_like

    manifest, alignment = [], []
    for k, seconds in enumerate((1.3, 1.8)):  # short: every run's prompts fit one sequence bucket (one compile)
        sf.write(tmp_path / f"{k}.wav", synth_speech_like(seconds, seed=k), 16000)
        words = [[f"w{j}", round(0.1 + 0.35 * j, 2), round(0.4 + 0.35 * j, 2)] for j in range(int(seconds / 0.35))]
        text = " ".join(w for w, _, _ in words)
        manifest.append({"id": f"c{k}", "audio": f"{k}.wav", "text": text})
        alignment.append({"id": f"c{k}", "text": text, "source": "reference", "words": words})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alignment))
    out = tmp_path / "run"
    args = ["eval", "--ckpt", str(tiny_qwen2_audio_ckpt), "--manifest", str(tmp_path / "m.jsonl"), "--out", str(out),
            "--oracle", "none;merge-words;drop-words:p=0.5", "--alignment", str(tmp_path / "a.jsonl"),
            "--batch-size", "2", "--max-new-tokens", "3", "--no-progress"]
    assert main(args) == 0
    assert "aligning" not in capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    settings = ["none", "merge-words", "drop-words:p=0.5"]
    assert [r["setting"] for r in summary["runs"]] == settings
    by = {r["setting"]: r for r in summary["runs"]}
    rows = {s: {r["id"]: r for r in map(json.loads, (out / d / "results.jsonl").read_text().splitlines())}
            for s, d in zip(settings, ["none", "merge-words", "drop-words_p0.5"])}
    for a in alignment:
        i = a["id"]
        n = rows["none"][i]["audio_tokens"][0]
        assert rows["none"][i]["audio_tokens"] == [n] and n > 25
        words = [(s, e) for _, s, e in a["words"]]
        merged = len(_groups(n, words, orc.Oracle("merge-words")))
        assert rows["merge-words"][i]["audio_tokens"] == [n, merged] and merged < 0.5 * n
        kept = rows["drop-words:p=0.5"][i]["audio_tokens"][1]
        assert kept < n and rows["drop-words:p=0.5"][i]["words"] == len(words)
        for s in settings:  # the language model saw the shorter sequence
            lm = rows[s][i]["lm_tokens"][0]
            assert lm[-1] == lm[0] - n + rows[s][i]["audio_tokens"][-1]
    assert by["none"]["final_retention"] == 1.0 and "oracle" not in by["none"]
    ret = sum(r["audio_tokens"][1] for r in rows["merge-words"].values()) / \
        sum(r["audio_tokens"][0] for r in rows["merge-words"].values())
    assert by["merge-words"]["final_retention"] == pytest.approx(ret, abs=1e-4)
    assert by["merge-words"]["lm_prefill_flops_ratio_analytic"] < 1.0
    assert by["merge-words"]["oracle"] == "merge-words" and by["merge-words"]["ok"] == 2
    assert "| merge-words | wer |" in (out / "summary.md").read_text()
    from affjax.eval.report import load_runs
    table, errors = load_runs([out])
    assert not errors and [r["run"] for r in table] == [f"run/{s}" for s in settings]

    # a rerun resumes every run; a run folder holding another intervention is refused
    assert main(args) == 0
    assert json.loads((out / "merge-words" / "results.jsonl.run.json").read_text())["oracle"] == "merge-words"
    (out / "drop-words_p0.5").rename(out / "held")
    (out / "merge-words").rename(out / "drop-words_p0.5")
    assert main(args) == 1
    assert "other inputs or settings (oracle: 'merge-words' -> 'drop-words:p=0.5')" in capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [
    (["--oracle", "merge-words", "--pooling", "input"], "leave out --pooling"),
    (["--oracle", "drop-words:p=2"], "oracle p must lie in"),
    (["--oracle", "none;merge-words;none"], "given twice"),
])
def test_eval_oracle_bad_options(tiny_qwen2_audio_ckpt, tmp_path, capsys, extra, msg):
    from affjax.cli import main

    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "audio": "a.wav", "text": "hi"}\n')
    assert main(["eval", "--ckpt", str(tiny_qwen2_audio_ckpt), "--manifest", str(m), "--out", str(tmp_path / "o"),
                 *extra]) == 1
    assert msg in capsys.readouterr().err


def test_parse_specs():
    from affjax.eval.oracle import parse_specs, setting

    specs = parse_specs(" none; merge-words:gaps=merge ;drop-random:p=0.25,seed=3;")
    assert specs[0] is None and [setting(o) for o in specs] == ["none", "merge-words:gaps=merge",
                                                                  "drop-random:p=0.25,seed=3"]
    with pytest.raises(ValueError, match="no intervention"):
        parse_specs(" ; ")
