"""`affjax report`: table across run directories, plot, and bad summaries."""

import json

import pytest

from conftest import need_module
from affjax.cli import main
from affjax.eval.report import format_table, load_runs

need_module("matplotlib")


def write_run(root, name, summary):
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    return d


def runner_summary(**kw):
    s = {"task": "asr", "model": "qwen2-audio-7b", "data": "hf:openslr/librispeech_asr:clean:test",
         "pooling": "none", "metrics": {"wer": 0.0213, "num_scored": 2620}, "primary": ["wer", 0.0213],
         "final_retention": 1.0, "retention_per_stage": [], "lm_prefill_flops_ratio_analytic": 1.0,
         "items": 2620, "ok": 2619, "errors": 1, "items_per_second": 12.5, "padding_fraction": 0.125,
         "versions": {"jax": "0.10.2"}, "command": "affjax eval ..."}
    s.update(kw)
    return s


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    base = write_run(root, "ls-unpooled", runner_summary())
    pooled = write_run(root, "ls-pooled", runner_summary(
        pooling="0:tau=0.8,window=1", metrics={"wer": 0.0247}, primary=["wer", 0.0247], final_retention=0.52,
        retention_per_stage=[0.52], lm_prefill_flops_ratio_analytic=0.61, items_per_second=19.0))
    st = write_run(root, "covost", {"task": "st", "model": "qwen2-audio-7b", "data": "hf:covost2:en_zh-CN:test",
                                    "pooling": "none", "metrics": {"bleu": 27.3}, "final_retention": 1.0})
    whisper = write_run(root, "whisper", {"runs": [
        {"task": "asr", "model": "whisper-base", "data": "librivox", "pooling": "none", "wer": 0.014085,
         "final_retention": 1.0, "flops_rel": 1.0, "items": 5, "ok": 5, "errors": 0, "seconds": 10.0,
         "setting": "unpooled"},
        {"task": "asr", "model": "whisper-base", "data": "librivox", "pooling": "6:tau=0.95,window=1",
         "wer": 0.028169, "final_retention": 0.7246, "flops_rel": 0.9955, "items": 5, "ok": 5, "errors": 0,
         "seconds": 8.0, "setting": "pooled"}]})
    corrupt = write_run(root, "broken", '{"task": "asr", "metrics": {')
    missing = root / "never-ran"
    return [base, pooled, st, whisper, corrupt, missing]


def cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_table_rows_and_missing_keys(runs):
    rows, errors = load_runs(runs)
    assert [r["run"] for r in rows] == ["ls-unpooled", "ls-pooled", "covost", "whisper/unpooled", "whisper/pooled"]
    assert len(errors) == 2
    assert "broken" in errors[0] and "corrupt summary.json" in errors[0]
    assert "never-ran" in errors[1]

    t = cells(format_table(rows))
    # run | task | model | data | pooling | metric | value | retention | FLOPs | items | ok | errors | items/s | padding
    assert t[0][5:] == ["wer", "2.13%", "1.000", "1.000", "2620", "2619", "1", "12.50", "0.125"]
    assert t[1][4:9] == ["0:tau=0.8,window=1", "wer", "2.47%", "0.520", "0.610"]
    assert t[2][5:7] == ["bleu", "27.30"]
    assert t[2][8:] == ["-"] * 6  # keys the st summary lacks
    # the Whisper eval's form: wer at the top level, flops_rel as the FLOPs ratio, items/s from seconds
    assert t[3][0] == "whisper/unpooled" and t[4][5:9] == ["wer", "2.82%", "0.725", "0.996"]
    assert t[4][12] == "0.62"


def test_cli_report_writes_markdown_and_png(runs, tmp_path, capsys):
    out, plot = tmp_path / "rep" / "report.md", tmp_path / "rep" / "report.png"
    rc = main(["report", *map(str, runs), "--out", str(out), "--plot", str(plot)])
    cap = capsys.readouterr()
    assert rc == 1  # two run dirs could not be read
    assert "broken" in cap.err and "never-ran" in cap.err
    assert "| ls-pooled |" in cap.out and "| whisper/pooled |" in cap.out
    md = out.read_text()
    assert "| covost | st |" in md and "Not reported" in md and "broken" in md
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_all_good_runs_exit_zero(runs, capsys):
    assert main(["report", *map(str, runs[:2])]) == 0
    assert "ls-unpooled" in capsys.readouterr().out


def test_summary_that_is_not_an_object(tmp_path, capsys):
    d = write_run(tmp_path, "odd", "[1, 2]")
    assert main(["report", str(d)]) == 1
    assert "odd" in capsys.readouterr().err


def test_breakdown_by_manifest_field(tmp_path, capsys):
    """WER per manifest field value: errors / reference words within each group, hand-counted here."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in [
        {"id": "a", "engine": "espeak"}, {"id": "b", "engine": "espeak"}, {"id": "c", "engine": "piper"},
        {"id": "d", "engine": "piper"}, {"id": "f"}]))
    rows = [{"id": "a", "reference": "the cat sat", "text": "The cat sat."},           # 0 of 3
            {"id": "b", "reference": "red green blue black", "text": "red green glue black"},  # 1 of 4
            {"id": "c", "reference": "hello world", "text": "hello"},                  # 1 of 2
            {"id": "d", "error": "AudioError: unreadable"},                            # counted, not scored
            {"id": "e", "reference": "go now", "text": "go"},                          # 1 of 2, no manifest row
            {"id": "f", "reference": "stop", "text": "stop"}]                          # 0 of 1, no field
    run = write_run(tmp_path / "runs", "lslm", runner_summary(items=6, ok=5, errors=1))
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wh = write_run(tmp_path / "runs", "wh", {"runs": [{"task": "asr", "wer": 0.5, "setting": "unpooled",
                                                        "normalizer": "basic"}]})
    (wh / "unpooled").mkdir()
    (wh / "unpooled" / "results.jsonl").write_text(json.dumps({"id": "c", "reference": "a b", "text": "a c"}) + "\n")
    bare = write_run(tmp_path / "runs", "bare", runner_summary())

    from affjax.eval.report import breakdown
    got, errors = breakdown([run, wh, bare], manifest, "engine")
    assert len(errors) == 1 and "bare" in errors[0] and "results.jsonl" in errors[0]
    table = {(r["run"], r["value"]): (r["items"], r["failed"], r["words"], r["wer"]) for r in got}
    assert table[("lslm", "espeak")] == (2, 0, 7, pytest.approx(1 / 7))
    assert table[("lslm", "piper")] == (2, 1, 2, pytest.approx(1 / 2))
    assert table[("lslm", "(not in the manifest)")] == (1, 0, 2, pytest.approx(1 / 2))
    assert table[("lslm", "-")] == (1, 0, 1, 0.0)
    assert table[("lslm", "all")] == (6, 1, 12, pytest.approx(3 / 12))
    assert table[("wh/unpooled", "piper")] == (1, 0, 2, pytest.approx(1 / 2))

    rc = main(["report", str(run), "--by", "engine", "--manifest", str(manifest)])
    out = capsys.readouterr().out
    assert rc == 0 and "| lslm | espeak | 2 | 0 | 7 | 14.29% |" in out
    assert main(["report", str(run), "--by", "engine"]) == 1
    assert "--by needs --manifest" in capsys.readouterr().err
    manifest.write_text('{"id": "a"}\nnot json\n')
    assert main(["report", str(run), "--by", "engine", "--manifest", str(manifest)]) == 1
    assert "line 2" in capsys.readouterr().err
