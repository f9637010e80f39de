"""`affjax train`: fine-tune a Qwen2-Audio-format checkpoint with optax, pooling optionally in the loop.

The step. The frozen audio tower's outputs come from the encoder cache (affjax.train.data); the
projector, the text embeddings and the decoder run as in inference, through the engine's own
fixed-capacity prefill (`engine.prefill_seq`, score mode), so a pooling setting trains exactly the
stage that inference runs: groups are averaged (gradients flow through the group means), the
thresholds are traced values, and with `tau_range` each batch draws its own tau (one model for
several retentions). The stage buffer keeps every token (capacity = the bucket, retention 1): in
training the stage changes what the layers see, not the buffer size. The loss is the mean negative
log-likelihood of the target tokens (and the end token).

Trainable sets: `projector`, `lora` (adapters on the decoder's attention and MLP projections,
affjax.train.lora), `lm` (every decoder parameter); the audio tower never trains (it is cached).
optax AdamW with linear warm-up and cosine decay, global-norm clipping, gradient accumulation
(optax.MultiSteps). Under a mesh (`data=D,model=M`) the batch rows go over `data` and the
parameters are placed by the logical-axis table, as in inference; jit inserts the gradient
all-reduce.

The run folder:

    RUN/run.json        settings and the fingerprints of the checkpoint and the manifest: a rerun
                        with other ones is refused (--restart starts over)
    RUN/ckpt/<step>/    orbax: trainable parameters, optimizer state (the last `keep` kept)
    RUN/log.jsonl       one line per logged step (loss, lr, steps/s) and per validation (WER)

Resume is exact: the batch order and the per-batch tau are functions of (seed, step), so a run
killed after step s and resumed computes the same step s+1 an unbroken run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from affjax.data.manifest import read_manifest
from affjax.eval.frontends import generation_eos
from affjax.eval.metrics import make_normalizer, wer
from affjax.eval.results import fingerprint_checkpoint, fingerprint_file
from affjax.pooling.spec import PoolingConfig, parse_pooling
from affjax.runtime import engine as eng
from affjax.runtime import sharding as shd
from affjax.runtime import shapes
from affjax.train import data as tdata
from affjax.train.lora import add_lora
from affjax.train.lslm import ASR_PROMPT

TRAINABLE = ("projector", "lora", "lm")


@dataclasses.dataclass
class TrainConfig:
    ckpt: str
    manifest: str
    out: str
    steps: int = 1000
    trainable: tuple[str, ...] = ("projector", "lora")
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_layers: tuple[int, ...] | None = None
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    batch_size: int = 8
    accumulate: int = 1
    seed: int = 0
    pooling: str | None = None
    positions: str = "first"
    proportional: bool = False
    tau_range: tuple[float, float] | None = None   # each batch draws every stage's tau from this range
    prompt: str | None = None                      # default prompt (items may carry their own)
    end_token: str | None = None                   # default: the tokenizer's eos token
    save_every: int = 200
    keep: int = 2
    log_every: int = 10
    eval_every: int = 0
    eval_manifest: str | None = None
    eval_items: int = 32
    max_new_tokens: int = 64
    mesh: str | None = None
    cache_dir: str | None = None
    carry: str | None = None                       # a run folder without a checkpoint starts from it
    restart: bool = False
    progress: bool = True

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.accumulate >= 1, f"--accumulate must be >= 1, got {self.accumulate}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}")
        need(self.keep >= 1, f"--keep must be >= 1, got {self.keep}")
        bad = sorted(set(self.trainable) - set(TRAINABLE))
        need(not bad and self.trainable, f"--trainable takes {', '.join(TRAINABLE)} (comma-separated), got "
                                        f"{','.join(self.trainable) or 'nothing'}")
        need("lora" not in self.trainable or self.lora_rank >= 1, f"--lora-rank must be >= 1, got {self.lora_rank}")
        if self.tau_range is not None:
            lo, hi = self.tau_range
            need(lo <= hi, f"--tau-range {lo},{hi}: low end above the high end")
            need(self.pooling, "--tau-range needs --pooling")
        need(self.eval_every == 0 or self.eval_manifest, "--eval-every needs --eval-manifest")
        need(self.carry is None or self.accumulate == 1, "--carry takes runs without --accumulate")
        for name in ("ckpt", "manifest") + (("carry",) if self.carry else ()):
            need(Path(getattr(self, name)).exists(), f"--{name} {getattr(self, name)}: not found")


def trainable_filter(trainable) -> nnx.filterlib.Filter:
    parts = []
    if "lora" in trainable:
        parts.append(nnx.LoRAParam)
    if "projector" in trainable:
        parts.append(nnx.All(nnx.Param, nnx.PathContains("multi_modal_projector")))
    if "lm" in trainable:
        parts.append(nnx.All(nnx.Param, nnx.PathContains("language_model")))
    return nnx.Any(*parts)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1),
                                               end_value=cfg.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adamw(sched, weight_decay=cfg.weight_decay))
    return optax.MultiSteps(tx, cfg.accumulate) if cfg.accumulate > 1 else tx


@dataclasses.dataclass(frozen=True)
class StepStatic:
    """What the compiled step depends on besides shapes."""
    groups: tuple
    stages: tuple
    positions: str
    proportional: bool


def static_of(pooling: PoolingConfig, num_layers: int) -> StepStatic:
    cuts = [st.layer for st in pooling.stages]
    return StepStatic(tuple(zip([0] + cuts, cuts + [num_layers])), tuple(st.static for st in pooling.stages),
                      pooling.positions, pooling.proportional)


def loss_fn(train, frozen, graphdef, batch: dict, taus, static: StepStatic):
    """Mean NLL of the target tokens of a TrainBatch (as a dict of arrays) -> (loss, token count)."""
    model = nnx.merge(graphdef, train, frozen)
    b, t = batch["ids"].shape
    audio = model.multi_modal_projector(batch["audio"])
    x = model.embed_inputs(batch["ids"], audio, jnp.arange(b * t, dtype=jnp.int32).reshape(b, t))
    seq = eng.start_seq(x, batch["valid"], batch["span"])
    lp = eng.prefill_seq(model, seq, batch["n_prompt"], batch["cont_ids"], batch["cont_valid"], taus,
                         groups=static.groups, stages=static.stages, positions=static.positions,
                         caps=(t,) * len(static.stages), retention=1.0, extra=0, proportional=static.proportional,
                         score=True)[0]
    n = jnp.sum(batch["cont_valid"])
    return -jnp.sum(lp) / jnp.maximum(n, 1), n


@functools.partial(jax.jit, static_argnames=("graphdef", "static", "tx"), donate_argnames=("train", "opt_state"))
def train_step(train, opt_state, frozen, batch, taus, *, graphdef, static, tx):
    (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(train, frozen, graphdef, batch, taus, static)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss, optax.tree.norm(grads)


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def eval_loss(train, frozen, batch, taus, *, graphdef, static):
    return loss_fn(train, frozen, graphdef, batch, taus, static)[0]


class Trainer:
    """Holds the model split into trainable and frozen parts, the optimizer state and the data."""

    def __init__(self, cfg: TrainConfig, *, log=print, data: bool = True):
        from transformers import AutoProcessor  # deferred: transformers is heavy

        cfg.validate()
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.mesh = shd.mesh_or_none(cfg.mesh)
        model, self.model_cfg, self.meta = shd.load(cfg.ckpt, None, dtype="float32")
        if self.meta.get("model_type") != "qwen2_audio":
            raise ValueError(f"{cfg.ckpt}: training takes Qwen2-Audio-format checkpoints, not {self.meta.get('model_type')}")
        self.processor = AutoProcessor.from_pretrained(cfg.ckpt)
        tok = self.processor.tokenizer
        self.end_token = cfg.end_token or tok.eos_token
        if "lora" in cfg.trainable:
            add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, layers=cfg.lora_layers, seed=cfg.seed)
        L = self.model_cfg.text.layers
        self.pooling = parse_pooling(cfg.pooling, L, cfg.positions, cfg.proportional)
        self.static = static_of(self.pooling, L)
        self.graphdef, train, frozen = nnx.split(model, trainable_filter(cfg.trainable), ...)
        self.tx = make_optimizer(cfg)
        if self.mesh is not None:
            train = self._place(train)
            frozen = self._place(frozen)
        self.train, self.frozen = train, frozen
        self.opt_state = self.tx.init(train)
        if self.mesh is None:  # committed, as the step's outputs are: else the second step compiles again
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            self.train, self.frozen, self.opt_state = jax.tree.map(
                lambda x: jax.device_put(x, one), (self.train, self.frozen, self.opt_state))
        self.step = 0
        self._prepare_run_dir()
        if data:
            self._load_data()

    # -- run folder -------------------------------------------------------------------------------
    def _place(self, state):
        pure = nnx.to_pure_dict(state)
        nnx.replace_by_pure_dict(state, shd.place_params(pure, self.mesh, self.model_cfg))
        return state

    def _settings(self) -> dict:
        c = dataclasses.asdict(self.cfg)
        for k in ("out", "restart", "progress", "steps", "save_every", "keep", "log_every", "eval_every",
                  "eval_items", "max_new_tokens", "cache_dir", "carry"):
            c.pop(k)
        # the same content fingerprints the eval runs record (affjax.eval.results)
        c["ckpt_fingerprint"] = fingerprint_checkpoint(self.cfg.ckpt)
        c["manifest_sha"] = fingerprint_file(self.cfg.manifest)
        return json.loads(json.dumps(c))  # tuples as lists, as run.json holds them

    def _prepare_run_dir(self) -> None:
        run_json = self.out / "run.json"
        settings = self._settings()
        if run_json.is_file() and not self.cfg.restart:
            old = json.loads(run_json.read_text())["settings"]
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                raise ValueError(f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                                 "use another --out, or --restart to start over")
        elif self.out.exists() and self.cfg.restart:
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        run_json.write_text(json.dumps({"settings": settings, "affjax_train": 1}, indent=1) + "\n")
        self.ckpts = ocp.CheckpointManager(
            (self.out / "ckpt").resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep, create=True))
        latest = self.ckpts.latest_step()
        if latest is not None:
            target = {"train": self.train, "opt": self.opt_state}
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
            restored = self.ckpts.restore(latest, args=ocp.args.StandardRestore(abstract))
            self.train, self.opt_state, self.step = restored["train"], restored["opt"], int(latest)
            self.log(f"resumed {self.out} at step {latest}")
        elif self.cfg.carry:
            from affjax.train.carry import seed_from_carry

            step = seed_from_carry(self, self.cfg.carry)
            self.log(f"started {self.out} from the carry {self.cfg.carry} at step {step}")

    def save(self) -> None:
        self.ckpts.save(self.step, args=ocp.args.StandardSave({"train": self.train, "opt": self.opt_state}))
        self.ckpts.wait_until_finished()

    # -- data -----------------------------------------------------------------------------------
    def _items(self, manifest: str) -> tuple[list[dict], dict[str, str]]:
        items, errors = [], {}
        for row in read_manifest(manifest):
            if row.item is None:
                errors[f"line-{row.index}"] = row.error
                continue
            it = row.item
            target = it.get("target", it.get("text"))
            if not isinstance(target, str) or not target.strip():
                errors[it["id"]] = "no `target` text (or `text`)"
                continue
            if not isinstance(it.get("audio"), str):
                errors[it["id"]] = "`audio` must be one file path"
                continue
            items.append({"id": it["id"], "audio": it["audio"], "target": target, "prompt": it.get("prompt")})
        return items, errors

    def _examples(self, manifest: str, cache) -> tuple[list[tdata.Example], dict]:
        items, errors = self._items(manifest)
        errors.update(cache.ensure(items, progress=self.cfg.progress, log=self.log))
        ex = tdata.build_examples([it for it in items if it["id"] not in errors], cache, self.processor.tokenizer,
                                  audio_token_id=self.model_cfg.audio_token_id,
                                  default_prompt=self.cfg.prompt or ASR_PROMPT, end_token=self.end_token)
        return ex, errors

    def _load_data(self) -> None:
        from affjax.eval.runner import cache_root
        root = self.cfg.cache_dir or str(cache_root() / "encoder")
        model = nnx.merge(self.graphdef, self.train, self.frozen)
        self.cache = tdata.EncoderCache(root, model, self.processor.feature_extractor)
        self.examples, errors = self._examples(self.cfg.manifest, self.cache)
        if errors:
            (self.out / "data_errors.jsonl").write_text("".join(json.dumps({"id": k, "error": v}) + "\n"
                                                                for k, v in sorted(errors.items())))
            self.log(f"{len(errors)} manifest item(s) skipped (see {self.out / 'data_errors.jsonl'}), e.g. "
                     f"{next(iter(errors.items()))}")
        rows = self.cfg.batch_size
        if len(self.examples) < rows:
            raise ValueError(f"{len(self.examples)} usable example(s), fewer than one batch of {rows}")
        self.lengths = np.asarray([len(e.ids) for e in self.examples])
        self._epoch_batches: dict[int, list] = {}

    def batch_at(self, step: int) -> tuple[tdata.TrainBatch, np.ndarray]:
        """The batch and the stage thresholds of `step` (0-based), a pure function of (seed, step)."""
        per_epoch = (len(self.examples) // self.cfg.batch_size)
        epoch, k = divmod(step, per_epoch)
        if epoch not in self._epoch_batches:
            self._epoch_batches = {epoch: tdata.batch_order(len(self.examples), self.lengths,
                                                            batch_size=self.cfg.batch_size, seed=self.cfg.seed,
                                                            epoch=epoch)}
        order = self._epoch_batches[epoch]
        idx = order[k % len(order)]
        batch = tdata.collate([self.examples[i] for i in idx], self.cache,
                              audio_token_id=self.model_cfg.audio_token_id, d=self.model_cfg.audio.d_model)
        taus = np.asarray([st.tau for st in self.pooling.stages], np.float32)
        if self.cfg.tau_range is not None:
            rng = np.random.default_rng([self.cfg.seed, step, 7])
            taus = rng.uniform(*self.cfg.tau_range, size=len(taus)).astype(np.float32)
        return batch, taus

    def _device(self, batch: tdata.TrainBatch) -> dict:
        d = dataclasses.asdict(batch)
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in d.items()}
        return {k: shd.put_rows(self.mesh, v) for k, v in d.items()}

    # -- loop -----------------------------------------------------------------------------------
    def run_step(self, step: int) -> tuple[float, float]:
        batch, taus = self.batch_at(step)
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            self.train, self.opt_state, loss, gnorm = train_step(
                self.train, self.opt_state, self.frozen, self._device(batch), jnp.asarray(taus),
                graphdef=self.graphdef, static=self.static, tx=self.tx)
        return float(loss), float(gnorm)

    def fit(self) -> dict:
        cfg = self.cfg
        logf = (self.out / "log.jsonl").open("a")
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not cfg.progress)
        t0, n0, last = time.perf_counter(), self.step, None
        try:
            while self.step < cfg.steps:
                loss, gnorm = self.run_step(self.step)
                self.step += 1
                if not math.isfinite(loss):
                    raise FloatingPointError(f"step {self.step}: loss is {loss}")
                last = loss
                rate = (self.step - n0) / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rate:.3f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logf.write(json.dumps({"step": self.step, "loss": loss, "grad_norm": gnorm,
                                           "steps_per_s": rate, "time": time.time()}) + "\n")
                    logf.flush()
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    res = self.validate()
                    logf.write(json.dumps({"step": self.step, **res, "time": time.time()}) + "\n")
                    logf.flush()
                    self.log(f"step {self.step}: validation WER {res['wer']:.4f} on {res['items']} items")
        finally:
            bar.close()
            logf.close()
        return {"step": self.step, "loss": last}

    def model(self):
        """The current model (adapters unmerged)."""
        return nnx.merge(self.graphdef, self.train, self.frozen)

    def validate(self) -> dict:
        """Greedy WER on the first `eval_items` items of the eval manifest (full inference path)."""
        from affjax.train.export import transcribe  # export imports this module

        items, _ = self._items(self.cfg.eval_manifest)
        items = items[: self.cfg.eval_items]
        hyps = transcribe(self.model(), self.processor, items, prompt=self.cfg.prompt, pooling=self.pooling,
                          max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.batch_size,
                          eos_ids=generation_eos(self.cfg.ckpt))
        norm, _ = make_normalizer(self.processor.tokenizer)
        return {"wer": wer([it["target"] for it in items], hyps, norm), "items": len(items)}


def run(cfg: TrainConfig, log=print) -> dict:
    return Trainer(cfg, log=log).fit()
