"""`affjax bench-train`: one training step of affjax (`affjax train`'s compiled step) against the
same step in PyTorch, side by side in one process.

The step: projector + LoRA adapters (rank r on the seven projections of every decoder layer)
trainable, float32, AdamW, global-norm clipping, loss = mean NLL of the target tokens, on a batch
of cached audio-tower outputs (what `affjax train` feeds: the frozen tower is not in the step).
PyTorch runs transformers' Qwen2AudioForConditionalGeneration loaded from the same HF folder, with
the same adapters (the same initial values, so the first losses must agree: a check that both sides
run the same step) in eager mode. Both sides use every core of the machine, one after the other;
times are medians of --repeats steps after --warmup steps, alternating blocks of the two sides.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.pooling.spec import PoolingConfig
from affjax.train import lora as lora_mod
from affjax.train.trainer import TrainConfig, make_optimizer, static_of, train_step, trainable_filter


def make_batch(cfg, *, batch: int, audio_tokens: int, text_tokens: int, target_tokens: int, seed: int = 0) -> dict:
    """A right-padded batch of mixed lengths (rows shortened by up to a quarter), random tower outputs."""
    rng = np.random.default_rng(seed)
    T = audio_tokens + text_tokens + target_tokens
    vocab = cfg.text.vocab_size - 8
    ids = rng.integers(10, vocab, (batch, T)).astype(np.int32)
    valid = np.zeros((batch, T), bool)
    span = np.zeros((batch, T), np.int32)
    n_prompt = np.zeros((batch,), np.int32)
    cont = np.zeros((batch, target_tokens), np.int32)
    cont_valid = np.zeros((batch, target_tokens), bool)
    for b in range(batch):
        n_audio = audio_tokens - int(rng.integers(0, audio_tokens // 4 + 1))
        ids[b, 1:1 + n_audio] = cfg.audio_token_id
        span[b, 1:1 + n_audio] = 1
        n_prompt[b] = 1 + n_audio + text_tokens
        n = n_prompt[b] + target_tokens
        valid[b, :n] = True
        cont[b] = ids[b, n_prompt[b]:n]
        cont_valid[b] = True
    audio = rng.standard_normal((batch, T, cfg.audio.d_model)).astype(np.float32) * (span > 0)[..., None]
    return {"ids": ids, "valid": valid, "span": span, "audio": audio, "n_prompt": n_prompt, "cont_ids": cont,
            "cont_valid": cont_valid}


def _torch_step_fn(hf_dir: str, lora_init: dict, cfg: TrainConfig, batch: dict):
    """(step(): loss) for transformers' model with the same adapters and optimizer."""
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).train()
    for p in model.parameters():
        p.requires_grad_(False)

    class LoRA(torch.nn.Module):
        def __init__(self, base, a, b, scale):
            super().__init__()
            self.base, self.scale = base, scale
            self.a = torch.nn.Parameter(torch.from_numpy(np.array(a)))
            self.b = torch.nn.Parameter(torch.from_numpy(np.array(b)))

        def forward(self, x):
            return self.base(x) + (x @ self.a) @ self.b * self.scale

    lm = model.model.language_model
    params = list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    for i, layer in enumerate(lm.layers):
        for name in lora_mod.TARGETS:
            parent = layer.self_attn if name in lora_mod.ATTENTION else layer.mlp
            a, b, scale = lora_init[(i, name)]
            mod = LoRA(getattr(parent, name), a, b, scale)
            setattr(parent, name, mod)
            params += [mod.a, mod.b]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(cfg, s) / cfg.lr)
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    head = model.lm_head
    pos = (t["n_prompt"][:, None] - 1 + torch.arange(t["cont_ids"].shape[1])[None]).long()

    def step() -> float:
        x = lm.embed_tokens(t["ids"].long())
        audio = model.model.multi_modal_projector(t["audio"])
        x = torch.where((t["span"] > 0)[..., None], audio, x)
        h = lm(inputs_embeds=x, attention_mask=t["valid"].long()).last_hidden_state
        hp = torch.gather(h, 1, pos[..., None].expand(-1, -1, h.shape[-1]))
        lp = torch.log_softmax(head(hp).float(), -1).gather(-1, t["cont_ids"].long()[..., None])[..., 0]
        loss = -(lp * t["cont_valid"]).sum() / t["cont_valid"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _lr(cfg: TrainConfig, s: int) -> float:
    """optax.warmup_cosine_decay_schedule as make_optimizer builds it (so both sides step alike)."""
    import optax
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1),
                                               end_value=cfg.lr * 0.05)
    return float(sched(s))


def run(hf_dir: str, *, batch: int = 8, audio_tokens: int = 100, text_tokens: int = 20, target_tokens: int = 20,
        lora_rank: int = 8, warmup: int = 2, repeats: int = 5, blocks: int = 2, log=print) -> dict:
    import torch

    from affjax.models import checkpoint

    model, mcfg, _ = checkpoint.load_hf_model(hf_dir)
    cfg = TrainConfig(ckpt=hf_dir, manifest=hf_dir, out="-", steps=1000, lora_rank=lora_rank, lr=1e-3, warmup=2)
    lora_mod.add_lora(model, rank=lora_rank, seed=0)
    lora_init = {}
    for i, layer in enumerate(model.language_model.layers):
        for name in lora_mod.TARGETS:
            m = getattr(layer.self_attn if name in lora_mod.ATTENTION else layer.mlp, name)
            # B random (not zero) so that the first losses compare the adapters too
            m.lora_b.set_value(jax.random.normal(jax.random.key(i * 7 + len(name)), m.lora_b.shape) * 0.01)
            lora_init[(i, name)] = (np.asarray(m.lora_a[...]), np.asarray(m.lora_b[...]), m.scale)
    graphdef, train, frozen = nnx.split(model, trainable_filter(cfg.trainable), ...)
    tx = make_optimizer(cfg)
    opt_state = tx.init(train)
    static = static_of(PoolingConfig(), mcfg.text.layers)
    data = make_batch(mcfg, batch=batch, audio_tokens=audio_tokens, text_tokens=text_tokens,
                      target_tokens=target_tokens)
    dev = {k: jnp.asarray(v) for k, v in data.items()}
    taus = jnp.zeros((0,), jnp.float32)
    state = {"train": train, "opt": opt_state}

    def jax_step() -> float:
        state["train"], state["opt"], loss, _ = train_step(state["train"], state["opt"], frozen, dev, taus,
                                                           graphdef=graphdef, static=static, tx=tx)
        return float(loss)

    torch_step = _torch_step_fn(hf_dir, lora_init, cfg, data)
    t0 = time.perf_counter()
    first = {"affjax": jax_step()}
    compile_s = time.perf_counter() - t0
    first["pytorch"] = torch_step()
    log(f"first-step loss: affjax {first['affjax']:.6f}, PyTorch {first['pytorch']:.6f}")
    for _ in range(warmup - 1):
        jax_step()
        torch_step()
    times = {"affjax": [], "pytorch": []}
    for _ in range(blocks):
        for name, fn in (("affjax", jax_step), ("pytorch", torch_step)):
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = int(data["valid"].sum())
    res = {
        "config": {"hf": Path(hf_dir).name, "batch": batch, "seq_len": int(data["ids"].shape[1]), "tokens": tokens,
                   "audio_tokens": audio_tokens, "text_tokens": text_tokens, "target_tokens": target_tokens,
                   "lora_rank": lora_rank, "trainable": "projector,lora", "dtype": "float32",
                   "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model)))),
                   "trainable_parameters": int(sum(x.size for x in jax.tree.leaves(train)))},
        "first_loss": first, "first_loss_abs_diff": abs(first["affjax"] - first["pytorch"]),
        "step_s_median": med, "step_s_all": times, "affjax_compile_plus_first_step_s": compile_s,
        "speed_ratio_affjax_over_pytorch": med["pytorch"] / med["affjax"],
        "machine": {"cpu": platform.processor() or platform.machine(), "jax": jax.__version__,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
    }
    return res


def main_bench_train(args) -> int:
    res = run(args.hf, batch=args.batch, audio_tokens=args.audio_tokens, lora_rank=args.lora_rank,
              repeats=args.repeats, blocks=args.blocks)
    m = res["step_s_median"]
    print(f"training step (B={res['config']['batch']}, T={res['config']['seq_len']}, fp32, projector+LoRA "
          f"r{res['config']['lora_rank']}): affjax {m['affjax']:.3f} s, PyTorch {m['pytorch']:.3f} s -> affjax "
          f"{res['speed_ratio_affjax_over_pytorch']:.2f}x PyTorch's speed; first losses differ by "
          f"{res['first_loss_abs_diff']:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0
