"""Tiny real-format checkpoints and deterministic inputs for tests.

Everything is built locally: the tokenizer is the real Qwen2 byte-level BPE
(:func:`affjax.data.assets.qwen2_tokenizer_json`) plus Qwen2-Audio's three audio special tokens, and the
checkpoint is a randomly initialised ``transformers.Qwen2AudioForConditionalGeneration`` written with
``save_pretrained`` (so the on-disk key layout is exactly what transformers writes).

Layout written by ``save_pretrained`` in transformers 5.24 (the original Qwen2-Audio hub layout;
transformers renames to ``model.*`` only in memory)::

    audio_tower.conv1.weight, audio_tower.embed_positions.weight,
    audio_tower.layers.{i}.self_attn.{q,k,v,out}_proj.*, audio_tower.layer_norm.*
    multi_modal_projector.linear.{weight,bias}
    language_model.model.embed_tokens.weight, language_model.model.layers.{i}.*,
    language_model.model.norm.weight, language_model.lm_head.weight

(:data:`SAVED_KEY_PREFIXES` lists them; a test checks this against a fresh save.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from affjax.data.assets import qwen2_tokenizer_json

__all__ = [
    "AUDIO_SPECIAL_TOKENS",
    "SAVED_KEY_PREFIXES",
    "build_qwen2_tokenizer",
    "make_tiny_qwen2_audio",
    "synth_speech_like",
    "long_prompt",
    "AUDIO_PLACEHOLDER",
]

# attribute name on the tokenizer -> token text (Qwen2AudioProcessor reads these attributes)
AUDIO_SPECIAL_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"

# Top-level prefixes of the safetensors keys that transformers 5.24 writes for Qwen2-Audio.
SAVED_KEY_PREFIXES = ("audio_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")

EOS_TOKEN = "<|endoftext|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


def build_qwen2_tokenizer(dst_dir: str | os.PathLike | None = None):
    """The real Qwen2 tokenizer with ``<|AUDIO|>``, ``<|audio_bos|>``, ``<|audio_eos|>`` added.

    The audio tokens are added as special tokens (never split, dropped by
    ``skip_special_tokens``) and exposed as ``tokenizer.audio_token`` / ``audio_bos_token`` /
    ``audio_eos_token`` so that ``Qwen2AudioProcessor`` finds them. Their ids follow the base
    vocabulary: read them with ``tokenizer.convert_tokens_to_ids``. eos and pad are
    ``<|endoftext|>``. Saved to ``dst_dir`` when given. Raises ``AssetMissing`` without the asset.
    """
    from transformers import PreTrainedTokenizerFast  # deferred: transformers is heavy

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(qwen2_tokenizer_json()),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(AUDIO_SPECIAL_TOKENS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    # Also list them as additional ("extra") special tokens, keeping the named attributes.
    tok.add_special_tokens({"extra_special_tokens": list(AUDIO_SPECIAL_TOKENS.values())},
                           replace_extra_special_tokens=False)
    for attr, text in AUDIO_SPECIAL_TOKENS.items():
        tid = tok.convert_tokens_to_ids(text)
        if tid is None or tid == tok.unk_token_id or tok.convert_ids_to_tokens(tid) != text:
            raise RuntimeError(f"tokenizer did not register {text!r}")
        if getattr(tok, attr, None) != text:
            setattr(tok, attr, text)
    if dst_dir is not None:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(dst_dir))
    return tok


def _randomize_(model, seed: int) -> None:
    """Re-initialise every parameter: normal(0, 0.02); norm weights 1 + 0.1 * normal.

    Biases (q/v/out projections, LayerNorm biases, projector) become non-zero, so a loader that
    drops one shows up in parity tests.
    """
    import torch  # deferred: torch is optional (the torch / test extras)

    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm,)
    norm_names = set()
    for mname, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, norm_types) or "RMSNorm" in cls or "LayerNorm" in cls:
            norm_names.add(mname)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mname, _, leaf = name.rpartition(".")
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if mname in norm_names and leaf == "weight":
                p.copy_((1.0 + 0.1 * noise).to(p.dtype))
            else:
                p.copy_((0.02 * noise).to(p.dtype))


def make_tiny_qwen2_audio(
    dst: str | os.PathLike,
    *,
    num_mel_bins: int = 80,
    audio_d: int = 64,
    audio_layers: int = 2,
    audio_heads: int = 4,
    audio_ffn: int | None = None,
    text_hidden: int = 64,
    text_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 4,
    intermediate: int = 128,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    max_source_positions: int = 1500,
    max_position_embeddings: int = 8192,
    seed: int = 0,
    dtype: str = "float32",
    sharded: bool = False,
) -> Path:
    """Write a tiny random Qwen2-Audio checkpoint + processor + generation config to ``dst``.

    ``dst`` then loads with ``Qwen2AudioProcessor.from_pretrained`` and
    ``Qwen2AudioForConditionalGeneration.from_pretrained``. ``vocab_size`` is ``len(tokenizer)``
    (the real Qwen2 vocabulary plus the audio tokens) and ``audio_token_index`` the tokenizer's
    ``<|AUDIO|>`` id. ``sharded=True`` writes several ``model-*.safetensors`` and an index.
    """
    # deferred: torch is optional, transformers heavy
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(dtype))
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)

    tok = build_qwen2_tokenizer(None)
    audio_id = tok.convert_tokens_to_ids(AUDIO_SPECIAL_TOKENS["audio_token"])
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tok.convert_tokens_to_ids(IM_END_TOKEN)
    pad_id = tok.pad_token_id

    audio_cfg = Qwen2AudioEncoderConfig(
        num_mel_bins=num_mel_bins,
        d_model=audio_d,
        encoder_layers=audio_layers,
        encoder_attention_heads=audio_heads,
        encoder_ffn_dim=audio_ffn if audio_ffn is not None else 4 * audio_d,
        max_source_positions=max_source_positions,
    )
    text_cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        rope_theta=rope_theta,
        rms_norm_eps=rms_norm_eps,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    config = Qwen2AudioConfig(audio_config=audio_cfg, text_config=text_cfg, audio_token_index=audio_id,
                              tie_word_embeddings=tie_word_embeddings)

    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    _randomize_(model, seed)
    if tie_word_embeddings:
        # transformers 5.24's Qwen2AudioForConditionalGeneration declares no tied weights, so it
        # never shares lm_head with embed_tokens (both keys are saved and loaded separately).
        # Give them equal values so "tied" and "untied" readings of the checkpoint agree.
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.language_model.embed_tokens.weight)
    model = model.to(torch_dtype).eval()
    model.config.dtype = torch_dtype
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id,
        eos_token_id=[eos_id, im_end_id],
        pad_token_id=pad_id,
        do_sample=False,
        max_new_tokens=32,
    )
    save_kw = {"max_shard_size": "10MB"} if sharded else {"max_shard_size": "100GB"}
    model.save_pretrained(str(dst), safe_serialization=True, **save_kw)

    fe = WhisperFeatureExtractor(
        feature_size=num_mel_bins,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok)
    processor.save_pretrained(str(dst))
    return dst


# ----------------------------------------------------------------------------------------------
# Deterministic inputs


def synth_speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A float32 waveform with speech-like structure (peak 0.5).

    Voiced "syllables" (a gliding fundamental with three formant-ish harmonics, ~4 per second, with
    smooth envelopes), separated by short pauses and noise bursts (fricative-like), over a faint
    noise floor. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    if n <= 0:
        return np.zeros(0, np.float32)
    x = 0.003 * rng.standard_normal(n)
    pos = 0
    while pos < n:
        kind = rng.random()
        dur = int(sr * rng.uniform(0.12, 0.32))
        end = min(n, pos + dur)
        m = end - pos
        if m <= 0:
            break
        env = np.sin(np.pi * np.linspace(0.0, 1.0, m, endpoint=False)) ** 2
        if kind < 0.7:  # voiced syllable: gliding f0 and a few harmonics
            f0 = rng.uniform(90, 220) * (1 + 0.15 * np.linspace(-1, 1, m) * rng.choice([-1, 1]))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            seg = np.zeros(m)
            for h, a in zip(rng.choice(np.arange(1, 12), size=3, replace=False), rng.uniform(0.2, 1.0, 3)):
                seg += a * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
            x[pos:end] += 0.3 * env * seg
        elif kind < 0.85:  # fricative-like noise burst
            noise = rng.standard_normal(m)
            noise = np.diff(noise, prepend=0.0)  # high-pass tilt
            x[pos:end] += 0.15 * env * noise
        # else: pause
        pos = end + int(sr * rng.uniform(0.0, 0.08))
    peak = float(np.max(np.abs(x)))
    if peak > 0:
        x = 0.5 * x / peak
    return x.astype(np.float32)


_WORDS = (
    "the of and to in is was for that with on as by at from this are be or have it an which not one "
    "all were their there been has more other when would time who about into only some could these "
    "them first new may then two its like over such most after also any many those than well where "
    "good small large house water river city story light night world music voice sound speech word "
    "people morning evening garden window street market letter answer question number minute moment "
    "listen speak carefully quietly slowly clearly please describe explain summarize transcribe "
    "language english friend family teacher student doctor weather summer winter country mountain"
).split()


def long_prompt(n_words: int, seed: int = 0) -> str:
    """An English prompt of about ``n_words`` tokens holding ``<|audio_bos|><|AUDIO|><|audio_eos|>`` once.

    Common lowercase English words are one Qwen2 token each (with their leading space), so the
    token count is close to ``n_words`` plus a few for punctuation and the audio tokens.
    """
    if n_words < 1:
        raise ValueError("n_words must be >= 1")
    rng = np.random.default_rng(seed)
    words = [str(w) for w in rng.choice(_WORDS, size=n_words)]
    sentences, i = [], 0
    while i < len(words):
        k = int(rng.integers(6, 15))
        chunk = words[i:i + k]
        chunk[0] = chunk[0].capitalize()
        sentences.append(" ".join(chunk) + ".")
        i += k
    cut = max(1, len(sentences) // 3)
    head = " ".join(sentences[:cut])
    tail = " ".join(sentences[cut:])
    return f"{head} Audio 1: {AUDIO_PLACEHOLDER}\n{tail}".rstrip()
