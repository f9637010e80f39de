"""One training step of a tiny checkpoint on one device and on a data=4,model=2 mesh of 8 fake CPU
devices, in a fresh process (XLA_FLAGS set by tests/test_train.py). Prints one JSON line.

    python tests/train_mesh_check.py CKPT MANIFEST WORKDIR
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from affjax.train.trainer import TrainConfig, Trainer


def main(ckpt: str, manifest: str, work: str) -> None:
    res = {"devices": len(jax.devices())}
    states = {}
    for name, mesh in (("one", None), ("mesh", "data=4,model=2")):
        cfg = TrainConfig(ckpt=ckpt, manifest=manifest, out=f"{work}/{name}", steps=2, batch_size=4, lr=3e-3,
                          warmup=1, lora_rank=4, cache_dir=f"{work}/enc", mesh=mesh, progress=False,
                          pooling="0:tau=0.8,window=1")
        tr = Trainer(cfg, log=lambda *a: None)
        for step in range(2):
            loss, _ = tr.run_step(step)
        res[f"loss_{name}"] = loss
        pure = nnx.to_pure_dict(tr.train)
        states[name] = [np.asarray(x) for x in jax.tree.leaves(pure)]
        if mesh is not None:
            res["sharded_params"] = sum(not x.sharding.is_fully_replicated
                                        for x in jax.tree.leaves(nnx.to_pure_dict(tr.frozen)))
    res["max_param_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(states["one"], states["mesh"]))
    print(json.dumps(res))


if __name__ == "__main__":
    main(*sys.argv[1:4])
