"""Hugging Face dataset recipes: ``hf:DATASET[:CONFIG]:SPLIT`` -> a manifest of 16 kHz wav files.

    items, task = recipes.load("hf:openslr/librispeech_asr:clean:test", "data/ls-clean", limit=100)

DATASET is a hub name (``owner/name``, loaded with ``datasets.load_dataset``, so it must be in the
local cache when no hub is reachable: set ``HF_DATASETS_OFFLINE=1``) or a local path: a folder
written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``; a
saved ``DatasetDict`` is indexed by SPLIT, a saved ``Dataset`` is taken whole) or anything else
``load_dataset`` accepts (a folder of parquet files, a hub snapshot). SPLIT may carry a slice
(``test[:100]``) for ``load_dataset``; ``limit`` works for every form.

The recipe is chosen from the dataset's name (the last path component of DATASET, case and
punctuation ignored), or forced with ``recipe=``. Every recipe writes

- ``OUT/audio/<safe id>.wav``: 16-bit PCM, mono, 16 kHz (resampled with soxr when the source rate
  differs); audio is decoded here with soundfile (wav, flac, ogg, mp3), never by ``datasets``, so
  ``torchcodec`` is not needed;
- ``OUT/manifest.jsonl``: one item per row (schema in docs/manifests.md), ``audio`` relative to
  OUT; rows that cannot be used (no audio, an empty or undecodable clip, no reference) become items
  with an ``error`` field naming the cause and no ``audio``;
- ``OUT/recipe.json``: what was loaded (spec, recipe, task, metric, counts, columns).

``load`` returns the items (audio paths made absolute) and the task.

Recipes (column names, and the source they were checked against):

- ``librispeech`` -- openslr/librispeech_asr, configs clean / other, split test: columns
  ``audio``, ``text`` (upper-case transcript), ``id``, ``speaker_id``, ``chapter_id`` (dataset
  card; the same columns are used by open_asr_leaderboard / Kimi-Audio-Evalkit). ASR, WER, en.
- ``kespeech`` -- TwinkStart/KeSpeech (the hub copy of KeSpeech's test set), split test: columns
  ``ID``, ``Text``, ``audio`` (as read by public prep scripts for that repo, e.g. a KeSpeech
  ``prepare`` script that reads ``arrow_table["Text"]`` / ``["ID"]`` / ``["audio"]``); lower-case
  ``text`` / ``id`` are accepted too. ASR, CER, zh. A subdialect column, when present
  (``Subdialect`` / ``subdialect`` / ``dialect``), is copied to the item.
- ``covost2`` -- facebook/covost2 or its parquet mirror fixie-ai/covost2, configs ``en_zh-CN``
  and ``zh-CN_en`` (any ``SRC_TGT`` works), split test: columns ``audio``, ``sentence`` (source
  transcript), ``translation`` (reference), ``id`` (+ ``client_id``, ``file``) -- the HF covost2
  loading script's features and fixie-ai/covost2 users reading ``sentence`` / ``translation``.
  ST, BLEU (sacrebleu ``zh`` tokenizer for Chinese targets).
- ``voicebench`` -- hlt-lab/voicebench, configs ``openbookqa`` (split test), ``mmsu`` (splits per
  subject) and ``sd-qa`` (splits per region: usa, gbr, aus, ...): columns ``audio``, ``prompt``
  (the text that is spoken) and ``reference`` (VoiceBench's main.py and its mcq / qa evaluators,
  hlt-lab/VoiceBench; Kimi-Audio-Evalkit's VoiceBench downloader). openbookqa / mmsu are multiple
  choice with ``reference`` a letter; the choices are read from ``prompt`` (ASSUMPTION: the prompt
  lists them as ``A. ...`` / ``(A) ...`` / ``A) ...``; when they cannot be found the choices are
  the letters themselves). sd-qa is open QA with ``reference`` the answer. The other VoiceBench
  configs (alpacaeval, commoneval, ifeval, advbench, ...) are judged by GPT or rule sets and are
  refused. QA, accuracy.
- ``speech_triviaqa`` -- spoken TriviaQA: TwinkStart/speech-triavia-qa (sic; split test; columns
  ``audio``, ``question``, ``answer``), fixie-ai/trivia_qa-audio (split validation; columns
  ``question_audio``, ``question``, ``question_id``, ``answer`` = TriviaQA's struct with
  ``value`` / ``aliases``) and mistralai/triviaqa_speech. ASSUMPTION for the TwinkStart copy,
  whose card we could not read: ``answer`` is a string (several answers joined with `` OR `` are
  split) or a list of strings. QA (open), normalised exact match.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import soxr
from tqdm import tqdm

from affjax.eval import metrics

__all__ = ["TARGET_SR", "RECIPES", "Recipe", "RecipeError", "parse_spec", "parse_choices", "find_recipe", "load",
           "known_recipes"]

TARGET_SR = 16000


class RecipeError(ValueError):
    """A spec, dataset or configuration the recipes cannot handle (the message says why)."""


class _RowError(Exception):
    """One unusable row; the message becomes the item's ``error``."""


@dataclasses.dataclass
class _Ctx:
    dataset: str
    config: str | None
    split: str
    recipe: "Recipe"
    info: dict  # what prepare() worked out (languages, MC or open, ...)
    columns: list[str]


@dataclasses.dataclass
class Recipe:
    name: str
    hub: str                        # the canonical hub dataset
    keys: tuple[str, ...]           # normalised dataset names that select this recipe
    task: str                       # asr | st | qa
    metric: str
    audio_columns: tuple[str, ...]
    id_columns: tuple[str, ...]
    build: Callable[[dict, _Ctx], dict]
    prepare: Callable[[_Ctx], dict] | None = None
    description: str = ""


# ----------------------------------------------------------------------------------------------
# spec parsing and recipe lookup


def _split_outside_brackets(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c == "[":
            depth += 1
        elif c == "]":
            depth = max(0, depth - 1)
        if c == ":" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:DATASET[:CONFIG]:SPLIT' -> (DATASET, CONFIG or None, SPLIT). Colons inside a split
    slice ('test[:100]') are not separators."""
    if not isinstance(spec, str) or not spec.startswith("hf:"):
        raise RecipeError(f"expected 'hf:DATASET[:CONFIG]:SPLIT', got {spec!r}")
    parts = _split_outside_brackets(spec[3:])
    if len(parts) == 2:
        ds, cfg, split = parts[0], None, parts[1]
    elif len(parts) == 3:
        ds, cfg, split = parts
    else:
        raise RecipeError(f"expected 'hf:DATASET[:CONFIG]:SPLIT' (2 or 3 fields after 'hf:'), got {spec!r}")
    if not ds or not split:
        raise RecipeError(f"empty dataset or split in {spec!r} (expected 'hf:DATASET[:CONFIG]:SPLIT')")
    return ds, (cfg or None), split


def _norm_name(name: str) -> str:
    last = re.split(r"[\\/]", name.rstrip("/\\"))[-1]
    return re.sub(r"[^a-z0-9]", "", last.lower())


def find_recipe(dataset: str) -> Recipe | None:
    key = _norm_name(dataset)
    for r in RECIPES.values():
        if key in r.keys:
            return r
    return None


def known_recipes() -> str:
    return "; ".join(f"{r.name} ({r.hub}: {r.task}, {r.metric})" for r in RECIPES.values())


# ----------------------------------------------------------------------------------------------
# row helpers


def _col(row: dict, names: tuple[str, ...] | list[str]):
    """First of ``names`` present in ``row`` with a non-None value -> (name, value); (None, None)."""
    for n in names:
        if n in row and row[n] is not None:
            return n, row[n]
    return None, None


def _text(row: dict, names: tuple[str, ...], what: str) -> str:
    n, v = _col(row, names)
    if v is None:
        raise _RowError(f"no {what} (column {' / '.join(repr(x) for x in names)} missing or empty)")
    if not isinstance(v, str):
        v = str(v)
    if not v.strip():
        raise _RowError(f"empty {what} (column {n!r})")
    return v.strip()


# ----------------------------------------------------------------------------------------------
# recipes


def _asr_item(reference: str, language: str) -> dict:
    return {"reference": reference, "language": language,
            "prompt": metrics.default_prompt("asr", language=language)}


def _librispeech(row: dict, ctx: _Ctx) -> dict:
    item = _asr_item(_text(row, ("text", "transcript", "sentence"), "reference transcript"), "en")
    for k in ("speaker_id", "chapter_id"):
        if row.get(k) is not None:
            item[k] = row[k]
    if ctx.config:
        item["subset"] = ctx.config
    return item


def _kespeech(row: dict, ctx: _Ctx) -> dict:
    item = _asr_item(_text(row, ("Text", "text", "transcription", "sentence"), "reference transcript"), "zh")
    _, v = _col(row, ("Subdialect", "subdialect", "dialect", "Dialect"))
    if v is not None:
        item["subdialect"] = v
    return item


def _covost_prepare(ctx: _Ctx) -> dict:
    cfg = ctx.config
    if not cfg or "_" not in cfg:
        raise RecipeError(f"CoVoST 2 needs a language-pair config (e.g. en_zh-CN or zh-CN_en), got {cfg!r}: "
                          f"use hf:{ctx.dataset}:en_zh-CN:{ctx.split}")
    src, tgt = cfg.split("_", 1)
    return {"source_lang": metrics._lang(src), "target_lang": metrics._lang(tgt)}


def _covost(row: dict, ctx: _Ctx) -> dict:
    src, tgt = ctx.info["source_lang"], ctx.info["target_lang"]
    item = {"reference": _text(row, ("translation",), "reference translation"),
            "source_lang": src, "target_lang": tgt,
            "prompt": metrics.default_prompt("st", source_lang=src, target_lang=tgt)}
    _, v = _col(row, ("sentence",))
    if isinstance(v, str):
        item["source_text"] = v
    return item


_VB_MC = ("openbookqa", "mmsu", "mmlupro", "mmlu-pro")
_VB_OPEN = ("sd-qa", "sdqa")
_OPTION = re.compile(r"(?:^|(?<=\s))\(?([A-J])(?:\)|[.):])\s+")


def parse_choices(text: str) -> tuple[str, list[str]] | None:
    """(question, choices) from a prompt listing options 'A. x' / '(A) x' / 'A) x' / 'A: x' in order
    from A; None when fewer than two consecutive options are found. The last option ends at the end
    of its line."""
    marks = [(m.group(1), m.start(), m.end()) for m in _OPTION.finditer(text)]
    for i, (letter, start, _) in enumerate(marks):
        if letter != "A":
            continue
        seq = [marks[i]]
        want = "B"
        for m in marks[i + 1:]:
            if m[0] == want:
                seq.append(m)
                want = chr(ord(want) + 1)
        if len(seq) < 2:
            continue
        choices = []
        for k, (_, _, end) in enumerate(seq):
            stop = seq[k + 1][1] if k + 1 < len(seq) else len(text)
            piece = text[end:stop]
            if k + 1 == len(seq):
                piece = piece.split("\n", 1)[0]
            choices.append(piece.strip().rstrip(";,").strip())
        if all(choices):
            return text[:start].strip(), choices
    return None


def _voicebench_prepare(ctx: _Ctx) -> dict:
    cfg = (ctx.config or "").lower()
    if cfg in _VB_MC:
        return {"mc": True}
    if cfg in _VB_OPEN:
        return {"mc": False}
    raise RecipeError(f"VoiceBench config {ctx.config!r} is not scored here: its answers are judged by GPT or "
                      f"rule sets. Scored configs: openbookqa, mmsu (multiple choice), sd-qa (open; split = region, "
                      f"e.g. hf:{ctx.dataset}:sd-qa:usa)")


def _voicebench(row: dict, ctx: _Ctx) -> dict:
    question = _text(row, ("prompt",), "question text")
    _, ref = _col(row, ("reference", "answer"))
    if ref is None or (isinstance(ref, str) and not ref.strip()):
        raise _RowError("no reference answer (column 'reference' missing or empty)")
    item: dict[str, Any] = {"prompt": metrics.default_prompt("qa"), "question": question}
    if ctx.info["mc"]:
        parsed = parse_choices(question)
        letters = None
        if parsed is None:
            choices = ["A", "B", "C", "D"]
            letters = True
        else:
            choices = parsed[1]
        k = metrics.mc_answer_index(str(ref).strip(), [chr(ord("A") + i) for i in range(len(choices))])
        if k is None:
            raise _RowError(f"reference {ref!r} is not an option letter of {len(choices)} choices")
        item.update({"choices": choices, "answer": k})
        if letters:
            item["choices_from"] = "letters (no options found in the prompt)"
    else:
        item["answer"] = _answers_list(ref)
    return item


def _answers_list(v) -> list[str] | str:
    if isinstance(v, dict):
        out = []
        for k in ("value", "aliases", "normalized_aliases"):
            x = v.get(k)
            if isinstance(x, str):
                out.append(x)
            elif isinstance(x, (list, tuple)):
                out += [str(a) for a in x if a]
        seen, res = set(), []
        for a in out:
            if a.strip() and a not in seen:
                seen.add(a)
                res.append(a.strip())
        if not res:
            raise _RowError("answer struct has no value / aliases")
        return res
    if isinstance(v, (list, tuple)):
        res = [str(a).strip() for a in v if a is not None and str(a).strip()]
        if not res:
            raise _RowError("empty answer list")
        return res
    s = str(v).strip()
    if not s:
        raise _RowError("empty answer")
    parts = [p.strip() for p in s.split(" OR ") if p.strip()]
    return parts if len(parts) > 1 else s


def _triviaqa(row: dict, ctx: _Ctx) -> dict:
    _, ans = _col(row, ("answer", "answers", "Answer"))
    if ans is None:
        raise _RowError("no answer (column 'answer' missing or empty)")
    item: dict[str, Any] = {"prompt": metrics.default_prompt("qa"), "answer": _answers_list(ans)}
    _, q = _col(row, ("question", "Question", "prompt"))
    if isinstance(q, str):
        item["question"] = q
    return item


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("librispeech", "openslr/librispeech_asr", ("librispeechasr", "librispeech"), "asr", "wer",
           ("audio",), ("id",), _librispeech, description="LibriSpeech test-clean / test-other"),
    Recipe("kespeech", "TwinkStart/KeSpeech", ("kespeech",), "asr", "cer",
           ("audio",), ("ID", "id"), _kespeech, description="KeSpeech (Mandarin + 8 subdialects)"),
    Recipe("covost2", "facebook/covost2", ("covost2", "covost"), "st", "bleu",
           ("audio",), ("id",), _covost, _covost_prepare, description="CoVoST 2 en->zh, zh->en"),
    Recipe("voicebench", "hlt-lab/voicebench", ("voicebench",), "qa", "accuracy",
           ("audio",), ("id", "key"), _voicebench, _voicebench_prepare,
           description="VoiceBench openbookqa / mmsu (MC) and sd-qa (open)"),
    Recipe("speech_triviaqa", "TwinkStart/speech-triavia-qa",
           ("speechtriaviaqa", "speechtriviaqa", "triviaqaaudio", "triviaqaspeech", "spokentriviaqa",
            "audiotriviaqa"), "qa", "accuracy",
           ("audio", "question_audio"), ("question_id", "id"), _triviaqa, description="spoken TriviaQA"),
)}


def _generic(columns: dict, task: str) -> Recipe:
    """A recipe from explicit column names: "audio" (default 'audio'), "id" (optional), and
    asr: "reference", "language" (optional); st: "reference", "target_lang", "source_lang"
    (optional); qa: "answer", "choices" (optional: multiple choice), "question" (optional).
    A language entry that is not a column name is taken as the language code itself."""
    if task not in ("asr", "st", "qa"):
        raise RecipeError(f"a generic recipe (columns=...) needs task asr, st or qa, got {task!r}")
    need = {"asr": ("reference",), "st": ("reference", "target_lang"), "qa": ("answer",)}[task]
    absent = [k for k in need if k not in columns]
    if absent:
        raise RecipeError(f"columns for a generic {task} recipe must name {', '.join(need)} (missing: "
                          f"{', '.join(absent)})")

    def lang(row: dict, key: str, default: str | None) -> str | None:
        v = columns.get(key)
        if v is None:
            return default
        v = row.get(v, v) if isinstance(v, str) else v
        return metrics._lang(str(v)) if v else default

    def build(row: dict, ctx: _Ctx) -> dict:
        if task == "asr":
            return _asr_item(_text(row, (columns["reference"],), "reference"), lang(row, "language", "en"))
        if task == "st":
            src, tgt = lang(row, "source_lang", None), lang(row, "target_lang", None)
            return {"reference": _text(row, (columns["reference"],), "reference"), "source_lang": src,
                    "target_lang": tgt, "prompt": metrics.default_prompt("st", source_lang=src, target_lang=tgt)}
        item: dict[str, Any] = {"prompt": metrics.default_prompt("qa")}
        if isinstance(row.get(columns.get("question", "")), str):
            item["question"] = row[columns["question"]]
        ans = row.get(columns["answer"])
        if ans is None:
            raise _RowError(f"no answer (column {columns['answer']!r} missing or empty)")
        if "choices" in columns:
            choices = row.get(columns["choices"])
            if not isinstance(choices, (list, tuple)) or len(choices) < 2:
                raise _RowError(f"column {columns['choices']!r} is not a list of at least two choices")
            choices = [str(c) for c in choices]
            k = metrics.mc_answer_index(ans, choices)
            if k is None:
                raise _RowError(f"answer {ans!r} is not one of the choices")
            item.update({"choices": choices, "answer": k})
        else:
            item["answer"] = _answers_list(ans)
        return item

    def prepare(ctx: _Ctx) -> dict:
        named = [columns.get("audio", "audio")] + [columns[k] for k in ("reference", "answer", "choices")
                                                   if k in columns]
        absent = [c for c in named if c not in ctx.columns]
        if absent:
            raise RecipeError(f"columns {absent} are not in the dataset (its columns: {', '.join(ctx.columns)})")
        return {}

    return Recipe("generic", "-", (), task, {"asr": "wer", "st": "bleu", "qa": "accuracy"}[task],
                  (columns.get("audio", "audio"),), (columns["id"],) if "id" in columns else ("id",),
                  build, prepare, description="explicit columns")


# ----------------------------------------------------------------------------------------------
# audio


def _decode(value) -> tuple[np.ndarray, int]:
    """(float32 mono samples, sample rate) from any form a datasets audio cell takes."""
    import soundfile as sf  # deferred: soundfile (libsndfile) loads only when audio is decoded

    if value is None:
        raise _RowError("missing audio (the audio cell is empty)")
    if hasattr(value, "get_all_samples"):  # a torchcodec AudioDecoder (datasets >= 4 decoding)
        s = value.get_all_samples()
        x = np.asarray(s.data, dtype=np.float32)
        x = x.mean(axis=0) if x.ndim == 2 else x
        return x, int(s.sample_rate)
    if isinstance(value, dict) and value.get("array") is not None:
        x = np.asarray(value["array"], dtype=np.float32)
        sr = value.get("sampling_rate")
        if sr is None:
            raise _RowError("audio array without a sampling_rate")
        if x.ndim == 2:  # (channels, n) as datasets returns multi-channel, or (n, channels)
            x = x.mean(axis=0) if x.shape[0] < x.shape[1] else x.mean(axis=1)
        return x, int(sr)
    data = path = None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, (str, os.PathLike)):
        path = str(value)
    else:
        raise _RowError(f"unsupported audio cell of type {type(value).__name__}")
    try:
        if data:
            x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        elif path and Path(path).is_file():
            x, sr = sf.read(path, dtype="float32", always_2d=True)
        elif path:
            raise _RowError(f"no audio bytes and the audio file {path!r} is not found")
        else:
            raise _RowError("missing audio (neither bytes nor a path)")
    except _RowError:
        raise
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError on odd headers
        raise _RowError(f"undecodable audio ({type(e).__name__}: {e})") from None
    return x.mean(axis=1), int(sr)


def _write_wav(path: Path, x: np.ndarray, sr: int) -> float:
    """Resample to TARGET_SR, write 16-bit PCM; returns the duration in seconds."""
    import soundfile as sf  # deferred: soundfile (libsndfile) loads only when audio is written

    if x.size == 0:
        raise _RowError("empty audio (0 samples)")
    if not np.all(np.isfinite(x)):
        raise _RowError("audio holds NaN or infinite samples")
    if sr <= 0:
        raise _RowError(f"bad sample rate {sr}")
    if sr != TARGET_SR:
        x = soxr.resample(x, sr, TARGET_SR).astype(np.float32)
    x = np.clip(x, -1.0, 1.0)
    sf.write(str(path), x, TARGET_SR, subtype="PCM_16")
    return len(x) / TARGET_SR


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(rid: str, used: set[str]) -> str:
    base = _SAFE.sub("_", rid).strip("._")[:100] or "item"
    name, k = base, 1
    while name.lower() in used:
        k += 1
        name = f"{base}-{k}"
    used.add(name.lower())
    return name


# ----------------------------------------------------------------------------------------------
# loading


def _load_dataset(name: str, config: str | None, split: str):
    try:
        import datasets  # deferred: optional (the hf extra) and heavy
    except ImportError:
        raise RecipeError("the hf: recipes need the 'datasets' package (pip install 'affjax[hf]')") from None
    p = Path(name).expanduser()
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        try:
            obj = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001
            raise RecipeError(f"{p}: cannot load the saved dataset ({type(e).__name__}: {e})") from None
        if isinstance(obj, datasets.DatasetDict):
            if split not in obj:
                raise RecipeError(f"{p}: no split {split!r} (splits: {', '.join(obj)})")
            return obj[split]
        return obj
    target = str(p) if p.exists() else name
    try:
        return datasets.load_dataset(target, config, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing config or split, bad files
        if p.exists() and config is not None:  # a local folder has no configs: the config only selects the recipe
            try:
                return datasets.load_dataset(target, split=split)
            except Exception:  # noqa: BLE001
                pass
        hint = "" if p.exists() else (" (no hub is reachable? it must be in the local cache; "
                                      "set HF_DATASETS_OFFLINE=1 to use the cache)")
        raise RecipeError(f"cannot load Hugging Face dataset {name!r} (config {config}, split {split}){hint}: "
                          f"{type(e).__name__}: {e}") from None


def _undecoded(ds):
    """Audio columns switched to undecoded {bytes, path} cells (decoding is done here)."""
    from datasets import Audio  # deferred: datasets is optional and heavy

    for name, feat in ds.features.items():
        if isinstance(feat, Audio) and feat.decode:
            ds = ds.cast_column(name, Audio(decode=False))
    return ds


def load(spec: str, out_dir, *, limit: int | None = None, progress: bool = True, recipe: str | None = None,
         task: str | None = None, columns: dict | None = None) -> tuple[list[dict], str]:
    """Turn ``hf:DATASET[:CONFIG]:SPLIT`` into ``out_dir/manifest.jsonl`` + ``out_dir/audio/*.wav``.

    Returns (items, task): the manifest items in dataset order with absolute audio paths.
    ``recipe`` forces a recipe by name; ``columns`` (with ``task``) describes an unknown dataset:
    {"audio": col, "reference": col} for asr / st (st also "target_lang": a code, optional
    "source_lang"), {"audio": col, "answer": col[, "choices": col]} for qa, optional "id"."""
    name, config, split = parse_spec(spec)
    if recipe is not None:
        if recipe not in RECIPES:
            raise RecipeError(f"unknown recipe {recipe!r}; known: {known_recipes()}")
        rec = RECIPES[recipe]
    elif columns is not None:
        rec = _generic(dict(columns), task or "")
    else:
        rec = find_recipe(name)
        if rec is None:
            raise RecipeError(f"no recipe for dataset {name!r} (matched on its last path component). Known recipes: "
                              f"{known_recipes()}. Rename the folder, pass recipe=NAME, or describe the columns "
                              f"(columns={{'audio': ..., 'reference': ...}}, task=...)")
    if task is not None and task != rec.task:
        raise RecipeError(f"recipe {rec.name} is a {rec.task} task, not {task}")
    if limit is not None and limit < 0:
        raise RecipeError(f"limit must be >= 0, got {limit}")

    ds = _load_dataset(name, config, split)
    cols = list(ds.column_names)
    ctx = _Ctx(name, config, split, rec, {}, cols)
    if rec.prepare is not None:
        ctx.info = rec.prepare(ctx) or {}
    audio_col = next((c for c in rec.audio_columns if c in cols), None)
    if audio_col is None:
        raise RecipeError(f"{name}: no audio column (looked for {', '.join(rec.audio_columns)}; "
                          f"columns: {', '.join(cols)})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    ds = _undecoded(ds)

    out = Path(out_dir)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    used_names: set[str] = set()
    seen_ids: dict[str, int] = {}
    items: list[dict] = []
    errors = 0
    seconds = 0.0
    tag = re.sub(r"[^A-Za-z0-9]+", "-", _norm_name(name) or rec.name)
    bar = tqdm(total=len(ds), unit="item", disable=not progress, desc=f"{rec.name} {config or ''} {split}".strip())
    for i in range(len(ds)):
        try:
            row = ds[i]
        except Exception as e:  # noqa: BLE001 - a bad parquet cell
            row, row_err = {}, f"unreadable row ({type(e).__name__}: {e})"
        else:
            row_err = None
        _, rid = _col(row, rec.id_columns)
        rid = str(rid) if rid is not None and str(rid).strip() else f"{tag}-{i:06d}"
        if rid in seen_ids:
            seen_ids[rid] += 1
            rid = f"{rid}-{seen_ids[rid]}"
        seen_ids.setdefault(rid, 1)
        item: dict[str, Any] = {"id": rid}
        try:
            if row_err:
                raise _RowError(row_err)
            fields = rec.build(row, ctx)
            x, sr = _decode(row.get(audio_col))
            fname = _safe_name(rid, used_names) + ".wav"
            seconds += _write_wav(audio_dir / fname, x, sr)
            item["audio"] = f"audio/{fname}"
            item["task"] = rec.task
            item.update(fields)
        except _RowError as e:
            errors += 1
            item.update({"task": rec.task, "error": f"row {i} (id {rid!r}): {e}"})
        item.update({"dataset": name, "split": split} if config is None else
                    {"dataset": name, "config": config, "split": split})
        items.append(item)
        bar.update(1)
    bar.close()

    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    info = {"spec": spec, "dataset": name, "config": config, "split": split, "recipe": rec.name,
            "task": rec.task, "metric": rec.metric, "items": len(items), "errors": errors,
            "audio_seconds": round(seconds, 2), "sample_rate": TARGET_SR, "limit": limit, "columns": cols}
    (out / "recipe.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    base = out.resolve()
    resolved = [dict(it, audio=str(base / it["audio"])) if "audio" in it else dict(it) for it in items]
    return resolved, rec.task
