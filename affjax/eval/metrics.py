"""Scoring for the eval tasks: ASR (WER / CER), speech translation (BLEU), speech QA (accuracy).

    from affjax.eval import metrics
    metrics.task_metrics("asr", rows)   # {"wer": 0.05, "num_scored": 2620, ...}
    metrics.primary("asr", m)           # ("wer", 0.05)

Rows are per-item result dicts (the runner's ``results.jsonl`` lines). Fields read:

- every task: ``error`` (a row with a truthy ``error`` is skipped), ``text`` (the generated text;
  ``pred`` is used when ``text`` is absent and ``pred`` is a string);
- asr: ``reference``, ``language`` ("en" by default; Chinese, "zh"/"yue"/"cmn", is scored by CER);
- st: ``reference``, ``target_lang`` (Chinese targets use sacrebleu's ``zh`` tokenizer, all
  others ``13a``);
- qa: multiple choice when ``choices`` is a non-empty list: ``answer`` (an index into ``choices``,
  the choice string, or a letter "A".. when no choice matches), prediction = argmax of
  ``choice_logprobs`` (or an integer ``pred``, or the generated text matched to a choice / letter);
  open otherwise: ``answer`` (a string or a list of acceptable strings), scored by normalised exact
  match of the generated text.

Normalisation, stated once:

- WER: Whisper's ``EnglishTextNormalizer`` for English (:func:`make_normalizer`, the same one the
  Whisper eval uses), Whisper's ``BasicTextNormalizer`` for other space-delimited languages; then
  jiwer's corpus WER (total edits / total reference words); pairs whose normalised reference is
  empty are skipped.
- CER (Chinese): :func:`normalize_zh` -- Unicode NFKC (full-width letters, digits and punctuation to
  their ASCII forms), lower case, then every punctuation character (Unicode category P*) and all
  whitespace removed; then jiwer's corpus CER (total character edits / total reference characters).
  No traditional -> simplified conversion is done.
- BLEU: sacrebleu ``corpus_bleu`` on the raw strings (sacrebleu tokenises itself), score 0..100.
- Exact match (open QA): SQuAD's normalisation (:func:`normalize_answer`: lower case, punctuation
  removed, articles a/an/the removed, whitespace collapsed), then string equality against any of
  the acceptable answers.
"""

from __future__ import annotations

import functools
import json
import math
import re
import string
import unicodedata
from importlib.resources import files
from typing import Callable, Iterable, Sequence

__all__ = [
    "AUDIO_PROMPT", "LANGUAGE_NAMES", "CER_LANGUAGES", "default_prompt", "make_normalizer", "corpus_wer",
    "wer", "normalize_zh", "cer", "bleu_tokenizer", "bleu", "normalize_answer", "exact_match",
    "contains_answer", "mc_prediction", "mc_answer_index", "task_metrics", "primary",
]

# The audio placeholder of Qwen2-Audio's processor: <|AUDIO|> is expanded to one token per audio frame.
AUDIO_PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>"

LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "ja": "Japanese", "ko": "Korean", "ru": "Russian", "pt": "Portuguese", "nl": "Dutch", "ar": "Arabic",
    "tr": "Turkish", "fa": "Persian", "sv": "Swedish", "mn": "Mongolian", "cy": "Welsh", "ca": "Catalan",
    "sl": "Slovenian", "et": "Estonian", "id": "Indonesian", "ta": "Tamil", "lv": "Latvian", "yue": "Cantonese",
}

# Languages scored by character error rate (no word boundaries in the script).
CER_LANGUAGES = ("zh", "yue", "cmn")

TASKS = ("asr", "st", "qa")


def _lang(code: str | None, default: str = "en") -> str:
    """Base language code: 'zh-CN' -> 'zh', 'en_US' -> 'en', None -> default."""
    if not code:
        return default
    return re.split(r"[-_]", str(code).strip().lower(), maxsplit=1)[0] or default


def _is_chinese(code: str | None) -> bool:
    return _lang(code) in CER_LANGUAGES


# ----------------------------------------------------------------------------------------------
# prompts


def default_prompt(task: str, *, language: str = "en", source_lang: str | None = None,
                   target_lang: str | None = None) -> str:
    """Qwen2-Audio base-model prompt for a task (audio first, then the instruction, no chat template).

    Sources:
    - asr: "Detect the language and recognize the speech: <|en|>" -- the prompt of Qwen2-Audio's
      own evaluation lists (QwenLM/Qwen2-Audio eval_audio/EVALUATION.md, the *_eval.jsonl ``prompt``
      field, prefixed with the audio tags by eval_audio/evaluate_asr.py), as reproduced in
      MoonshotAI/Kimi-Audio-Evalkit almeval/models/qwen_audio.py and the Qwen2-Audio paper's
      Figure 2 ("Detect the language and recognize the speech: <|zh|>").
    - st: "Translate the speech into <Target> and only output the translation: <|src|>" -- the
      Qwen2-Audio-specific prompts of lmms-eval's CoVoST 2 tasks
      (EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/covost2/_default_template_{en_zh,zh_en}_yaml,
      ``lmms_eval_specific_kwargs.qwen2_audio.pre_prompt``). Qwen's own covost2_eval.jsonl prompts
      are not public in text form.
    - qa: the question is spoken in the audio (VoiceBench style), so the text only invites the
      answer: " Your answer to the question is:" -- Kimi-Audio-Evalkit's Qwen2-Audio base wrapper
      for Audio-QA ("help to invoke basemodel continuous output"). The HF model card's example for
      the base model is likewise audio + a bare instruction ("Generate the caption in English:").
    """
    if task == "asr":
        return f"{AUDIO_PROMPT}Detect the language and recognize the speech: <|{_lang(language)}|>"
    if task == "st":
        if target_lang is None:
            raise ValueError("default_prompt('st') needs target_lang")
        tgt = _lang(target_lang)
        name = LANGUAGE_NAMES.get(tgt, tgt)
        src = f" <|{_lang(source_lang)}|>" if source_lang else ""
        return f"{AUDIO_PROMPT}Translate the speech into {name} and only output the translation:{src}"
    if task == "qa":
        return f"{AUDIO_PROMPT} Your answer to the question is:"
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def kimi_default_instruction(task: str, *, target_lang: str | None = None) -> str:
    """Kimi-Audio's instruction for a task: the text message the audio message follows (no audio
    tags: the clip is its own message).
    - asr: "Please transcribe the spoken content into written text." (the issue's, for every language).
    - st: "Please translate the speech into <Target>." *(project choice)*.
    - qa: none, the question is spoken: the audio message alone *(project choice)*.
    """
    if task == "asr":
        return "Please transcribe the spoken content into written text."
    if task == "st":
        if target_lang is None:
            raise ValueError("kimi_default_instruction('st') needs target_lang")
        tgt = _lang(target_lang)
        return f"Please translate the speech into {LANGUAGE_NAMES.get(tgt, tgt)}."
    if task == "qa":
        return ""
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


# ----------------------------------------------------------------------------------------------
# ASR: WER and CER


def make_normalizer(tokenizer=None, kind: str = "english"):
    """(normaliser, description): Whisper's English normaliser with its British -> American
    spelling table (the tokenizer's when it has one, else the copy in the `whisper-normalizer`
    package: the table OpenAI ships as `normalizer.json`), or the basic one."""
    # deferred: transformers is heavy; this module is imported by light code (affjax report)
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    if kind == "basic":
        return BasicTextNormalizer(), "basic"
    if kind != "english":
        raise ValueError(f"unknown normalizer {kind!r} (english, basic)")
    mapping = getattr(tokenizer, "english_spelling_normalizer", None) or english_spelling_table()
    if mapping:
        return EnglishTextNormalizer(mapping), "english"
    return EnglishTextNormalizer({}), "english (no spelling mapping)"


@functools.cache
def english_spelling_table() -> dict[str, str]:
    """Whisper's British -> American spelling table; {} when `whisper-normalizer` is not installed
    (CTranslate2 tokenizers, like the offline Whisper assets, do not carry it)."""
    try:
        path = files("whisper_normalizer").joinpath("normalizers/english.json")
        return json.loads(path.read_text(encoding="utf-8"))
    except (ImportError, OSError):
        return {}


def corpus_wer(refs: list[str], hyps: list[str]) -> float | None:
    """Corpus WER (errors / reference words) over normalised pairs; empty references are skipped."""
    import jiwer  # deferred: jiwer loads only when scoring

    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if not pairs:
        return None
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def word_errors(refs: list[str], hyps: list[str]) -> list[int | None]:
    """Per pair of normalised transcripts: substitutions + deletions + insertions (None for an empty
    reference, which corpus_wer skips). Their sum over the reference words is corpus_wer."""
    import jiwer

    def errors(r, h):
        if not r.strip():
            return None
        m = jiwer.process_words(r, h)
        return m.substitutions + m.deletions + m.insertions

    return [errors(r, h) for r, h in zip(refs, hyps)]


def wer(refs: Sequence[str], hyps: Sequence[str], normalizer: Callable[[str], str] | None = None) -> float | None:
    """Corpus WER of ``hyps`` against ``refs`` after ``normalizer`` (None: Whisper's English one).
    None when no reference has a word left after normalisation."""
    if len(refs) != len(hyps):
        raise ValueError(f"wer: {len(refs)} references but {len(hyps)} hypotheses")
    if normalizer is None:
        normalizer, _ = make_normalizer(None)
    return corpus_wer([normalizer(r or "") for r in refs], [normalizer(h or "") for h in hyps])


def normalize_zh(text: str) -> str:
    """Chinese CER normalisation: NFKC, lower case, punctuation (Unicode P*) and whitespace removed."""
    t = unicodedata.normalize("NFKC", text or "").lower()
    return "".join(c for c in t if not c.isspace() and not unicodedata.category(c).startswith("P"))


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float | None:
    """Corpus CER (character edits / reference characters) after :func:`normalize_zh`; pairs whose
    normalised reference is empty are skipped; None when none is left."""
    import jiwer  # deferred: jiwer loads only when scoring

    if len(refs) != len(hyps):
        raise ValueError(f"cer: {len(refs)} references but {len(hyps)} hypotheses")
    pairs = [(normalize_zh(r), normalize_zh(h)) for r, h in zip(refs, hyps)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return None
    return float(jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]))


# ----------------------------------------------------------------------------------------------
# speech translation: BLEU


def bleu_tokenizer(target_lang: str | None) -> str:
    """sacrebleu tokenizer for a target language: 'zh' for Chinese, '13a' otherwise."""
    return "zh" if _is_chinese(target_lang) else "13a"


def bleu(refs: Sequence[str], hyps: Sequence[str], target_lang: str | None = None) -> float | None:
    """sacrebleu corpus BLEU (0..100), one reference per hypothesis; None for an empty corpus."""
    import sacrebleu  # deferred: sacrebleu is heavy; only BLEU needs it

    if len(refs) != len(hyps):
        raise ValueError(f"bleu: {len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return None
    res = sacrebleu.corpus_bleu([h or "" for h in hyps], [[r or "" for r in refs]],
                                tokenize=bleu_tokenizer(target_lang))
    return float(res.score)


# ----------------------------------------------------------------------------------------------
# QA: exact match and multiple choice

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, punctuation removed (ASCII and Unicode P*), articles
    (a, an, the) removed, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", s or "").lower()
    s = "".join(" " if (c in _PUNCT or unicodedata.category(c).startswith("P")) else c for c in s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _answers(answers) -> list[str]:
    if answers is None:
        return []
    if isinstance(answers, str):
        answers = [answers]
    return [str(a) for a in answers if a is not None and str(a).strip()]


def exact_match(pred: str, answers: str | Iterable[str]) -> bool:
    """Normalised exact match of ``pred`` against one acceptable answer or a list of them."""
    p = normalize_answer(pred)
    return any(p == normalize_answer(a) for a in _answers(answers))


def contains_answer(pred: str, answers: str | Iterable[str]) -> bool:
    """Looser check: a normalised acceptable answer occurs in the normalised prediction (on word
    boundaries). Reported beside exact match for verbose generative answers."""
    p = f" {normalize_answer(pred)} "
    return any(n and f" {n} " in p for n in (normalize_answer(a) for a in _answers(answers)))


_LETTER = re.compile(r"^\s*\(?([A-Za-z])\s*[\).:]?\s*$")


def mc_answer_index(answer, choices: Sequence[str]) -> int | None:
    """The gold answer as an index into ``choices``: an int, the choice string (exactly or after
    :func:`normalize_answer`), or a letter 'A'.. / '(B)'. None when it cannot be resolved."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    if isinstance(answer, float) and answer.is_integer():
        return mc_answer_index(int(answer), choices)
    a = str(answer)
    if a in choices:
        return list(choices).index(a)
    na = normalize_answer(a)
    for i, c in enumerate(choices):
        if normalize_answer(c) == na and na:
            return i
    m = _LETTER.match(a)
    if m:
        k = ord(m.group(1).upper()) - ord("A")
        if 0 <= k < len(choices):
            return k
    if a.strip().isdigit():
        k = int(a.strip())
        return k if 0 <= k < len(choices) else None
    return None


def mc_prediction(row: dict) -> int | None:
    """Predicted choice index: argmax of ``choice_logprobs`` (first on ties, NaN never wins), else an
    integer ``pred``, else the generated text resolved like a gold answer."""
    choices = row.get("choices") or []
    lp = row.get("choice_logprobs")
    if lp is not None and len(lp) > 0:
        vals = [(-math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)) for v in lp]
        best = max(range(len(vals)), key=lambda i: (vals[i], -i))
        return best if vals[best] > -math.inf else None
    pred = row.get("pred")
    if isinstance(pred, int) and not isinstance(pred, bool):
        return pred
    text = row.get("text") if isinstance(row.get("text"), str) else (pred if isinstance(pred, str) else None)
    if text is None:
        return None
    return mc_answer_index(text.strip(), choices)


# ----------------------------------------------------------------------------------------------
# per-task aggregation


def _hyp(row: dict) -> str:
    t = row.get("text")
    if isinstance(t, str):
        return t
    p = row.get("pred")
    return p if isinstance(p, str) else ""


def _good(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if isinstance(r, dict) and not r.get("error")]


def _round(x: float | None, nd: int = 6):
    return None if x is None else round(float(x), nd)


def _asr_metrics(rows: list[dict], normalizer=None) -> dict:
    scored = [r for r in rows if isinstance(r.get("reference"), str) and r["reference"].strip()]
    by_lang: dict[str, list[dict]] = {}
    for r in scored:
        by_lang.setdefault(_lang(r.get("language")), []).append(r)
    out: dict = {}
    eng = normalizer
    eng_name = None
    if eng is None:
        eng, eng_name = make_normalizer(None)
    basic = None
    wer_refs: list[str] = []
    wer_hyps: list[str] = []
    cer_refs: list[str] = []
    cer_hyps: list[str] = []
    per_lang: dict[str, tuple[str, float | None]] = {}
    for lang, rs in sorted(by_lang.items()):
        refs, hyps = [r["reference"] for r in rs], [_hyp(r) for r in rs]
        if lang in CER_LANGUAGES:
            cer_refs += refs
            cer_hyps += hyps
            per_lang[lang] = ("cer", cer(refs, hyps))
        else:
            if lang == "en":
                norm = eng
            else:
                if basic is None:
                    basic, _ = make_normalizer(None, "basic")
                norm = basic
            nr, nh = [norm(x) for x in refs], [norm(x) for x in hyps]
            wer_refs += nr
            wer_hyps += nh
            per_lang[lang] = ("wer", corpus_wer(nr, nh))
    if wer_refs:
        out["wer"] = _round(corpus_wer(wer_refs, wer_hyps))
    if cer_refs:
        out["cer"] = _round(cer(cer_refs, cer_hyps))
    if not wer_refs and not cer_refs:
        out["wer"] = None
    if len(per_lang) > 1:
        for lang, (name, v) in per_lang.items():
            out[f"{name}_{lang}"] = _round(v)
            out[f"num_scored_{lang}"] = len(by_lang[lang])
    out["num_scored"] = len(scored)
    if "en" in by_lang:
        out["normalizer"] = eng_name or getattr(normalizer, "__name__", type(normalizer).__name__)
    return out


def _st_metrics(rows: list[dict]) -> dict:
    scored = [r for r in rows if isinstance(r.get("reference"), str) and r["reference"].strip()]
    by_tgt: dict[str, list[dict]] = {}
    for r in scored:
        by_tgt.setdefault(_lang(r.get("target_lang"), default="und"), []).append(r)
    out: dict = {}
    if len(by_tgt) <= 1:
        tgt, rs = next(iter(by_tgt.items()), ("und", []))
        out["bleu"] = _round(bleu([r["reference"] for r in rs], [_hyp(r) for r in rs], tgt), 4)
        if rs:
            out["tokenize"] = bleu_tokenizer(tgt)
    else:  # mixed target languages: one BLEU per target (a pooled score would mix tokenisations)
        for tgt, rs in sorted(by_tgt.items()):
            out[f"bleu_{tgt}"] = _round(bleu([r["reference"] for r in rs], [_hyp(r) for r in rs], tgt), 4)
            out[f"num_scored_{tgt}"] = len(rs)
    out["num_scored"] = len(scored)
    return out


def _qa_metrics(rows: list[dict]) -> dict:
    mc_total = mc_ok = open_total = open_ok = open_contains = unresolved = 0
    for r in rows:
        choices = r.get("choices")
        if isinstance(choices, (list, tuple)) and len(choices) > 0:
            gold = mc_answer_index(r.get("answer"), choices)
            if gold is None:
                unresolved += 1
                continue
            mc_total += 1
            mc_ok += int(mc_prediction(r) == gold)
        else:
            answers = _answers(r.get("answer"))
            if not answers:
                unresolved += 1
                continue
            open_total += 1
            hyp = _hyp(r)
            open_ok += int(exact_match(hyp, answers))
            open_contains += int(contains_answer(hyp, answers))
    n = mc_total + open_total
    out = {"accuracy": _round(None if n == 0 else (mc_ok + open_ok) / n), "mc": mc_total, "open": open_total,
           "num_scored": n}
    if mc_total:
        out["accuracy_mc"] = _round(mc_ok / mc_total)
    if open_total:
        out["accuracy_open"] = _round(open_ok / open_total)
        out["contains_open"] = _round(open_contains / open_total)
    if unresolved:
        out["unscored"] = unresolved
    return out


def task_metrics(task: str, rows: Iterable[dict], *, normalizer: Callable[[str], str] | None = None) -> dict:
    """Corpus metrics for one task over result rows (rows with ``error`` are skipped).

    asr: {"wer"} for space-delimited languages and/or {"cer"} for Chinese, per language
    ("wer_en", "cer_zh", "num_scored_<lang>") when mixed, "num_scored", "normalizer";
    st: {"bleu", "tokenize"} or one "bleu_<tgt>" per target language when mixed, "num_scored";
    qa: {"accuracy", "mc", "open", "num_scored"} plus "accuracy_mc", "accuracy_open",
    "contains_open" (answer contained in the generated text) and "unscored" when they apply.
    A metric with nothing to score is None. ``normalizer`` replaces Whisper's English normaliser
    for English ASR rows (e.g. one built with the tokenizer's spelling mapping)."""
    good = _good(rows)
    if task == "asr":
        return _asr_metrics(good, normalizer)
    if task == "st":
        return _st_metrics(good)
    if task == "qa":
        return _qa_metrics(good)
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def primary(task: str, metrics: dict) -> tuple[str, float | None]:
    """(name, value) of the headline metric: asr -> wer (cer when only Chinese), st -> bleu (the
    first bleu_<tgt> when mixed), qa -> accuracy."""
    m = metrics or {}
    if task == "asr":
        if m.get("wer") is not None or "cer" not in m:
            return "wer", m.get("wer")
        return "cer", m.get("cer")
    if task == "st":
        if "bleu" in m:
            return "bleu", m.get("bleu")
        per = sorted(k for k in m if k.startswith("bleu_"))
        return (per[0], m[per[0]]) if per else ("bleu", None)
    if task == "qa":
        return "accuracy", m.get("accuracy")
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
