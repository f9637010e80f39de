"""The LSLM pooling sweep (`affjax bench-lslm-pooling`) on a tiny random Qwen2-Audio checkpoint, and
the engine's fixed-rate controls it runs (`affjax.runtime.engine.Control`).

The sweep runs once per module (the dual stage: an input stage and a deep one, a threshold that
merges nothing and one that merges about half the tokens, the controls at the latter), then again
to resume. Checked against
things computed apart from the sweep: the controls' stage output against the plain numpy reference
of the Whisper sweep's tests, the input stage's kept tokens against the sequential pooling
reference, and the tokens the language model saw against a fresh engine's own prefill.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import need_module
from pooling_reference import ref_stage
from test_whisper_sweep import ref_uniform

sf = need_module("soundfile")

NOTHING = 1.5   # above any cosine: no stage merges
HALF = 0.88     # about the median neighbour cosine of the tiny model's audio embeddings
MAX_NEW = 4
B = 3           # the sweep's batch: its 3 items


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from affjax.testing import synth_speech_like
    d = tmp_path_factory.mktemp("lslm_sweep_data")
    rows = []
    for i, sec in enumerate([1.0, 1.8, 1.4]):  # 39 to 59 tokens: one sequence bucket, pooled or not
        sf.write(str(d / f"a{i}.wav"), synth_speech_like(sec, seed=i), 16000)
        rows.append({"id": f"u{i}", "audio": f"a{i}.wav", "target": "the cat sat on the mat"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl"


@pytest.fixture(scope="module")
def cfg(tiny_qwen2_audio_ckpt, manifest, tmp_path_factory):
    from affjax.bench import lslm_pooling as bl
    out = tmp_path_factory.mktemp("lslm_sweep")
    return bl.SweepConfig(ckpt=str(tiny_qwen2_audio_ckpt), manifest=str(manifest), librivox=0,
                          stages=("dual",), taus=(NOTHING, HALF), control_taus=(HALF,), dual_offset=0.0,
                          batch_size=B, max_new_tokens=MAX_NEW, out=str(out / "res"), work=str(out / "work"),
                          name="sweep", progress=False)


@pytest.fixture(scope="module")
def model(tiny_qwen2_audio_ckpt):
    """(model, config, frontend) of the checkpoint, loaded once for every sweep run here."""
    from affjax.eval import frontends
    return frontends.load(tiny_qwen2_audio_ckpt)


@pytest.fixture(scope="module")
def doc(cfg, model):
    from affjax.bench import lslm_pooling as bl
    return bl.run_sweep(cfg, log=lambda *a: None, loaded=model)


@pytest.fixture(scope="module")
def loaded(model, cfg):
    """(model, frontend, encoded items) as the sweep has them (one batch of 3 rows: its compiles serve)."""
    from affjax.bench import lslm_pooling as bl
    return model[0], model[2], bl.encode_items(bl.load_items(cfg), model[2])


def _transcripts(cfg) -> dict:
    """key -> transcripts, from the work dir's transcripts.jsonl."""
    rows = [json.loads(l) for l in open(f"{cfg.work}/transcripts.jsonl").read().splitlines()]
    return {r["key"]: r["texts"] for r in rows}


def test_every_cell_and_the_outputs(cfg, doc):
    from affjax.bench import lslm_pooling as bl
    keys = [s["key"] for s in bl.cell_specs(cfg, cfg.stages)]
    assert keys == ["dual/tau1.5/sim", "dual/tau0.88/sim", "dual/tau0.88/avg", "dual/tau0.88/drop"]
    saved = json.loads(open(f"{cfg.out}/sweep.json").read())
    assert list(saved["cells"]) == keys and saved["setup"]["items"] == ["u0", "u1", "u2"]
    assert len(saved["unpooled"]["texts"]) == 3 and saved["unpooled"]["retention"] == 1.0
    for key in keys:
        c = saved["cells"][key]
        for field in ("stage", "tau", "method", "proportional", "retention", "retention_per_stage", "wer",
                      "wer_manifest", "lm_flops_rel", "changed", "changed_raw", "unfinished", "seconds",
                      "audio_tokens", "lm_tokens", "pooling"):
            assert field in c, (key, field)
        assert all(len(a) == 3 for a in c["audio_tokens"] + c["lm_tokens"])  # unpooled, after each stage
        merged = c["tau"] == HALF
        assert (0 < c["retention"] < 0.9) if merged else c["retention"] == 1.0
        assert (c["lm_flops_rel"] < 1) if merged else c["lm_flops_rel"] == 1.0
    assert saved["cells"]["dual/tau0.88/sim"]["pooling"] == "0:tau=0.88,window=1;1:tau=0.88,window=3"
    assert set(_transcripts(cfg)) == set(keys)
    table = open(f"{cfg.out}/sweep_table.md").read()
    assert "### Stage: input + layer 1 at tau - 0" in table and "| 0.88 |" in table and "Largest cut" in table
    assert "### Largest cut per stage within +1.0 WER (absolute) of unpooled, on the manifest's items" in table
    # per-item word errors: their sum over the reference words is the cell's corpus WER
    words = saved["setup"]["ref_words"]
    for c in [saved["unpooled"], *saved["cells"].values()]:
        assert len(c["errors"]) == 3 and sum(c["errors"]) / sum(words) == pytest.approx(c["wer"], abs=1e-5)
    assert "### Affinity Pooling against the controls at equal retention (paired over the manifest's items)" in table
    for method, name in (("avg", "uniform average"), ("drop", "uniform drop")):
        sim, ctl = saved["cells"]["dual/tau0.88/sim"], saved["cells"][f"dual/tau0.88/{method}"]
        paired = table.split("### Affinity Pooling against the controls")[1]
        row = next(line for line in paired.splitlines() if f"| 0.88 | {100 * ctl['retention']:.1f} % | {name} |" in line)
        assert f"| {100 * sim['wer']:.2f} % | {100 * ctl['wer']:.2f} % | {100 * (sim['wer'] - ctl['wer']):+.2f} (" in row
    assert open(f"{cfg.out}/sweep.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_controls_keep_the_similarity_cells_counts(doc):
    """Item by item and stage by stage, the controls keep what Affinity Pooling kept."""
    sim = doc["cells"]["dual/tau0.88/sim"]
    assert len({tuple(a) for a in sim["audio_tokens"]}) > 1  # the items differ: the check means something
    assert all(a[0] > a[1] > a[2] for a in sim["audio_tokens"])  # both stages merge
    for method in ("avg", "drop"):
        c = doc["cells"][f"dual/tau0.88/{method}"]
        assert c["audio_tokens"] == sim["audio_tokens"] and c["lm_tokens"] == sim["lm_tokens"]
        assert c["retention"] == sim["retention"]


def test_nothing_merged_is_unpooled(cfg, doc):
    c = doc["cells"]["dual/tau1.5/sim"]
    assert _transcripts(cfg)["dual/tau1.5/sim"] == doc["unpooled"]["texts"]
    assert c["changed"] == 0 and c["changed_raw"] == 0 and c["wer"] == doc["unpooled"]["wer"]
    assert doc["cells"]["dual/tau0.88/sim"]["changed_raw"] > 0  # pooling does change this model's outputs


def test_input_stage_counts_match_the_sequential_reference(doc, loaded):
    """The tokens the input stage kept = groups of the plain sequential pooling of each item's audio
    embeddings."""
    from affjax.runtime.engine import Engine
    model, fe, encs = loaded
    rows = Engine(model, eos_ids=fe.eos_ids, pad_id=fe.pad_id).front_rows(fe.collate(encs, B))
    for i, r in enumerate(rows):
        ref = ref_stage(r.x, r.span, r.pos, r.size, tau=HALF, window=1)
        assert doc["cells"]["dual/tau0.88/sim"]["audio_tokens"][i][:2] == [ref["audio_in"], ref["audio_out"]]


def test_retention_is_what_the_language_model_saw(cfg, doc, loaded):
    """A fresh engine's prefill of the same items: the valid tokens in the cache of each group of
    layers are the cell's LM token counts, and the audio tokens among the last group's its retention."""
    from affjax.bench import lslm_pooling as bl
    from affjax.pooling.spec import PoolingConfig
    from affjax.runtime.engine import Engine
    model, fe, encs = loaded
    batch = fe.collate(encs, B)
    text = batch.valid.sum(1) - (batch.span > 0).sum(1)
    cell = doc["cells"]["dual/tau0.88/sim"]
    eng = Engine(model, pooling=PoolingConfig(bl.stage_settings("dual", HALF, cfg, 2)), eos_ids=fe.eos_ids,
                 pad_id=fe.pad_id)
    assert eng.groups == [(0, 0), (0, 1), (1, 2)]  # no layer before the input stage: its group is empty
    out = eng.prefill(batch, extra=MAX_NEW)
    seen = np.stack([np.asarray(n) for n in out.group_len[1:]], 1)[:3]  # [items, layer groups]
    assert seen.tolist() == [n[1:] for n in cell["lm_tokens"]]
    audio_seen = seen[:, -1] - text[:3]
    assert cell["retention"] == round(audio_seen.sum() / (batch.span[:3] > 0).sum(), 4)


def test_resume_runs_only_missing_cells(cfg, doc, model, monkeypatch):
    from affjax.bench import lslm_pooling as bl
    runs = []
    real = bl.run_cell

    def counted(*args, **kw):
        runs.append(args)
        return real(*args, **kw)
    monkeypatch.setattr(bl, "run_cell", counted)
    again = bl.run_sweep(cfg, log=lambda *a: None, loaded=None)  # every cell there: no model, no decode
    assert again["last_run"]["cells_run"] == 0 and runs == []
    assert Path(cfg.out, "sweep_table.md").is_file()
    assert {k: c["seconds"] for k, c in again["cells"].items()} == {k: c["seconds"] for k, c in doc["cells"].items()}

    runs.clear()  # another threshold that merges nothing: one new cell, its compiled programs dropped after it
    import jax
    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(1))
    more = bl.run_sweep(dataclasses.replace(cfg, taus=(NOTHING, 1.2, HALF)), log=lambda *a: None, loaded=model)
    assert len(cleared) == 1
    assert [k for k in more["cells"] if k not in doc["cells"]] == ["dual/tau1.2/sim"]
    assert more["last_run"]["cells_run"] == 1 and len(runs) == 1  # the new cell; unpooled from the JSON
    assert more["unpooled"]["texts"] == doc["unpooled"]["texts"]
    assert more["cells"]["dual/tau1.2/sim"]["changed"] == 0  # judged against the stored unpooled run
    with pytest.raises(ValueError, match="another setup"):
        bl.run_sweep(dataclasses.replace(cfg, max_new_tokens=MAX_NEW + 1), log=lambda *a: None)


@pytest.mark.parametrize("kind", ["avg", "drop"])
def test_engine_control_stage_matches_numpy(loaded, kind):
    """`Engine.pool_bucketed` with a control: each row keeps its own count; the packed output and
    where every original token went, against the plain reference; the buffer cut to its bucket."""
    from affjax.pooling.spec import Stage
    from affjax.runtime import shapes
    from affjax.runtime.engine import Engine
    model, fe, encs = loaded
    eng = Engine(model, eos_ids=fe.eos_ids, pad_id=fe.pad_id)
    rows = eng.front_rows(fe.collate(encs, B))
    packed = eng.pack_rows(rows, None, B)
    keep = np.array([3, 30, 1000], np.int32)  # a few, most, more than the row has (all)
    seq, st = eng.pool_bucketed(packed.seq, Stage(0, 0.5, 1), kind, keep)
    seq, st = eng.host(seq), eng.host(st)
    assert seq.x.shape[1] == shapes.bucket(int(st["n_valid"].max()))
    for b, r in enumerate(rows):
        n = len(r.x)
        ref = ref_uniform(r.x, r.span, np.ones(n, bool), r.pos, r.size, int(keep[b]), kind)
        m = len(ref["h"])
        assert st["audio_out"][b] == ref["audio_out"] == min(keep[b], ref["audio_in"])
        assert st["n_valid"][b] == m and seq.valid[b].sum() == m
        np.testing.assert_allclose(seq.x[b, :m], np.stack(ref["h"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(seq.pos[b, :m], ref["pos"])
        np.testing.assert_array_equal(seq.size[b, :m], ref["size"])
        np.testing.assert_array_equal(seq.span[b, :m], ref["span"])
        text = np.flatnonzero(r.span[:r.n_prompt] == 0)  # every text token is still there, itself
        np.testing.assert_array_equal(seq.x[b, seq.slot_of[b, text]], r.x[text])


def test_cells_with_proportional_too():
    """With --proportional-too each similarity cell and average control also runs proportional, the
    control taking the proportional similarity cell's counts; drop has no proportional twin."""
    from affjax.bench import lslm_pooling as bl
    cfg = bl.SweepConfig(ckpt="-", taus=(0.9, 0.8), control_taus=(0.8,), proportional_too=True)
    specs = {s["key"]: s["source"] for s in bl.cell_specs(cfg, ("input", "7"))}
    assert list(specs) == [f"{st}/tau{t}/{m}" for st in ("input", "7") for t, ms in
                           (("0.9", ("sim", "sim+prop")), ("0.8", ("sim", "sim+prop", "avg", "avg+prop", "drop")))
                           for m in ms]
    assert specs["7/tau0.8/avg+prop"] == "7/tau0.8/sim+prop" and specs["7/tau0.8/drop"] == "7/tau0.8/sim"


def test_stage_cuts_within_the_goal_margin():
    """Per stage and method, the lowest retention whose held-out WER is within +1.0 of unpooled (the
    margin itself counts); the other source's WER is not what is judged; methods not run get no row."""
    from affjax.bench import lslm_pooling as bl

    def cell(stage, tau, method, retention, wer_manifest, wer_librivox=0.0):
        return dict(stage=stage, tau=tau, method=method, proportional=False, retention=retention,
                    wer_manifest=wer_manifest, wer_librivox=wer_librivox, wer=wer_manifest, lm_flops_rel=retention)

    cells = [cell("input", 0.95, "sim", 0.9, 0.205), cell("input", 0.9, "sim", 0.7, 0.21),
             cell("input", 0.8, "sim", 0.5, 0.25), cell("input", 0.9, "avg", 0.7, 0.2101),
             cell("3", 0.9, "sim", 0.6, 0.19, wer_librivox=0.9), cell("3", 0.8, "sim", 0.4, 0.3)]
    doc = {"unpooled": {"wer": 0.2, "wer_manifest": 0.2, "wer_librivox": 0.0},
           "setup": {"stages": {"input": "input embeddings", "3": "after decoder layer 3", "dual": "dual"}},
           "cells": {f"{c['stage']}/{c['tau']}/{c['method']}": c for c in cells}}
    lines = bl.stage_cuts_table(doc)
    assert "on the manifest's items (unpooled 20.00 %)" in lines[0]
    rows = [line for line in lines if line.startswith("| input") or line.startswith("| after")]
    assert rows == ["| input embeddings | Affinity Pooling | 70.0 % | 0.9 | 21.00 % | 70.0 % |",
                    "| input embeddings | uniform average | none | - | - | - |",
                    "| after decoder layer 3 | Affinity Pooling | 60.0 % | 0.9 | 19.00 % | 60.0 % |"]


def test_paired_delta():
    """The paired comparison: the corpus WER difference over the chosen items, its bootstrap interval
    around it, the items each side wins; items without a reference or a result do not count."""
    from affjax.bench.sweep import paired_delta

    rng = np.random.default_rng(0)
    words = rng.integers(5, 20, 60).tolist()
    b = [int(rng.integers(0, w // 2)) for w in words]
    a = [max(0, e - 1) if i % 4 else e + 1 for i, e in enumerate(b)]  # a wins most items, loses a few
    a[3], words[5] = None, 0
    d = paired_delta(a, b, words, list(range(50)))
    keep = [i for i in range(50) if a[i] is not None and words[i]]
    assert d["items"] == len(keep) == 48
    want = (sum(a[i] for i in keep) - sum(b[i] for i in keep)) / sum(words[i] for i in keep)
    assert d["delta"] == pytest.approx(want) and d["a"] - d["b"] == pytest.approx(want)
    assert d["lo"] < d["delta"] < d["hi"] < 0  # clearly better: the interval excludes 0
    assert d["better"] == sum(a[i] < b[i] for i in keep) and d["worse"] == sum(a[i] > b[i] for i in keep)
    same = paired_delta(b, b, words, list(range(60)))
    assert same["delta"] == same["lo"] == same["hi"] == 0 and same["better"] == same["worse"] == 0
    assert paired_delta(a, b, words, [3, 5])["delta"] is None


def test_stage_names():
    from affjax.bench import lslm_pooling as bl
    from affjax.pooling.spec import Stage
    cfg = bl.SweepConfig(ckpt="-")
    assert bl.default_stages(30) == ("input", "7", "15", "22", "dual")
    assert bl.default_stages(2) == ("input", "1", "dual")
    assert bl.stage_settings("input", 0.9, cfg, 30) == (Stage(0, 0.9, 1),)
    assert bl.stage_settings("15", 0.9, cfg, 30) == (Stage(15, 0.9, 3),)
    assert bl.stage_settings("dual", 0.9, cfg, 30) == (Stage(0, 0.9, 1), Stage(27, 0.8, 3))  # dap-conservative
    assert bl.stage_settings("dual:20", 0.8, cfg, 30) == (Stage(0, 0.8, 1), Stage(20, 0.7, 3))
    for bad in ("0", "30", "dual:0", "deep", "dual:x"):
        with pytest.raises(ValueError, match="expected input"):
            bl.stage_settings(bad, 0.9, cfg, 30)


def test_cli_refuses_a_bad_stage_before_loading(tiny_qwen2_audio_ckpt, manifest, tmp_path, capsys):
    from affjax.cli import main
    rc = main(["bench-lslm-pooling", "--ckpt", str(tiny_qwen2_audio_ckpt), "--manifest", str(manifest),
               "--librivox", "0", "--stages", "input", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1 and "stage '2': expected input, a decoder layer 1 .. 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())



def test_compare_cuts_at_one_ceiling(tmp_path, capsys):
    """compare-cuts: every model is judged at the first model's unpooled WER + margin (a fine-tuned
    model with a worse unpooled WER gets no credit for it); sweeps of one model merge, other
    checkpoints do not; deeper = removed-token and kept-token ratios against the first model."""
    from affjax.bench import lslm_pooling as bl
    from affjax.cli import main

    def doc(ckpt, unpooled, cells):
        return {"unpooled": {"wer": unpooled, "wer_manifest": unpooled},
                "setup": {"ckpt": ckpt, "items": ["a", "b"], "stages": {"input": "input embeddings"}},
                "cells": {f"input/tau{t}/{m}": dict(stage="input", tau=t, method=m.split("+")[0],
                                                    proportional=m.endswith("+prop"), retention=r,
                                                    wer=w, wer_manifest=w, lm_flops_rel=r)
                          for t, m, r, w in cells}}

    files = {"free": doc("A", 0.30, [(0.95, "sim", 0.9, 0.305), (0.9, "sim", 0.8, 0.33)]),
             "free_more": doc("A", 0.30, [(0.9, "sim+prop", 0.8, 0.309)]),
             "ft": doc("B", 0.32, [(0.95, "sim", 0.9, 0.32), (0.9, "sim", 0.8, 0.31), (0.8, "sim", 0.6, 0.311),
                                   (0.9, "sim+prop", 0.8, 0.40)]),
             "other": doc("C", 0.30, [])}
    for name, d in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    j = lambda n: str(tmp_path / f"{n}.json")  # noqa: E731

    lines = bl.compare_cuts([bl.merge_docs(f"free={j('free')},{j('free_more')}"), bl.merge_docs(j("ft"))], 0.01)
    assert lines[0].startswith("WER ceiling: 31.00 % (unpooled free 30.00 % + 1.0")
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| input")}
    # plain: 90 % kept training-free (30.5 <= 31); the fine-tuned model's 60 % cell is at 31.1 > 31,
    # so its deepest within the ceiling is 80 % kept: 2x the removed tokens, 1.125x fewer kept
    assert rows["Affinity Pooling"] == ("| input embeddings | Affinity Pooling | 90.0 %, 0.95, 30.50 % "
                                        "| 80.0 %, 0.9, 31.00 % | 2.00x, 1.12x |")
    assert rows["Affinity Pooling + proportional"].endswith("| 80.0 %, 0.9, 30.90 % | none | - |")
    assert "uniform average" not in rows  # run by neither

    own = bl.compare_cuts([bl.merge_docs(j("free")), bl.merge_docs(j("ft"))], 0.01, own=True)
    assert "each model's own unpooled WER + 1.0" in own[0]
    # against its own 32 %: the 60 % cell (31.1) is within 33 %; 0.4 removed vs 0.1: 4x, kept 1.5x
    assert [line for line in own if "| Affinity Pooling |" in line] == [
        "| input embeddings | Affinity Pooling | 90.0 %, 0.95, 30.50 % | 60.0 %, 0.8, 31.10 % | 4.00x, 1.50x |"]

    with pytest.raises(ValueError, match="another ckpt"):
        bl.merge_docs(f"{j('free')},{j('other')}")
    out = tmp_path / "cmp.md"
    assert main(["compare-cuts", j("free"), f"tuned={j('ft')}", "--out", str(out)]) == 0
    assert "tuned: retention, tau, WER" in out.read_text()
    assert main(["compare-cuts", j("free"), str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
