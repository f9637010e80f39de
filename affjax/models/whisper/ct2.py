"""Whisper weights in CTranslate2 format: read `model.bin`, map it onto Hugging Face keys, and write
an offline `WhisperProcessor` + generation config for the folder.

The binary layout (CTranslate2 binary version 6, all integers little-endian)::

    u32 version | str spec_name | u32 revision | u32 n_vars
    n_vars x { str name | u8 rank | u32 dims[rank] | u8 dtype | u32 nbytes | nbytes of C-order data }
    u32 n_aliases x { str alias | str target }
    str = u16 length (including the trailing NUL) + utf-8 bytes + NUL

Nothing here needs torch: the result is a plain `{hf_key: np.ndarray}` state dict that both the
JAX loader (`affjax.models.weights.load_streaming`) and `transformers` (`torch.from_numpy`) accept.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np
from tokenizers import AddedToken

__all__ = ["CT2Error", "read_ct2", "ct2_to_hf_state_dict", "ct2_hf_config", "ct2_processor",
           "ct2_special_ids", "is_multilingual", "CT2_DTYPES"]

# CTranslate2 ActivationType -> HF activation_function
_CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
SUPPORTED_VERSIONS = (6,)


class CT2Error(ValueError):
    """A CTranslate2 file or folder is malformed or not a Whisper model."""


class _Reader:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CT2Error(f"{self.path}: truncated at byte {self.pos} (wanted {n} more of {len(self.buf)})")
        out = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def str(self) -> str:
        n = self.u16()
        raw = bytes(self.take(n))
        if n == 0 or raw[-1] != 0:
            raise CT2Error(f"{self.path}: bad string at byte {self.pos - n}")
        return raw[:-1].decode("utf-8")


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_ct2(model_bin: str | os.PathLike, *, with_meta: bool = False):
    """Parse a CTranslate2 v6 `model.bin` into `{name: np.ndarray}` with aliases resolved.

    Arrays keep their stored dtype (float16 stays float16; bfloat16 is widened to float32 since
    numpy has no bfloat16). Arrays are copies, so the file is closed on return. With
    `with_meta=True` returns `(vars, {"version", "spec", "revision", "aliases"})`.
    """
    path = Path(model_bin)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _Reader(mm, path)
        version = r.u32()
        if version not in SUPPORTED_VERSIONS:
            raise CT2Error(f"{path}: CTranslate2 binary version {version}, supported: {SUPPORTED_VERSIONS}")
        spec, revision, n_vars = r.str(), r.u32(), r.u32()
        out: dict[str, np.ndarray] = {}
        for _ in range(n_vars):
            name = r.str()
            rank = r.u8()
            dims = tuple(r.u32() for _ in range(rank))
            code = r.u8()
            nbytes = r.u32()
            if code not in CT2_DTYPES:
                raise CT2Error(f"{path}: variable {name!r} has unknown dtype code {code}")
            dt = np.dtype(np.uint16) if code == 5 else np.dtype(CT2_DTYPES[code])
            count = int(np.prod(dims, dtype=np.int64)) if dims else 1
            if count * dt.itemsize != nbytes:
                raise CT2Error(f"{path}: variable {name!r} dims {dims} x {dt} != {nbytes} bytes")
            arr = np.frombuffer(r.take(nbytes), dtype=dt).reshape(dims).copy()
            out[name] = _bf16_to_f32(arr) if code == 5 else arr
        aliases = {}
        if r.pos < len(mm):
            for _ in range(r.u32()):
                alias, target = r.str(), r.str()
                aliases[alias] = target
    for alias, target in aliases.items():
        seen = {alias}
        while target in aliases and target not in out:  # chains of aliases
            if target in seen:
                raise CT2Error(f"{path}: alias cycle at {alias!r}")
            seen.add(target)
            target = aliases[target]
        if target not in out:
            raise CT2Error(f"{path}: alias {alias!r} -> {target!r} names no variable")
        out[alias] = out[target]
    if with_meta:
        return out, {"version": version, "spec": spec, "revision": revision, "aliases": aliases}
    return out


# ----------------------------------------------------------------------------------------------
# CT2 names -> HF WhisperForConditionalGeneration keys


def _layer_count(ct2_vars: dict, part: str) -> int:
    idx = {int(m.group(1)) for k in ct2_vars if (m := re.match(rf"^{part}/layer_(\d+)/", k))}
    if idx != set(range(len(idx))):
        raise CT2Error(f"{part} layers are not numbered 0..n-1: {sorted(idx)}")
    return len(idx)


def _split(w: np.ndarray, parts: int, name: str) -> list[np.ndarray]:
    if w.shape[0] % parts:
        raise CT2Error(f"{name}: first axis {w.shape[0]} does not split in {parts}")
    return np.split(w, parts, axis=0)


def ct2_to_hf_state_dict(ct2_vars: dict[str, np.ndarray], config: dict | None = None, *,
                         dtype=None, check_zero_k_bias: bool = True) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper variables -> HF `WhisperForConditionalGeneration` state dict (numpy).

    Fused q,k,v (self-attention) and k,v (cross-attention) projections are split; their k bias
    parts are zero in Whisper and HF has no k bias, so they are dropped (and checked to be zero
    when `check_zero_k_bias`). `proj_out.weight` (tied to the token embedding) is included, as
    in the HF state dict. `config` (an HF config dict) is only used to check layer counts.
    `dtype` casts every floating array (None keeps float16).
    """
    v = ct2_vars
    sd: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def get(name):
        if name not in v:
            raise CT2Error(f"CTranslate2 variable {name!r} is missing")
        used.add(name)
        return v[name]

    def put(key, arr):
        sd[key] = arr

    def lin(ct2, hf, bias=True):
        put(f"{hf}.weight", get(f"{ct2}/weight"))
        if bias:
            put(f"{hf}.bias", get(f"{ct2}/bias"))

    def norm(ct2, hf):
        put(f"{hf}.weight", get(f"{ct2}/gamma"))
        put(f"{hf}.bias", get(f"{ct2}/beta"))

    def fused(ct2, hf_prefix, names):
        w = _split(get(f"{ct2}/weight"), len(names), ct2)
        b = _split(get(f"{ct2}/bias"), len(names), ct2)
        for n, wi, bi in zip(names, w, b):
            put(f"{hf_prefix}.{n}_proj.weight", wi)
            if n == "k":
                if check_zero_k_bias and np.any(bi != 0):
                    raise CT2Error(f"{ct2}/bias: k part is not zero; HF Whisper has no k bias")
            else:
                put(f"{hf_prefix}.{n}_proj.bias", bi)

    def ffn(ct2, hf):
        lin(f"{ct2}/linear_0", f"{hf}.fc1")
        lin(f"{ct2}/linear_1", f"{hf}.fc2")
        norm(f"{ct2}/layer_norm", f"{hf}.final_layer_norm")

    n_enc, n_dec = _layer_count(v, "encoder"), _layer_count(v, "decoder")
    if config is not None:
        if (config.get("encoder_layers"), config.get("decoder_layers")) != (n_enc, n_dec):
            raise CT2Error(f"config has {config.get('encoder_layers')}+{config.get('decoder_layers')} layers, "
                           f"file has {n_enc}+{n_dec}")

    e = "model.encoder"
    lin("encoder/conv1", f"{e}.conv1")
    lin("encoder/conv2", f"{e}.conv2")
    put(f"{e}.embed_positions.weight", get("encoder/position_encodings/encodings"))
    for i in range(n_enc):
        c, h = f"encoder/layer_{i}", f"{e}.layers.{i}"
        fused(f"{c}/self_attention/linear_0", f"{h}.self_attn", ("q", "k", "v"))
        lin(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj")
        norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
        ffn(f"{c}/ffn", h)
    norm("encoder/layer_norm", f"{e}.layer_norm")

    d = "model.decoder"
    put(f"{d}.embed_tokens.weight", get("decoder/embeddings/weight"))
    put(f"{d}.embed_positions.weight", get("decoder/position_encodings/encodings"))
    for i in range(n_dec):
        c, h = f"decoder/layer_{i}", f"{d}.layers.{i}"
        fused(f"{c}/self_attention/linear_0", f"{h}.self_attn", ("q", "k", "v"))
        lin(f"{c}/self_attention/linear_1", f"{h}.self_attn.out_proj")
        norm(f"{c}/self_attention/layer_norm", f"{h}.self_attn_layer_norm")
        lin(f"{c}/attention/linear_0", f"{h}.encoder_attn.q_proj")
        fused(f"{c}/attention/linear_1", f"{h}.encoder_attn", ("k", "v"))
        lin(f"{c}/attention/linear_2", f"{h}.encoder_attn.out_proj")
        norm(f"{c}/attention/layer_norm", f"{h}.encoder_attn_layer_norm")
        ffn(f"{c}/ffn", h)
    norm("decoder/layer_norm", f"{d}.layer_norm")
    put("proj_out.weight", sd[f"{d}.embed_tokens.weight"])

    # Anything left must be a known non-parameter (scalars, the tied-projection alias).
    left = [k for k in v if k not in used and not _ignorable(k, v)]
    if left:
        raise CT2Error(f"{len(left)} CTranslate2 variables have no HF place: {', '.join(sorted(left))}")
    if dtype is not None:
        sd = {k: a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a for k, a in sd.items()}
    return sd


def _ignorable(name: str, v: dict) -> bool:
    """Scalars (flags such as `decoder/scale_embeddings`, `encoder/num_heads`) and the output
    projection, which is an alias of the tied token embedding."""
    a = v[name]
    if a.ndim == 0:
        return True
    if name == "decoder/projection/weight":
        emb = v["decoder/embeddings/weight"]
        return a is emb or (a.shape == emb.shape and np.array_equal(a, emb))
    return False


# ----------------------------------------------------------------------------------------------
# Config, special tokens, processor


def _tokenizer_added(ct2_dir: Path) -> dict[str, int]:
    tok = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    return {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}


def ct2_special_ids(ct2_dir: str | os.PathLike) -> dict:
    """Special token ids of a CT2 Whisper folder, read from its tokenizer.json (never hard-coded)."""
    ct2_dir = Path(ct2_dir)
    added = _tokenizer_added(ct2_dir)
    need = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|transcribe|>", "<|translate|>")
    missing = [t for t in need if t not in added]
    if missing:
        raise CT2Error(f"{ct2_dir / 'tokenizer.json'} lacks special tokens {missing}")
    cfg = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    lang_ids = [int(i) for i in cfg.get("lang_ids", [])]
    id_to_tok = {i: t for t, i in added.items()}
    langs = {id_to_tok[i][2:-2]: i for i in lang_ids if i in id_to_tok}
    return {
        "eos": added["<|endoftext|>"],
        "sot": added["<|startoftranscript|>"],
        "no_timestamps": added["<|notimestamps|>"],
        "transcribe": added["<|transcribe|>"],
        "translate": added["<|translate|>"],
        "prev": added.get("<|startofprev|>"),
        "no_speech": added.get("<|nospeech|>", added.get("<|nocaptions|>")),
        "lang_to_id": langs,
        "suppress_tokens": [int(i) for i in cfg.get("suppress_ids", [])],
        "begin_suppress_tokens": [int(i) for i in cfg.get("suppress_ids_begin", [])],
        "alignment_heads": cfg.get("alignment_heads"),
    }


def ct2_hf_config(ct2_dir: str | os.PathLike, ct2_vars: dict | None = None) -> dict:
    """An HF `WhisperConfig` dict for a CT2 Whisper folder; sizes from the weights, ids from the
    tokenizer. `ct2_vars` (from `read_ct2`) avoids reading the file again."""
    ct2_dir = Path(ct2_dir)
    v = ct2_vars if ct2_vars is not None else read_ct2(ct2_dir / "model.bin")
    ids = ct2_special_ids(ct2_dir)
    vocab, d_model = v["decoder/embeddings/weight"].shape
    n_mels = v["encoder/conv1/weight"].shape[1]
    enc_ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    dec_ffn = v["decoder/layer_0/ffn/linear_0/weight"].shape[0]
    heads = {}
    for part in ("encoder", "decoder"):
        key = f"{part}/num_heads"
        if key in v:
            heads[part] = int(np.asarray(v[key]).reshape(-1)[0])
        elif "num_heads" in v:
            heads[part] = int(np.asarray(v["num_heads"]).reshape(-1)[0])
        else:  # Whisper's head size is always 64
            heads[part] = d_model // 64
    act_code = int(v["decoder/activation"]) if "decoder/activation" in v else 3
    if act_code not in _CT2_ACTIVATIONS:
        raise CT2Error(f"unknown CTranslate2 activation code {act_code}")
    return {
        "model_type": "whisper",
        "vocab_size": int(vocab),
        "num_mel_bins": int(n_mels),
        "d_model": int(d_model),
        "encoder_layers": _layer_count(v, "encoder"),
        "decoder_layers": _layer_count(v, "decoder"),
        "encoder_attention_heads": heads["encoder"],
        "decoder_attention_heads": heads["decoder"],
        "encoder_ffn_dim": int(enc_ffn),
        "decoder_ffn_dim": int(dec_ffn),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": _CT2_ACTIVATIONS[act_code],
        "scale_embedding": bool(int(v.get("decoder/scale_embeddings", np.int8(0)))),
        "tie_word_embeddings": True,
        "pad_token_id": ids["eos"],
        "bos_token_id": ids["eos"],
        "eos_token_id": ids["eos"],
        "decoder_start_token_id": ids["sot"],
        # what CTranslate2's converter copied from the checkpoint's generation config: greedy
        # decoding never emits these (transformers' generate suppresses the same ids)
        "begin_suppress_tokens": ids["begin_suppress_tokens"],
        "suppress_tokens": ids["suppress_tokens"],
    }


def is_multilingual(hf_config: dict) -> bool:
    """Transformers' rule: multilingual Whisper vocabularies have 51865+ tokens (English-only: 51864)
    and their prompt carries a language and a task token."""
    return hf_config["vocab_size"] >= 51865


def _timestamp_tokens(first_id: int, vocab: int) -> list[str]:
    return [f"<|{i * 0.02:.2f}|>" for i in range(vocab - first_id)]


def ct2_processor(ct2_dir: str | os.PathLike, dst: str | os.PathLike, *, language: str = "en",
                  task: str = "transcribe", hf_config: dict | None = None):
    """Write a `WhisperProcessor` (+ `generation_config.json`) for a CT2 folder to `dst`; returns it.

    The tokenizer is `WhisperTokenizerFast` over the folder's tokenizer.json with Whisper's special
    tokens registered (so `<|notimestamps|>` is the last special id, as transformers' timestamp
    code expects). CT2's tokenizer.json stops at `<|notimestamps|>`; the timestamp tokens
    `<|0.00|>` .. `<|30.00|>` are added after it (not special, as on the hub) so that the tokenizer
    covers the model's whole vocabulary. `generation_config.json` asks for greedy decoding without
    timestamps; for multilingual models it forces `<|{language}|><|{task}|>`. `hf_config` (from
    `ct2_hf_config`) avoids reading model.bin again.
    """
    # deferred: transformers is heavy (only the processor needs it)
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    ct2_dir, dst = Path(ct2_dir), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    ids = ct2_special_ids(ct2_dir)
    cfg = hf_config if hf_config is not None else ct2_hf_config(ct2_dir)
    vocab, multilingual = cfg["vocab_size"], is_multilingual(cfg)

    tok = WhisperTokenizerFast(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", add_prefix_space=False,
        language=language if multilingual else None, task=task if multilingual else None,
        predict_timestamps=False,
    )
    added = sorted(_tokenizer_added(ct2_dir).items(), key=lambda kv: kv[1])
    tok.add_special_tokens({"extra_special_tokens": [t for t, _ in added if t != "<|endoftext|>"]},
                           replace_extra_special_tokens=False)
    first_ts = ids["no_timestamps"] + 1
    if len(tok) == first_ts and vocab > first_ts:
        tok.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False)
                        for t in _timestamp_tokens(first_ts, vocab)])
    if len(tok) != vocab or tok.all_special_ids[-1] != ids["no_timestamps"]:
        raise CT2Error(f"tokenizer built from {ct2_dir} has {len(tok)} tokens (last special id "
                       f"{tok.all_special_ids[-1]}); the model has {vocab}, <|notimestamps|> is {ids['no_timestamps']}")

    fe = WhisperFeatureExtractor(feature_size=cfg["num_mel_bins"], sampling_rate=16000, hop_length=160,
                                 chunk_length=30, n_fft=400, padding_value=0.0, return_attention_mask=False)
    proc = WhisperProcessor(feature_extractor=fe, tokenizer=tok)
    proc.save_pretrained(str(dst))

    gen = GenerationConfig(
        decoder_start_token_id=ids["sot"], bos_token_id=ids["eos"], eos_token_id=ids["eos"],
        pad_token_id=ids["eos"], no_timestamps_token_id=ids["no_timestamps"],
        do_sample=False, num_beams=1, max_length=cfg["max_target_positions"], is_multilingual=multilingual,
        return_timestamps=False,
    )
    if multilingual:
        gen.lang_to_id = {f"<|{k}|>": i for k, i in ids["lang_to_id"].items()}
        gen.task_to_id = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
        gen.language = language
        gen.task = task
    if ids.get("prev") is not None:
        gen.prev_sot_token_id = ids["prev"]
    if ids["alignment_heads"]:
        gen.alignment_heads = ids["alignment_heads"]
    gen.save_pretrained(str(dst))
    return proc
