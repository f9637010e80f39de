"""The static-shape policy, in one place.

Every array that reaches a jitted function has a shape from a small closed set, so a new input
length inside a bucket never recompiles:
- token sequences are padded to SEQ_BUCKETS (after a pooling stage the packed length is bucketed
  the same way);
- scored continuations are padded to CONT_BUCKETS;
- batches are padded to the fixed batch size with dummy rows (masked out, results dropped);
- audio clips per batch are padded to a multiple of the batch size;
- the KV cache of each layer group holds its prompt bucket plus max_new_tokens slots.
"""

from __future__ import annotations

import numpy as np

SEQ_BUCKETS: tuple[int, ...] = (64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072,
                                4096, 6144, 8192, 12288, 16384)
CONT_BUCKETS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)


class BucketError(ValueError):
    pass


def bucket(n: int, buckets: tuple[int, ...] = SEQ_BUCKETS, what: str = "sequence") -> int:
    """The smallest bucket that holds n."""
    for b in buckets:
        if n <= b:
            return b
    raise BucketError(f"{what} length {n} exceeds the largest bucket {buckets[-1]}")


def audio_slots(n_audio: int, batch_size: int) -> int:
    """Audio clips per batch, padded to a multiple of the batch size (at least one per row)."""
    return max(1, -(-n_audio // batch_size)) * batch_size


def pad_rows(x: np.ndarray, rows: int, fill=0) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    pad = np.full((rows - x.shape[0],) + x.shape[1:], fill, dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)
