"""affjax.eval.metrics against hand-computable cases and against sacrebleu / jiwer themselves."""

import math

import pytest

from affjax.eval import metrics as M


def identity(s):
    return s


# ----------------------------------------------------------------------------------------------
# WER


def test_wer_one_substitution():
    # 6 reference words, "the" -> "a": 1 substitution
    assert M.wer(["the cat sat on the mat"], ["the cat sat on a mat"], identity) == pytest.approx(1 / 6)


def test_wer_is_corpus_level_not_mean_of_sentences():
    refs = ["a b c d", "e f"]  # 6 words
    hyps = ["a x c d", "e f g"]  # 1 substitution + 1 insertion
    assert M.wer(refs, hyps, identity) == pytest.approx(2 / 6)  # the mean of sentence WERs would be 0.375


def test_wer_default_is_whisper_english_normaliser():
    # case and punctuation go, "mister" <-> "mr" is normalised: no errors left
    assert M.wer(["Mr. Smith went HOME!"], ["mister smith went home"]) == 0.0
    # and a real word error survives normalisation: 1 of 4 words
    assert M.wer(["Mr. Smith went HOME!"], ["mister smith went house"]) == pytest.approx(1 / 4)


def test_english_normalizer_maps_british_spellings():
    """Whisper's spelling table (whisper-normalizer's copy: the offline CTranslate2 tokenizers lack
    it): British and American spellings score as the same word; other words still count."""
    norm, name = M.make_normalizer(None)
    assert name == "english" and len(M.english_spelling_table()) > 1000
    assert M.wer(["The neighbours' colour is grey."], ["the neighbors color is gray"], norm) == 0.0
    assert M.wer(["The neighbours' colour is grey."], ["the neighbors colour is great"], norm) == pytest.approx(1 / 5)


def test_wer_skips_empty_references():
    assert M.wer(["", "one two"], ["noise", "one too"], identity) == pytest.approx(1 / 2)
    assert M.wer(["  "], ["anything"], identity) is None
    with pytest.raises(ValueError):
        M.wer(["a"], [], identity)


def test_eval_asr_reuses_the_moved_functions():
    from affjax.eval import whisper as eval_asr

    assert eval_asr.corpus_wer is M.corpus_wer
    assert eval_asr.make_normalizer is M.make_normalizer


# ----------------------------------------------------------------------------------------------
# CER (Chinese)


def test_normalize_zh_strips_punctuation_spaces_and_widths():
    assert M.normalize_zh("Ｈｅｌｌｏ，世界！ ok 「好」") == "hello世界ok好"


def test_cer_with_chinese_punctuation():
    # reference "你好世界" (4 characters once ，！ are gone); hypothesis has one wrong character
    assert M.cer(["你好，世界！"], ["你好世节"]) == pytest.approx(1 / 4)
    # punctuation and spaces alone are not errors
    assert M.cer(["今天 天气 很好。"], ["今天天气很好"]) == 0.0


def test_cer_corpus_level():
    refs = ["我爱北京", "天安门"]  # 7 characters
    hyps = ["我北京", "天安门上"]  # 1 deletion + 1 insertion
    assert M.cer(refs, hyps) == pytest.approx(2 / 7)
    assert M.cer(["，。"], ["x"]) is None


# ----------------------------------------------------------------------------------------------
# BLEU


ZH_REFS = ["我们今天下午去公园散步。", "这本书非常有意思，我很喜欢。", "他明天要坐火车去上海。"]
ZH_HYPS = ["我们今天下午去公园走路。", "这本书很有意思，我非常喜欢。", "他明天坐火车去上海。"]
EN_REFS = ["the weather is very nice today", "he will take the train to shanghai tomorrow"]
EN_HYPS = ["the weather is nice today", "tomorrow he will take a train to shanghai"]


def test_bleu_matches_sacrebleu_with_the_right_tokenizer():
    import sacrebleu

    zh = M.bleu(ZH_REFS, ZH_HYPS, "zh")
    assert zh == pytest.approx(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score)
    assert M.bleu(ZH_REFS, ZH_HYPS, "zh-CN") == zh  # CoVoST's code
    en = M.bleu(EN_REFS, EN_HYPS, "en")
    assert en == pytest.approx(sacrebleu.corpus_bleu(EN_HYPS, [EN_REFS], tokenize="13a").score)
    assert 0 < zh < 100 and 0 < en < 100


def test_bleu_zh_tokenizer_differs_from_13a_on_chinese():
    import sacrebleu

    zh = M.bleu(ZH_REFS, ZH_HYPS, "zh")
    with_13a = sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="13a").score
    assert abs(zh - with_13a) > 1.0
    assert M.bleu(ZH_REFS, ZH_HYPS, "en") == pytest.approx(with_13a)  # non-Chinese target: 13a


def test_st_metrics_per_target_language_when_mixed():
    rows = [{"reference": r, "text": h, "target_lang": "zh"} for r, h in zip(ZH_REFS, ZH_HYPS)]
    rows += [{"reference": r, "text": h, "target_lang": "en"} for r, h in zip(EN_REFS, EN_HYPS)]
    rows.append({"reference": "x", "text": "y", "target_lang": "en", "error": "AudioError: gone"})
    m = M.task_metrics("st", rows)
    assert m["bleu_zh"] == pytest.approx(M.bleu(ZH_REFS, ZH_HYPS, "zh"), abs=1e-4)
    assert m["bleu_en"] == pytest.approx(M.bleu(EN_REFS, EN_HYPS, "en"), abs=1e-4)
    assert m["num_scored"] == 5 and "bleu" not in m
    one = M.task_metrics("st", rows[:3])
    assert one["bleu"] == pytest.approx(M.bleu(ZH_REFS, ZH_HYPS, "zh"), abs=1e-4) and one["tokenize"] == "zh"
    assert M.primary("st", one) == ("bleu", one["bleu"])
    assert M.primary("st", m) == ("bleu_en", m["bleu_en"])


# ----------------------------------------------------------------------------------------------
# QA


def test_exact_match_squad_normalisation():
    assert M.exact_match("The Eiffel Tower!", "eiffel tower")
    assert M.exact_match("  an   Apple. ", ["apple pie", "apple"])
    assert not M.exact_match("Paris, France", "Paris")
    assert M.contains_answer("It is Paris, France.", "paris")
    assert not M.contains_answer("Parisian food", "paris")
    assert M.normalize_answer("A  Tale of Two Cities?") == "tale of two cities"


def test_mc_accuracy_is_argmax_of_choice_logprobs():
    rows = [
        {"choices": ["red", "green", "blue"], "answer": 1, "choice_logprobs": [-1.0, -0.5, -3.0]},   # right
        {"choices": ["yes", "no"], "answer": "no", "choice_logprobs": [-0.1, -2.0]},                 # wrong
        {"choices": ["a", "b", "c", "d"], "answer": "C", "choice_logprobs": [-9, -9, -1, -2]},       # right
        {"choices": ["x", "y"], "answer": 0, "choice_logprobs": [-5, -1], "error": "engine failed"},  # skipped
    ]
    m = M.task_metrics("qa", rows)
    assert m["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert (m["mc"], m["open"], m["num_scored"]) == (3, 0, 3)
    assert M.primary("qa", m) == ("accuracy", m["accuracy"])


def test_mc_prediction_ties_nan_and_fallbacks():
    assert M.mc_prediction({"choices": ["a", "b"], "choice_logprobs": [-1.0, -1.0]}) == 0
    assert M.mc_prediction({"choices": ["a", "b"], "choice_logprobs": [float("nan"), -3.0]}) == 1
    assert M.mc_prediction({"choices": ["a", "b"], "pred": 1}) == 1
    assert M.mc_prediction({"choices": ["cat", "dog"], "text": "B"}) == 1
    assert M.mc_prediction({"choices": ["cat", "dog"], "text": "Dog."}) == 1


def test_qa_mixed_mc_and_open():
    rows = [
        {"choices": ["a", "b"], "answer": 0, "choice_logprobs": [-1, -2]},        # right
        {"answer": ["The Beatles", "Beatles"], "text": "the beatles"},           # right
        {"answer": "Mount Everest", "text": "It is Mount Everest."},             # EM wrong, contains right
        {"answer": "", "text": "x"},                                             # no answer: unscored
    ]
    m = M.task_metrics("qa", rows)
    assert m["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert (m["mc"], m["open"]) == (1, 2)
    assert m["accuracy_open"] == pytest.approx(1 / 2) and m["contains_open"] == 1.0
    assert m["unscored"] == 1


# ----------------------------------------------------------------------------------------------
# ASR task metrics, prompts


def test_asr_task_metrics_en_zh_and_mixed():
    en = [{"reference": "the cat sat on the mat", "text": "the cat sat on a mat"}]  # language defaults to en
    zh = [{"reference": "你好，世界！", "text": "你好世节", "language": "zh"}]
    m_en = M.task_metrics("asr", en + [{"error": "bad audio"}])
    assert m_en["wer"] == pytest.approx(1 / 6, abs=1e-6) and m_en["num_scored"] == 1 and "cer" not in m_en
    m_zh = M.task_metrics("asr", zh)
    assert m_zh["cer"] == pytest.approx(1 / 4, abs=1e-6) and "wer" not in m_zh
    assert M.primary("asr", m_zh) == ("cer", m_zh["cer"])
    mixed = M.task_metrics("asr", en + zh)
    assert mixed["wer_en"] == pytest.approx(1 / 6, abs=1e-6) and mixed["cer_zh"] == pytest.approx(1 / 4, abs=1e-6)
    assert mixed["num_scored_en"] == 1 and mixed["num_scored_zh"] == 1 and mixed["num_scored"] == 2
    assert M.primary("asr", mixed)[0] == "wer"
    assert M.task_metrics("asr", [])["wer"] is None


def test_default_prompts():
    asr = M.default_prompt("asr")
    assert asr == "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
    assert M.default_prompt("asr", language="zh").endswith("<|zh|>")
    st = M.default_prompt("st", source_lang="en", target_lang="zh-CN")
    assert st.startswith(M.AUDIO_PROMPT) and "into Chinese" in st and st.endswith("<|en|>")
    assert "into English" in M.default_prompt("st", source_lang="zh-CN", target_lang="en")
    qa = M.default_prompt("qa")
    assert qa.count("<|AUDIO|>") == 1 and qa.startswith(M.AUDIO_PROMPT)
    with pytest.raises(ValueError):
        M.default_prompt("st")
    with pytest.raises(ValueError):
        M.default_prompt("caption")
    with pytest.raises(ValueError):
        M.task_metrics("caption", [])
    assert not math.isnan(M.task_metrics("qa", [{"choices": ["a", "b"], "answer": 1, "pred": 1}])["accuracy"])
