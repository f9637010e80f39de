"""One compile counter for every jitted piece (Qwen2-Audio engine, Whisper, pooling).

Each jitted function bumps its name when it is traced; a trace is a compilation (JAX caches the
compiled program per static arguments and shapes), so tests and jobs count compilations by
comparing TRACES before and after a call.
"""

from __future__ import annotations

import collections

TRACES: collections.Counter = collections.Counter()


def traced(name: str) -> None:
    TRACES[name] += 1


def total() -> int:
    return sum(TRACES.values())
