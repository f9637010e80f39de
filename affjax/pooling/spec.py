"""Pooling settings: which stages run where, and their text form (docs/pooling.md section 2).

Pure Python, no JAX. The text form is a preset name or stages separated by ``;``, each
``LAYER:tau=F,window=N[,weighted]``, e.g. ``0:tau=0.8,window=1;29:tau=0.7,window=3``.
``positions`` and ``proportional`` are run-wide switches, not part of the text form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

POSITIONS = ("first", "mean", "reindex")
PRESETS = ("none", "input", "dap-conservative", "dap-aggressive")


@dataclass(frozen=True)
class Stage:
    """One pooling stage at layer ``layer`` (0 = input embeddings, l >= 1 = after decoder layer l)."""

    layer: int
    tau: float
    window: int
    weighted: bool = False

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"stage layer must be an int >= 0, got {self.layer!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"stage window must be an int >= 1, got {self.window!r}")
        if not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool) or math.isnan(self.tau):
            raise ValueError(f"stage tau must be a number, got {self.tau!r}")
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "weighted", bool(self.weighted))

    def to_text(self) -> str:
        text = f"{self.layer}:tau={self.tau!r},window={self.window}"
        return text + ",weighted" if self.weighted else text

    @property
    def static(self) -> "StageStatic":
        """What a compiled pooling program depends on (layer, window, weighted); ``tau`` is passed
        to it as a traced float32 value, so stages that differ only in tau share one program."""
        return StageStatic(self.layer, self.window, self.weighted)


@dataclass(frozen=True)
class StageStatic:
    """The static part of a :class:`Stage` (no tau): a static argument of the jitted pieces."""

    layer: int
    window: int
    weighted: bool = False


@dataclass(frozen=True)
class PoolingConfig:
    """A whole pooling setting: stages in strictly increasing layer order plus run-wide switches."""

    stages: tuple[Stage, ...] = ()
    positions: str = "first"
    proportional: bool = False

    def __post_init__(self):
        stages = tuple(self.stages)
        if not all(isinstance(s, Stage) for s in stages):
            raise ValueError("stages must be Stage instances")
        layers = [s.layer for s in stages]
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"stage layers must be strictly increasing, got {layers}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "proportional", bool(self.proportional))

    @property
    def enabled(self) -> bool:
        return bool(self.stages)

    def to_text(self) -> str:
        """Canonical text form of the stages (``none`` when there are none); round-trips via
        ``parse_pooling(cfg.to_text(), L, cfg.positions, cfg.proportional) == cfg``."""
        if not self.stages:
            return "none"
        return ";".join(s.to_text() for s in self.stages)


def preset_stages(name: str, num_layers: int) -> tuple[Stage, ...]:
    """Paper presets; the deep stage sits at ``num_layers - 3`` (29 for the 32-layer Qwen2-Audio)."""
    if name == "none":
        return ()
    if name == "input":
        return (Stage(0, 0.8, 1),)
    if name in ("dap-conservative", "dap-aggressive"):
        deep = num_layers - 3
        if deep < 1:
            raise ValueError(
                f"preset {name!r} needs a deep layer num_layers - 3 >= 1, got num_layers={num_layers}"
            )
        if name == "dap-conservative":
            return (Stage(0, 0.9, 1), Stage(deep, 0.8, 3))
        return (Stage(0, 0.8, 1), Stage(deep, 0.7, 3))
    raise ValueError(f"unknown pooling preset {name!r}; presets: {', '.join(PRESETS)}")


def _parse_stage(part: str) -> Stage:
    layer_text, sep, opts_text = part.partition(":")
    if not sep:
        raise ValueError(f"pooling stage {part!r}: expected 'LAYER:tau=F,window=N[,weighted]'")
    layer_text = layer_text.strip()
    try:
        layer = int(layer_text)
    except ValueError:
        raise ValueError(f"pooling stage {part!r}: layer {layer_text!r} is not an integer") from None
    opts: dict[str, str | None] = {}
    for item in opts_text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"pooling stage {part!r}: empty option")
        key, eq, value = item.partition("=")
        key = key.strip()
        if key in opts:
            raise ValueError(f"pooling stage {part!r}: option {key!r} given twice")
        if key == "weighted":
            if eq:
                raise ValueError(f"pooling stage {part!r}: 'weighted' takes no value")
            opts[key] = None
        elif key in ("tau", "window"):
            if not eq:
                raise ValueError(f"pooling stage {part!r}: option {key!r} needs a value")
            opts[key] = value.strip()
        else:
            raise ValueError(
                f"pooling stage {part!r}: unknown option {key!r} (expected tau, window, weighted)"
            )
    for key in ("tau", "window"):
        if key not in opts:
            raise ValueError(f"pooling stage {part!r}: missing {key}=")
    try:
        tau = float(opts["tau"])
    except ValueError:
        raise ValueError(f"pooling stage {part!r}: tau {opts['tau']!r} is not a number") from None
    if not math.isfinite(tau):
        raise ValueError(f"pooling stage {part!r}: tau must be finite, got {opts['tau']!r}")
    try:
        window = int(opts["window"])
    except ValueError:
        raise ValueError(f"pooling stage {part!r}: window {opts['window']!r} is not an integer") from None
    if window < 1:
        raise ValueError(f"pooling stage {part!r}: window must be >= 1, got {window}")
    if layer < 0:
        raise ValueError(f"pooling stage {part!r}: layer must be >= 0, got {layer}")
    return Stage(layer, tau, window, "weighted" in opts)


def parse_pooling(
    text: str | None, num_layers: int, positions: str = "first", proportional: bool = False
) -> PoolingConfig:
    """Parse a preset name or the ``;``-separated stage form into a :class:`PoolingConfig`.

    Stages are sorted by layer; each layer must lie in ``[0, num_layers - 1]`` and appear once.
    ``None`` or an empty string means no pooling.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    text = "" if text is None else text.strip()
    if text in ("", *PRESETS):
        stages = preset_stages(text or "none", num_layers)
    elif ":" not in text:
        raise ValueError(
            f"unknown pooling preset {text!r}; presets: {', '.join(PRESETS)}, "
            "or stages like '0:tau=0.8,window=1;29:tau=0.7,window=3'"
        )
    else:
        parts = [p.strip() for p in text.split(";")]
        if any(not p for p in parts):
            raise ValueError(f"pooling setting {text!r}: empty stage between ';'")
        stages = tuple(sorted((_parse_stage(p) for p in parts), key=lambda s: s.layer))
    for s in stages:
        if s.layer > num_layers - 1:
            raise ValueError(
                f"pooling stage {s.to_text()!r}: layer {s.layer} out of range [0, {num_layers - 1}]"
            )
    layers = [s.layer for s in stages]
    dups = sorted({l for l in layers if layers.count(l) > 1})
    if dups:
        raise ValueError(f"pooling setting {text!r}: layer(s) {dups} given more than once")
    return PoolingConfig(stages, positions, proportional)
