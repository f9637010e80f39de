"""Llama-architecture GGUF files (llama.cpp) -> a Hugging Face Llama state dict and config.

This is what lets a real small checkpoint (SmolLM2-135M, shipped as a GGUF inside a pip package)
check the Qwen2 decoder: a Qwen2 decoder with zero q/k/v biases and Llama weights is that Llama
model. Tensors are dequantized to float32 one at a time.

llama.cpp names -> HF keys (`N` = layer):

    token_embd                  -> model.embed_tokens.weight
    blk.N.attn_q / attn_k       -> model.layers.N.self_attn.{q,k}_proj.weight   (rows un-permuted)
    blk.N.attn_v / attn_output  -> model.layers.N.self_attn.{v,o}_proj.weight
    blk.N.ffn_gate / up / down  -> model.layers.N.mlp.{gate,up,down}_proj.weight
    blk.N.attn_norm / ffn_norm  -> model.layers.N.{input,post_attention}_layernorm.weight
    output_norm                 -> model.norm.weight
    output (absent when tied)   -> lm_head.weight

(every name suffixed `.weight`). Any other tensor (e.g. llama3's `rope_freqs`) is an error.

llama.cpp's converter permutes the rows of q and k within each head so that its RoPE can rotate
adjacent pairs (x0, x1), (x2, x3), ...; HF rotates halves (x_j, x_{j + hd/2}). In a head, HF row
p * hd/2 + j (p = which half) is stored at row 2 * j + p; `unpermute_rope_rows` undoes that.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from affjax.models.layers import abstract_module
from affjax.models.qwen2.modeling import Qwen2ForCausalLM, TextConfig
from affjax.models.qwen2.params import KEYS
from affjax.models.weights import KeyTable, load_streaming

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


class GGUFError(ValueError):
    """The GGUF file is not a Llama-architecture model this converter understands."""


def gguf_reader(path: str | Path) -> gguf.GGUFReader:
    """One parsed reader per file, whatever path names it (a memory map; parsing the header and its
    ~50k tokenizer fields takes seconds in pure Python, so the tensors and the tokenizer share it)."""
    return _parse(str(Path(path).resolve()))


@functools.lru_cache(maxsize=4)
def _parse(resolved: str) -> gguf.GGUFReader:
    return gguf.GGUFReader(resolved)


def hf_key(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> HF Llama state-dict key (None for a name with no HF counterpart)."""
    m = _BLOCK.match(gguf_name)
    if m:
        part = _LAYER_NAMES.get(m.group(2))
        return None if part is None else f"model.layers.{m.group(1)}.{part}"
    if gguf_name.endswith(".weight"):
        return _GLOBAL_NAMES.get(gguf_name[: -len(".weight")])
    return None


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved order (what llama.cpp's converter does).

    Row (h, p, j) of a head (p = half, j < hd/2) moves to (h, j, p)."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaved row order -> HF rotate-half order (inverse of `permute_rope_rows`)."""
    out = w.shape[0]
    if out % (2 * heads):
        raise GGUFError(f"{out} rows do not split into {heads} heads of even size")
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_hf_config(reader) -> dict:
    """A LlamaConfig-style dict (config.json keys) from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"general.architecture is {arch!r}; only 'llama' is supported")

    def need(key):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise GGUFError(f"GGUF metadata lacks llama.{key}")
        return v

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"partial RoPE (rope.dimension_count {rope_dim} != head dim {head_dim}) is not supported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise GGUFError("RoPE scaling is not supported")
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(emb.shape[-1])
    # float32 metadata (1e-5 is stored as 9.99999974e-06): round to float32 precision
    eps = float(f"{float(need('attention.layer_norm_rms_epsilon')):.7g}")
    theta = float(f"{float(_field(reader, 'llama.rope.freq_base', 10000.0)):.7g}")
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        v = _field(reader, name)
        if v is not None:
            cfg[key] = int(v)
    return cfg


def iter_gguf_tensors(path: str | Path) -> tuple[dict, Iterator[tuple[str, Callable[[], np.ndarray]]]]:
    """(hf_config, (hf_key, loader) pairs): each loader dequantizes one tensor to float32 in HF
    layout (torch Linear (out, in)), q/k rows un-permuted. The pairs feed `weights.load_streaming`."""
    reader = gguf_reader(path)
    cfg = gguf_hf_config(reader)
    unknown = [t.name for t in reader.tensors if hf_key(t.name) is None]
    if unknown:
        raise GGUFError(f"{len(unknown)} GGUF tensors with no HF Llama counterpart: {', '.join(unknown[:10])}")

    def load(t) -> np.ndarray:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF lists dims fastest-first; numpy (and torch) order is the reverse
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = w.reshape(shape)
        name = t.name
        if name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, cfg["num_key_value_heads"])
        return np.require(w, requirements=["C", "W"])  # F32 tensors come back as read-only file views

    def pairs():
        for t in reader.tensors:
            key = hf_key(t.name)
            if key is not None:
                yield key, (lambda t=t: load(t))

    return cfg, pairs()


def gguf_to_hf_state_dict(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Whole file -> ({HF Llama key: float32 array}, LlamaConfig-style dict). With tied
    embeddings there is no `lm_head.weight` (HF ties it to `model.embed_tokens.weight`)."""
    cfg, pairs = iter_gguf_tensors(path)
    return {k: load() for k, load in pairs}, cfg


def load_gguf_models(path: str | Path, dtypes=("float32",)) -> dict[str, Qwen2ForCausalLM]:
    """A GGUF Llama-family decoder (SmolLM2) as affjax's Qwen2 decoder, once per dtype (dequantized
    once): {dtype: model}. Llama is Qwen2 without the q/k/v biases, so those are zeros."""
    cfg, pairs = iter_gguf_tensors(path)
    tc = dataclasses.replace(TextConfig.from_hf(cfg), qkv_bias=True)
    widths = {"q": tc.heads * tc.head_dim, "k": tc.kv_heads * tc.head_dim, "v": tc.kv_heads * tc.head_dim}
    tensors = [(k, load()) for k, load in pairs] + [
        (f"model.layers.{i}.self_attn.{p}_proj.bias", np.zeros(n, np.float32))
        for i in range(tc.layers) for p, n in widths.items()]
    out = {}
    for dtype in dtypes:
        abstract = abstract_module(lambda rngs: Qwen2ForCausalLM(tc, dtype=jnp.dtype(dtype), rngs=rngs))
        state = load_streaming(abstract, KeyTable(KEYS), ((k, lambda a=a: a) for k, a in tensors),
                               dtype=jnp.dtype(dtype))
        out[dtype] = nnx.merge(nnx.graphdef(abstract), state)
    return out


def gguf_tokenizer(path: str | Path):
    """A `tokenizers.Tokenizer` built from the GGUF's byte-level BPE vocabulary and merges
    (`tokenizer.ggml.model == "gpt2"`). It pre-tokenizes with GPT-2's byte-level regex, which can
    split digit runs differently from the model's own pre-tokenizer; ordinary text matches it."""
    reader = gguf_reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
