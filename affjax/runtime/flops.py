"""FLOPs: the language model's prefill counted the two ways docs/pooling.md section 5 asks for.

Analytic (`lm_prefill_flops`, `analytic_lm_flops`, `pooled_vs_unpooled`): 2 FLOPs per multiply-add
over every matrix product of each decoder layer (q/k/v/o projections with their real GQA widths,
attention scores and attention-weighted values over the full n x n square, no causal halving, the
three SwiGLU matrices) plus the LM head on one position per item, with n = the VALID tokens present
at that layer: the unpooled length before the first stage, then each stage's pooled length.

XLA-measured (`xla_cost`): the FLOPs of the compiled programs a prefill ran, from XLA's own cost
analysis (`compiled.cost_analysis()`), per program, at the programs' real (padded) shapes. The two
counts differ on purpose:
- XLA sees buffers, not valid tokens: a sequence bucket (1024 for 790 tokens), a fixed-capacity
  buffer (`shapes.bucket` of the retention cap) and dummy batch rows all cost FLOPs there;
- XLA also counts element-wise work (norms, RoPE, softmax, masks, pooling similarities), which the
  analytic count leaves out, and the audio encoder lives in the `embed` program (the LM-only XLA
  number subtracts it).
XLA's cost analysis counts the body of a `while` loop ONCE, whatever its trip count; chunked
attention (`jax.lax.map` over query blocks) is such a loop. `xla_cost` therefore re-analyses every
loop body on its own and multiplies it by the loop's known trip count (`flops`); the uncorrected
figure is kept as `flops_xla_raw`.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jaxlib._hlo as hlo
from jax._src.lib import xla_client as xc

# ----------------------------------------------------------------------------------------------
# Analytic count (docs/pooling.md section 5)


def lm_prefill_flops(t, tokens_per_layer, items: int = 1) -> int:
    """The analytic count of docs/pooling.md section 5: q/k/v/o with real GQA widths, the full
    n x n attention square, three SwiGLU matrices per layer at that layer's n, plus the LM head on one position per
    item. `t`: a TextConfig; `tokens_per_layer`: n for each decoder layer, summed over `items`."""
    qo = 2 * t.hidden * t.heads * t.head_dim
    kv = 2 * t.hidden * t.kv_heads * t.head_dim
    mlp = 3 * t.hidden * t.intermediate
    total = 0
    for n in tokens_per_layer:
        total += 2 * n * (qo + kv + mlp) + 2 * 2 * n * n * t.heads * t.head_dim
    return total + items * 2 * t.hidden * t.vocab_size


def analytic_lm_flops(text_cfg, per_item_tokens_per_layer: Sequence[Sequence[int]]) -> int:
    """Analytic LM prefill FLOPs of a batch: `per_item_tokens_per_layer[i][l]` = tokens of item i
    present at decoder layer l (0-based, one entry per layer). Items are counted separately (the
    attention square is per item)."""
    total = 0
    for counts in per_item_tokens_per_layer:
        counts = [int(n) for n in counts]
        if len(counts) != text_cfg.layers:
            raise ValueError(f"need one token count per decoder layer ({text_cfg.layers}), got {len(counts)}")
        total += lm_prefill_flops(text_cfg, counts, items=1)
    return total


def _stage_layers(stages) -> list[int]:
    layers = [int(getattr(s, "layer", s)) for s in stages]
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"stage layers must be strictly increasing, got {layers}")
    return layers


def tokens_per_layer(num_layers: int, stages, counts: Sequence[int]) -> list[int]:
    """n at each decoder layer (0-based) for one item. `stages`: Stage objects or layer ints;
    `counts`: [valid tokens before the first stage, after stage 1, after stage 2, ...]. A stage at
    layer l (0 = input) acts before 0-based layer l, so layer i sees counts[#stages with l <= i]."""
    layers = _stage_layers(stages)
    if len(counts) != len(layers) + 1:
        raise ValueError(f"need {len(layers) + 1} counts (unpooled + one per stage), got {len(counts)}")
    return [int(counts[sum(1 for l in layers if l <= i)]) for i in range(num_layers)]


def pooled_vs_unpooled(text_cfg, stages, per_item_counts: Sequence[Sequence[int]]) -> float:
    """Analytic pooled / unpooled LM prefill FLOPs of a batch. `per_item_counts[i]` = [valid tokens
    of item i unpooled, after stage 1, ...] (text + audio + any scored continuation)."""
    if not per_item_counts:
        raise ValueError("no items")
    L = text_cfg.layers
    pooled = analytic_lm_flops(text_cfg, [tokens_per_layer(L, stages, c) for c in per_item_counts])
    unpooled = analytic_lm_flops(text_cfg, [[int(c[0])] * L for c in per_item_counts])
    return pooled / unpooled


# ----------------------------------------------------------------------------------------------
# Whisper, analytic (2 per multiply-add; attention scores and values over the full square)

def whisper_encoder_flops(cfg, layer_tokens: Sequence[int]) -> int:
    """Whisper encoder FLOPs (`cfg`: its EncoderConfig) with ``layer_tokens[i]`` frames present in layer i+1: the conv stem (on the
    full 30 s input), then per layer the q/k/v/o projections, scores and weighted values over the
    n x n square, and the two MLP matrices. The final LayerNorm and activations are not counted."""
    d, f = cfg.d_model, cfg.ffn_dim
    n0 = cfg.max_source_positions
    total = 2 * cfg.mel_frames * 3 * cfg.num_mel_bins * d + 2 * n0 * 3 * d * d
    for n in layer_tokens:
        total += 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * f
    return int(total)


def whisper_decoder_flops(cfg, enc_len: int, prompt_len: int, generated: int) -> int:
    """Whisper decoder FLOPs (`cfg`: a WhisperConfig) of one greedy transcription: the prompt (``prompt_len`` tokens, self-attention
    over the full square) and each generated token fed back (``generated - 1`` of them: the last
    one, eos or the limit, is never fed). Per layer: self-attention projections and scores, the
    cross-attention's q/o projections and its scores and values over ``enc_len`` frames, the
    cross k/v projections of the ``enc_len`` frames (once), the MLP; the logits of every position
    that yields a token (the prompt's last one and each fed token)."""
    d, f, v = cfg.d_model, cfg.decoder_ffn_dim, cfg.vocab_size
    s = enc_len

    def tokens(t, keys):  # t query tokens, each seeing `keys` self-attention keys
        return t * (2 * 4 * d * d + 2 * 2 * keys * d + 2 * 2 * d * d + 2 * 2 * s * d + 2 * 2 * d * f)

    per_layer = 2 * 2 * s * d * d + tokens(prompt_len, prompt_len)
    for k in range(max(generated - 1, 0)):
        per_layer += tokens(1, prompt_len + k + 1)
    return int(cfg.decoder_layers * per_layer + 2 * d * v * max(generated, 1))


# ----------------------------------------------------------------------------------------------
# XLA cost analysis with while-loop trip counts

_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+)")
_COND = re.compile(r"\bcondition=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONST = re.compile(r"^\s*%?([\w.\-]+) = s32\[\]\S* constant\((-?\d+)\)")
_LT = re.compile(r"compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT")


def _cond_bound(lines, name: str) -> int | None:
    """The constant an induction variable is compared with (`i < N`) in loop condition `name`: the
    trip count of a loop counting from 0 by 1 (how jax.lax loops are built), an upper bound for one
    that may stop early (the decode loop). TPU HLO carries no known_trip_count; this stands in."""
    consts, inside, bound = {}, False, None
    for line in lines:
        m = _HEAD.match(line)
        if m:
            inside = m.group(2) == name
            continue
        if not inside:
            continue
        if line.startswith("}"):
            break
        c = _CONST.match(line)
        if c:
            consts[c.group(1)] = int(c.group(2))
        lt = _LT.search(line)
        if lt and lt.group(1) in consts:
            bound = consts[lt.group(1)]
    return bound


def _hlo_text(compiled) -> str:
    mods = compiled.runtime_executable().hlo_modules()
    if len(mods) != 1:
        raise ValueError(f"expected one HLO module, got {len(mods)}")
    opts = hlo.HloPrintOptions()
    opts.print_metadata = False
    return mods[0].to_string(opts)


def _loops(text: str):
    """({computation: [(while body, trip count or None), ...]}, entry name, lines)."""
    lines = text.splitlines()
    comps, cur, entry = {}, None, None
    for line in lines:
        m = _HEAD.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        if cur is not None and line.startswith("}"):
            cur = None
            continue
        if cur is not None and " while(" in line:
            w = _WHILE.search(line)
            if w:
                t = _TRIP.search(line)
                c = _COND.search(line)
                comps[cur].append((w.group(1), int(t.group(1)) if t else c and c.group(1)))
    # loops without known_trip_count: the bound from their condition
    for loops in comps.values():
        for i, (body, trip) in enumerate(loops):
            if isinstance(trip, str):
                loops[i] = (body, _cond_bound(lines, trip))
    return comps, entry, lines


def _cost_as_entry(lines, name: str, client, key: str = "flops") -> float:
    """XLA's cost analysis (`key`: "flops" or "bytes accessed") of computation `name` made the
    module's entry."""
    out = ["HloModule cost"]
    for line in lines[1:]:
        m = _HEAD.match(line)
        if m:
            line = ("ENTRY " if m.group(2) == name else "") + line[len(m.group(1) or ""):]
        out.append(line)
    module = hlo.hlo_module_from_text("\n".join(out))
    return float(xc._xla.hlo_module_cost_analysis(client, module).get(key, 0.0))


def loop_corrected_cost(compiled, key: str = "flops") -> tuple[float, float, int]:
    """(`key` of XLA's cost analysis, "flops" or "bytes accessed", with every while body counted
    trip-count times; XLA's raw figure; loops found).

    A loop without a known trip count (TPU HLO has none) takes the bound of its condition
    (`_cond_bound`); one with neither is counted once, as XLA does. Loops reached through
    `call`/`conditional` computations (not produced by the engine's programs) are not expanded."""
    raw = float(compiled.cost_analysis().get(key, 0.0))
    try:
        text = _hlo_text(compiled)
    except Exception:  # no HLO access on this backend: keep XLA's figure
        return raw, raw, 0
    comps, entry, lines = _loops(text)
    if entry is None or not any(comps.values()):
        return raw, raw, 0
    client = jax.devices()[0].client
    memo: dict[str, float] = {}
    raw_of: dict[str, float] = {}

    def raw_cost(name):
        if name not in raw_of:
            raw_of[name] = _cost_as_entry(lines, name, client, key)
        return raw_of[name]

    def corrected(name):
        if name not in memo:
            total = raw_cost(name) if name != entry else raw
            for body, trip in comps.get(name, ()):
                total += (trip or 1) * corrected(body) - raw_cost(body)
            memo[name] = total
        return memo[name]

    n_loops = sum(len(v) for v in comps.values())
    return corrected(entry), raw, n_loops


def loop_corrected_flops(compiled) -> tuple[float, float, int]:
    """(flops with every while body counted trip-count times, XLA's raw figure, loops found)."""
    return loop_corrected_cost(compiled, "flops")


def xla_cost(compiled) -> dict:
    """FLOPs (loop-corrected and raw) and XLA's memory analysis of one compiled program."""
    flops, raw, loops = loop_corrected_flops(compiled)
    out = {"flops": flops, "flops_xla_raw": raw, "while_loops": loops}
    try:
        m = compiled.memory_analysis()
        out.update(temp_bytes=int(m.temp_size_in_bytes), argument_bytes=int(m.argument_size_in_bytes),
                   output_bytes=int(m.output_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes))
        out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    except Exception:  # memory analysis is backend dependent
        pass
    return out


def total_flops(costs: dict, key: str = "flops") -> float:
    """Sum of a {program label: cost dict} mapping (as Engine.program_costs returns)."""
    return float(sum(c[key] for c in costs.values()))


def lm_xla_flops(costs: dict, embed_flops: float, key: str = "flops") -> float:
    """LM-side FLOPs of a prefill: all its programs minus the audio encoder + embedding program
    (`embed_flops`: the `embed` program's cost at the same batch shapes; in fixed-capacity mode the
    embedding is inside the one `prefill_fixed` program, so the separate program's figure is used)."""
    return total_flops(costs, key) - float(embed_flops)
