"""The host side of the speech-LM jobs (affjax.eval.lslm), one class per model family: how an item's
prompt, audio and texts become an encoded item and a padded batch, and how generated tokens
become text. The engine (affjax.runtime.engine) and the job code are the same for both.

- Qwen2-Audio: the Hugging Face processor; the prompt holds one audio block per clip.
- Kimi-Audio: the prompt is the instruction text, and the clip follows it as the audio message
  (affjax.models.kimi_audio.inputs: the two streams as the official prompt manager builds them);
  the clip's speech codes come from the GLM-4-Voice tokenizer converted into the checkpoint, its
  continuous features from the Whisper feature extractor of the model's own audio encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from affjax.eval import metrics
from affjax.models.checkpoint import CONFIG_NAME, SPEECH_TOKENIZER_DIR, load_speech_tokenizer
from affjax.models.kimi_audio import inputs as kimi_inputs
from affjax.models.kimi_audio.params import WHISPER_DIR
from affjax.models.kimi_audio.speech_tokenizer import tokenize as speech_codes
from affjax.models.kimi_audio.tokenizer import KIMI_TOKENS, encode_text, load_tokenizer
from affjax.models.qwen2_audio import inputs as qwen_inputs
from affjax.runtime import sharding


def generation_eos(ckpt: str | Path) -> list[int]:
    """The end-of-sequence ids of a checkpoint's generation_config.json (none without one)."""
    from transformers import GenerationConfig  # deferred: transformers is heavy

    try:
        eos = GenerationConfig.from_pretrained(str(ckpt)).eos_token_id
    except OSError:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def load_for_inference(ckpt: str, dtype: str | None = None, mesh=None):
    """(model, cfg, processor, eos_ids, pad_id) of a converted Qwen2-Audio checkpoint; with a `mesh`
    every parameter is restored directly onto its shards (affjax.runtime.sharding)."""
    from transformers import AutoProcessor  # deferred: transformers is heavy

    model, cfg, _ = sharding.load(ckpt, mesh, dtype=dtype)
    processor = AutoProcessor.from_pretrained(ckpt)
    tok = processor.tokenizer
    eos = generation_eos(ckpt) or [tok.eos_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return model, cfg, processor, [int(e) for e in eos if e is not None], int(pad)


def load(ckpt: str | Path, dtype: str | None = None, mesh=None):
    """(model, cfg, frontend) of a converted Qwen2-Audio or Kimi-Audio checkpoint."""
    meta = json.loads((Path(ckpt) / CONFIG_NAME).read_text())
    return FRONTENDS[meta["model_type"]].load(Path(ckpt), meta, dtype, mesh)


class Qwen2AudioFrontend:
    """Qwen2-Audio: the Hugging Face processor of the checkpoint."""

    multi_process = True  # several processes can share a job (the engine pads their batches alike)

    def __init__(self, processor, cfg, eos_ids: list[int], pad_id: int):
        self.processor, self.cfg = processor, cfg
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.sampling_rate = processor.feature_extractor.sampling_rate

    @classmethod
    def load(cls, ckpt: Path, meta: dict, dtype, mesh):
        model, cfg, processor, eos, pad = load_for_inference(str(ckpt), dtype, mesh)
        return model, cfg, cls(processor, cfg, eos, pad)

    def tokens(self, text: str) -> np.ndarray:
        return np.asarray(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)

    def default_prompt(self, task: str, item: dict) -> str:
        return metrics.default_prompt(task, language=item.get("language") or "en",
                                      source_lang=item.get("source_lang"), target_lang=item.get("target_lang"))

    @staticmethod
    def choice_text(prompt: str, choice: str) -> str:
        # a choice continues the prompt's text: one space between them unless either side has it
        # (as lm-evaluation-harness does), so "...is:" + "B" is scored as "...is: B"
        return choice if choice[:1].isspace() or prompt[-1:].isspace() else " " + choice

    def encode(self, prompt: str, waves: list[np.ndarray]) -> tuple[qwen_inputs.Encoded, int]:
        """(encoded prompt, number of 30 s windows). Raises ValueError naming the cause."""
        sr = self.sampling_rate
        prompt, clips = qwen_inputs.window_prompt(self.processor, prompt, waves, sr)
        try:
            enc = qwen_inputs.encode(self.processor, prompt, clips, None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"processor rejected the item: {e}") from None
        qwen_inputs.check_clips(enc, self.cfg.audio_token_id, self.cfg.audio.output_lengths, sr)
        return enc, len(clips)

    def collate(self, encs: list, batch_size: int) -> qwen_inputs.Batch:
        return qwen_inputs.collate(encs, batch_size=batch_size, audio_token_id=self.cfg.audio_token_id,
                                   out_frames_of=self.cfg.audio.output_lengths, pad_id=self.pad_id)

    def empty_batch(self, batch_size: int, score: bool) -> qwen_inputs.Batch:
        fe = self.processor.feature_extractor
        return sharding.empty_batch(batch_size, n_mels=fe.feature_size, frames=fe.nb_max_frames, score=score,
                                    pad_id=self.pad_id)

    def text(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class KimiAudioFrontend:
    """Kimi-Audio: the text tokenizer, the Whisper feature extractor of the audio encoder and the
    GLM-4-Voice speech tokenizer, all from the converted checkpoint. The speech tokenizer runs in
    float32 whatever the job's dtype (its codes are a nearest-neighbour choice), one 30 s piece at
    a time."""

    multi_process = False  # the engine's multi-host batch padding knows Qwen2-Audio's audio slots only

    def __init__(self, ckpt: Path, cfg, hf_config: dict):
        from transformers import WhisperFeatureExtractor  # deferred: transformers is heavy

        self.cfg = cfg
        stamp = (ckpt / "tokenizer.json").stat()
        self.tokenizer = _kimi_tokenizer(str(ckpt.resolve()), (stamp.st_size, stamp.st_mtime_ns))
        self.fe = WhisperFeatureExtractor.from_pretrained(str(ckpt / WHISPER_DIR))
        self.speech, _ = load_speech_tokenizer(ckpt, dtype=jnp.float32)
        self.speech_fe = WhisperFeatureExtractor.from_pretrained(str(ckpt / SPEECH_TOKENIZER_DIR))
        self.sampling_rate = self.fe.sampling_rate
        # the text answer ends at <|im_kimia_text_eos|>; the checkpoint's own EOS ids stop it too
        eos = hf_config.get("eos_token_id")
        eos = [KIMI_TOKENS.text_eos] + generation_eos(ckpt) + (eos if isinstance(eos, list) else [eos])
        self.eos_ids = list(dict.fromkeys(int(e) for e in eos if e is not None))
        self.pad_id = KIMI_TOKENS.text_blank

    @classmethod
    def load(cls, ckpt: Path, meta: dict, dtype, mesh):
        if not meta.get("speech_tokenizer"):  # found before the model is read (minutes for 7B)
            raise ValueError(f"{ckpt}: no speech tokenizer (convert the checkpoint with --speech-tokenizer "
                             "GLM4_TOKENIZER_DIR: Kimi-Audio's audio stream is its speech codes)")
        model, cfg, _ = sharding.load(ckpt, mesh, dtype=dtype)
        return model, cfg, cls(ckpt, cfg, meta["hf_config"])

    def tokens(self, text: str) -> np.ndarray:
        return np.asarray(encode_text(self.tokenizer, text), np.int32)

    @staticmethod
    def default_prompt(task: str, item: dict) -> str:
        return metrics.kimi_default_instruction(task, target_lang=item.get("target_lang"))

    @staticmethod
    def choice_text(prompt: str, choice: str) -> str:
        return choice  # the assistant's text: its own turn, not a continuation of the instruction

    def encode(self, prompt: str, waves: list[np.ndarray]) -> tuple[kimi_inputs.Encoded, int]:
        """(encoded prompt, number of 30 s windows). Raises ValueError naming the cause. The speech
        codes are left pending (their count is known from the clip's length): `fill_codes` runs the
        speech tokenizer over many items at once."""
        if len(waves) != 1:
            raise ValueError(f"a Kimi-Audio item takes one audio clip, this one has {len(waves)}")
        wave = np.asarray(waves[0], np.float32)
        todo = np.zeros(kimi_inputs.code_count(wave, self.sampling_rate), np.int32)
        enc = kimi_inputs.encode(self.tokenizer, self.fe, prompt, wave, todo)
        return dataclasses.replace(enc, pending=wave), len(enc.features)

    def fill_codes(self, encs: list) -> list:
        """Encoded items with their pending speech codes filled: one tokenizer run over all their
        clips (its batches of 30 s pieces)."""
        codes = speech_codes(self.speech, self.speech_fe, [e.pending for e in encs])
        return [kimi_inputs.with_codes(e, c) for e, c in zip(encs, codes)]

    def collate(self, encs: list, batch_size: int) -> kimi_inputs.Batch:
        return kimi_inputs.collate(encs, batch_size=batch_size, tokens_per_window=self.cfg.tokens_per_window)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


@functools.lru_cache(maxsize=2)
def _kimi_tokenizer(folder: str, stamp: tuple):
    """load_tokenizer once per tokenizer.json version (stamp: its size and mtime) in a process:
    reading Kimi-Audio's (19 MB) takes seconds, and the jobs of one process (tests, benchmarks)
    share it read-only."""
    return load_tokenizer(folder)


FRONTENDS = {"qwen2_audio": Qwen2AudioFrontend, "kimi_audio": KimiAudioFrontend}  # by model_type
