"""Hugging Face checkpoint -> affjax checkpoint (orbax), and loading it back.

`convert(src, dst)` reads a Hugging Face model directory (config.json plus `model.safetensors`,
sharded `model-*.safetensors` with their index, or `pytorch_model.bin`), builds the matching NNX
model abstractly (no memory), streams the tensors one at a time through the model's key table
(`affjax.models.weights.load_streaming`), and writes::

    dst/params/               orbax checkpoint of `nnx.to_pure_dict` of the parameters (restore with
                              `ocp.StandardCheckpointer().restore`, or `load` below)
    dst/affjax_config.json    {"model_type", "dtype", "hf_config", "converted_from", "affjax_version"}
    dst/config.json, tokenizer / processor / chat-template / generation-config files, copied

so that `dst` is self-contained (`AutoProcessor.from_pretrained(dst)` works when the source had a
processor). Everything is written into a temporary directory beside `dst`
(`.DST.tmp-HOST-PID-XXXXXXXX`) and renamed at the end: on any error nothing is left at `dst` and
the temporary directory is removed. A run that was killed outright (SIGKILL, out of memory, power
loss) cannot clean up after itself, so every conversion first removes the temporary directories
that earlier, dead runs left for the same `dst` (`remove_stale_temps`), saying so in one log line.

`load(dst)` restores the parameters with abstract targets (any float dtype, optional sharding) and
returns the NNX model, its config and the metadata.

Model families are looked up by config.json's `model_type` in a registry (or, for a remote-code
model, its `architectures`: ARCHITECTURES); `register()` adds one. Registered: "qwen2_audio",
"whisper" (`WhisperForConditionalGeneration.save_pretrained` folders; the tied `proj_out.weight`
is checked equal to the token embedding and dropped) and "kimi_audio" (the Kimi-Audio release:
36 shards plus the `whisper-large-v3/` subfolder, whose tensors join as `whisper-large-v3/<key>`;
the RoPE buffers and Whisper's text decoder are skipped, and every skipped tensor is listed in
`affjax_config.json` under "skipped_tensors"; the text tokenizer is rebuilt from `tiktoken.model`
as a tokenizer.json; `extras={"speech_tokenizer": DIR}` (CLI `--speech-tokenizer`) adds the
GLM-4-Voice speech tokenizer under `dst/speech_tokenizer/`, see `_convert_speech_tokenizer`).

A CTranslate2 (faster-whisper) Whisper folder (model.bin + config.json + tokenizer.json, no
safetensors) is also accepted: its weights go through `ct2_to_hf_state_dict` and `ct2_hf_config`,
and `dst` gets the HF config.json plus a processor and generation config from `ct2_processor`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # bfloat16 / float8: dtypes numpy itself lacks
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from affjax.models.kimi_audio import params as kimi_params
from affjax.models.kimi_audio import speech_tokenizer as speech
from affjax.models.kimi_audio.modeling import ARCHITECTURE as KIMI_ARCHITECTURE
from affjax.models.kimi_audio.modeling import KimiAudio, KimiAudioConfig
from affjax.models.layers import abstract_module
from affjax.models.qwen2_audio.modeling import Qwen2Audio, Qwen2AudioConfig
from affjax.models.qwen2_audio.params import KEY_ALIASES, KEYS
from affjax.models.weights import KeyTable, WeightError, load_streaming
from affjax.models.whisper.ct2 import CT2Error, ct2_hf_config, ct2_processor, ct2_to_hf_state_dict, read_ct2
from affjax.models.whisper.modeling import Whisper, WhisperConfig
from affjax.models.whisper.params import KEYS as WHISPER_KEYS

__all__ = [
    "ConversionError", "ModelSpec", "MODELS", "register", "get_spec", "convert", "load",
    "load_hf_model", "ensure_converted", "is_ct2_dir", "load_speech_tokenizer", "model_type_of",
    "CONFIG_NAME", "FORMAT", "PARAMS_DIR", "COPIED_FILES", "save_params", "publish", "temp_prefix",
    "remove_stale_temps",
]

CONFIG_NAME = "affjax_config.json"
# Bumped when checkpoints of an older converter behave differently (2: CTranslate2 folders carry
# their suppressed tokens into the config); `affjax eval --model` reconverts its cached ones.
FORMAT = 2
PARAMS_DIR = "params"
DTYPES = ("float32", "bfloat16", "float16")

# Tokenizer / processor / chat-template / generation files copied verbatim when present.
COPIED_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json",
    "chat_template.json", "chat_template.jinja",
)
COPIED_DIRS = ("additional_chat_templates",)


class ConversionError(ValueError):
    """The source cannot be converted (bad layout, unreadable file, unsupported model, ...)."""


# --------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build and fill one model family.

    config_from_hf: config.json dict -> model config.
    model_class:    model_class(cfg, dtype=..., rngs=nnx.Rngs) -> nnx.Module.
    keys, aliases:  the KeyTable rows and key-prefix aliases (see affjax.models.weights.KeyTable).
    ignore:         (canonical key, cfg) -> True for checkpoint tensors to skip silently
                    (buffers such as rotary inv_freq, parts of the HF model not ported).
    shared:         cfg -> {canonical key the model drops: canonical key it shares the weight of};
                    a file tensor for a dropped key is accepted only if equal to the kept one
                    (e.g. lm_head of a model with tied embeddings).
    read_config:    source dir -> the config dict (default: its config.json), e.g. with a
                    subfolder's config embedded; stored as the checkpoint's hf_config.
    subfolders:     subfolders of the source whose weights join it, keyed "SUB/<key>".
    copied:         more files (paths relative to the source) copied into the checkpoint.
    finish:         (source dir, checkpoint dir being written) -> None, after the files are
                    copied (e.g. build a tokenizer the source ships in another form).
    extras:         {name: (extra dir, checkpoint dir being written, dtype) -> metadata dict}: other
                    folders a conversion may be given (`convert(..., extras={name: dir})`).
    """

    config_from_hf: Callable[[dict], Any]
    model_class: Callable[..., Any]
    keys: Sequence[tuple[str, str, str]]
    aliases: Sequence[tuple[str, str]] = ()
    ignore: Callable[[str, Any], bool] | None = None
    shared: Callable[[Any], dict[str, str]] | None = None
    read_config: Callable[[Path], dict] | None = None
    subfolders: Sequence[str] = ()
    copied: Sequence[str] = ()
    finish: Callable[[Path, Path], None] | None = None
    extras: dict[str, Callable[[Path, Path, str], dict]] = dataclasses.field(default_factory=dict)

    def table(self) -> KeyTable:
        return KeyTable(list(self.keys), list(self.aliases))

    def abstract_model(self, cfg, dtype):
        return abstract_module(lambda rngs: self.model_class(cfg, dtype=dtype, rngs=rngs))


MODELS: dict[str, ModelSpec] = {}


def register(model_type: str, spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Register a model family under config.json's `model_type`."""
    if model_type in MODELS and not replace:
        raise ValueError(f"model_type {model_type!r} is already registered")
    MODELS[model_type] = spec
    return spec


# Remote-code models whose config.json model_type is not their own: architecture -> model_type.
ARCHITECTURES = {KIMI_ARCHITECTURE: "kimi_audio"}


def model_type_of(hf_config: dict) -> str | None:
    """The registry name of a config: its architecture's (ARCHITECTURES) or else its model_type."""
    for arch in hf_config.get("architectures") or ():
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    return hf_config.get("model_type")


def get_spec(model_type: str | None) -> ModelSpec:
    if model_type not in MODELS:
        raise ConversionError(f"unsupported model_type {model_type!r} in config.json; "
                              f"supported: {', '.join(sorted(MODELS)) or '(none)'}")
    return MODELS[model_type]


def _register_builtin() -> None:
    register("qwen2_audio", ModelSpec(
        config_from_hf=Qwen2AudioConfig.from_hf,
        model_class=Qwen2Audio,
        keys=KEYS,
        aliases=KEY_ALIASES,
        ignore=lambda key, cfg: key.endswith("rotary_emb.inv_freq"),
        shared=lambda cfg: ({"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}
                            if cfg.text.tie_embeddings else {}),
    ))

    register("whisper", ModelSpec(
        config_from_hf=WhisperConfig.from_hf,
        model_class=Whisper,
        keys=WHISPER_KEYS,
        # the output projection is the token embedding (Whisper always ties them)
        shared=lambda cfg: {"proj_out.weight": "model.decoder.embed_tokens.weight"},
    ))

    register("kimi_audio", ModelSpec(
        config_from_hf=KimiAudioConfig.from_hf,
        model_class=KimiAudio,
        keys=kimi_params.KEYS,
        aliases=kimi_params.KEY_ALIASES,
        ignore=lambda key, cfg: kimi_params.skipped(key),
        read_config=kimi_params.read_config,
        subfolders=(kimi_params.WHISPER_DIR,),
        copied=kimi_params.COPIED,
        finish=_kimi_tokenizer,
        extras={"speech_tokenizer": lambda d, out, dtype: _convert_speech_tokenizer(d, out, dtype)},
    ))


def _kimi_tokenizer(src: Path, out: Path) -> None:
    """Kimi-Audio ships its tokenizer as tiktoken.model + remote code: write it as a fast
    tokenizer.json (affjax.models.kimi_audio.tokenizer), unless the source already has one."""
    from affjax.models.kimi_audio.tokenizer import build_tokenizer

    if (src / "tokenizer.json").is_file():
        return
    if not (src / "tiktoken.model").is_file():
        raise ConversionError(f"{src.name}: no tiktoken.model (Kimi-Audio's text tokenizer)")
    try:
        build_tokenizer(src / "tiktoken.model", out)
    except ValueError as e:
        raise ConversionError(f"tiktoken.model: {e}") from None


_register_builtin()


# --------------------------------------------------------------------------------------------
# reading Hugging Face weights, one tensor at a time

Loader = Callable[[], np.ndarray]


@dataclasses.dataclass
class _Source:
    files: list[Path]
    keys: dict[str, tuple[Path, Loader]]  # key -> (file, loader)

    def __iter__(self) -> Iterator[tuple[str, Loader]]:
        for key, (_, load) in self.keys.items():
            yield key, load


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _np_dtype(name: str) -> np.dtype:
    simple = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
    if name in simple:
        return np.dtype(simple[name])
    extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if name not in extra:
        raise ConversionError(f"unsupported safetensors dtype {name}")
    return np.dtype(extra[name])


def _safetensors_loader(path: Path, name: str, info: dict, data_start: int) -> Loader:
    """Read one tensor with a plain positioned read into a fresh array (no mmap: the file's pages
    never count against this process, and only this one tensor is in memory)."""

    def load():
        lo, hi = info["data_offsets"]
        arr = np.empty(info["shape"], dtype=_np_dtype(info["dtype"]))
        if arr.nbytes != hi - lo:
            raise ConversionError(f"{path.name}: tensor {name} has {hi - lo} bytes for shape "
                                  f"{info['shape']} {info['dtype']}")
        with open(path, "rb") as f:
            f.seek(data_start + lo)
            got = f.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
        if got != hi - lo:
            raise ConversionError(f"{path.name}: truncated while reading tensor {name}")
        return arr

    return load


def _open_safetensors(files: list[Path]) -> _Source:
    keys = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy"):  # validates header and file coverage
                pass
            header, data_start = _safetensors_header(path)
        except (SafetensorError, OSError, ValueError, struct.error) as e:
            raise ConversionError(f"{path.name}: not a readable safetensors file "
                                  f"(truncated or corrupt?): {e}") from None
        for name, info in header.items():
            if name in keys:
                raise ConversionError(f"tensor {name} appears in both {keys[name][0].name} and {path.name}")
            _np_dtype(info["dtype"])
            keys[name] = (path, _safetensors_loader(path, name, info, data_start))
    return _Source(files, keys)


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # deferred: torch is optional (only PyTorch .bin weights need it)

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _open_torch_bins(files: list[Path]) -> _Source:
    try:
        import torch  # deferred: torch is optional
    except ImportError:
        raise ConversionError(f"{files[0].name}: reading PyTorch .bin weights needs torch installed "
                              "(or convert the source to safetensors)") from None
    keys = {}
    for path in files:
        try:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path.name}: cannot read PyTorch weights (truncated or corrupt?): {e}") from None
        for name in sd:
            if name in keys:
                raise ConversionError(f"tensor {name} appears in both {keys[name][0].name} and {path.name}")
            keys[name] = (path, lambda sd=sd, name=name: _torch_to_numpy(sd[name]))
    return _Source(files, keys)


def _index_files(src: Path, index_name: str) -> list[Path]:
    try:
        weight_map = json.loads((src / index_name).read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"{index_name}: not a readable weight index: {e}") from None
    files = [src / f for f in dict.fromkeys(weight_map.values())]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ConversionError(f"{index_name} names shard(s) missing from the source: {', '.join(absent)}")
    return files


def is_ct2_dir(src: str | os.PathLike) -> bool:
    """A CTranslate2 (faster-whisper) folder: model.bin beside config.json and tokenizer.json, and no
    Hugging Face weights."""
    src = Path(src)
    hf = any(src.glob("*.safetensors")) or any(src.glob("pytorch_model*.bin"))
    return (src / "model.bin").is_file() and (src / "config.json").is_file() and not hf


def _open_ct2(src: Path) -> tuple[dict, _Source]:
    """A CTranslate2 Whisper folder as (HF config dict, in-memory HF-keyed source)."""
    if not (src / "tokenizer.json").is_file():
        raise ConversionError(f"{src}: CTranslate2 folder without tokenizer.json")
    try:
        ct2_vars = read_ct2(src / "model.bin")
        hf_config = ct2_hf_config(src, ct2_vars)
        sd = ct2_to_hf_state_dict(ct2_vars, hf_config)
    except (CT2Error, KeyError, ValueError, OSError) as e:
        raise ConversionError(f"{src.name}: not a readable CTranslate2 Whisper folder: {e}") from None
    hf_config["architectures"] = ["WhisperForConditionalGeneration"]
    path = src / "model.bin"
    return hf_config, _Source([path], {k: (path, lambda a=a: a) for k, a in sd.items()})


def open_weights(src: str | os.PathLike, subfolders: Sequence[str] = ()) -> _Source:
    """The weight tensors of a Hugging Face directory as lazily loaded (key, loader) pairs; the
    tensors of each of `subfolders` (a model of its own) join them as "SUB/<key>"."""
    src = Path(src)
    source = _open_dir(src)
    for sub in subfolders:
        if not (src / sub).is_dir():
            raise ConversionError(f"{src.name or src}: the subfolder {sub}/ is missing")
        inner = _open_dir(src / sub)
        source.files += inner.files
        source.keys.update({f"{sub}/{k}": v for k, v in inner.keys.items()})
    return source


def _open_dir(src: Path) -> _Source:
    if (src / "model.safetensors.index.json").is_file():
        return _open_safetensors(_index_files(src, "model.safetensors.index.json"))
    if (src / "model.safetensors").is_file():
        return _open_safetensors([src / "model.safetensors"])
    shards = sorted(src.glob("model-*-of-*.safetensors"))
    if shards:
        return _open_safetensors(shards)
    if (src / "pytorch_model.bin.index.json").is_file():
        return _open_torch_bins(_index_files(src, "pytorch_model.bin.index.json"))
    if (src / "pytorch_model.bin").is_file():
        return _open_torch_bins([src / "pytorch_model.bin"])
    raise ConversionError(f"no weights in {src.name or src}: expected model.safetensors, sharded "
                          "model-*.safetensors (+ model.safetensors.index.json) or pytorch_model.bin")


# --------------------------------------------------------------------------------------------
# convert


def _version() -> str:
    try:
        return version("affjax")
    except Exception:  # noqa: BLE001
        return "0+unknown"


def _check_dtype(dtype) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return name


def _skip_shared(source: _Source, table: KeyTable, shared: dict[str, str]) -> set[str]:
    """File keys for weights the model shares (tied): skipped when equal to the kept tensor."""
    if not shared:
        return set()
    canon = {table.canonical(k): k for k in source.keys}
    skip = set()
    for dropped, kept in shared.items():
        if dropped not in canon:
            continue
        if kept not in canon:
            continue  # reported with everything else: the kept weight missing, the dropped one unused
        a = source.keys[canon[dropped]][1]()
        b = source.keys[canon[kept]][1]()
        if a.shape != b.shape or not np.array_equal(a, b):
            raise WeightError(f"config ties {dropped} to {kept} (tie_word_embeddings) but the checkpoint's "
                              f"{canon[dropped]} differs from {canon[kept]}")
        skip.add(canon[dropped])
    return skip


def _prepare_dst(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve():
        raise ConversionError("--dst must differ from --src")
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise ConversionError(f"{dst} exists and is not a directory")
        if any(dst.iterdir()) and not overwrite:
            raise ConversionError(f"{dst} exists and is not empty (pass --overwrite to replace it)")


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float32",
            overwrite: bool = False, progress: bool = True, extras: dict | None = None) -> Path:
    """Convert a Hugging Face model directory `src` into an affjax checkpoint at `dst`.

    dtype: parameter dtype written ("float32", "bfloat16", "float16"). extras: {name: folder} of
    the other folders the model family takes (ModelSpec.extras). Raises ConversionError or
    WeightError (every missing / unused / mis-shaped tensor in one message); on any error nothing
    is left at `dst` (an existing `dst` replaced under overwrite=True survives a failed run).
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    dtype = _check_dtype(dtype)
    ct2 = is_ct2_dir(src)
    extras = {name: Path(d) for name, d in (extras or {}).items()}
    if ct2:
        hf_config, source = _open_ct2(src)
    else:
        if not (src / "config.json").is_file():
            raise ConversionError(f"{src}: no config.json (not a Hugging Face model directory)")
        try:
            hf_config = json.loads((src / "config.json").read_text())
        except ValueError as e:
            raise ConversionError(f"config.json: not valid JSON: {e}") from None
        source = None
    model_type = model_type_of(hf_config)
    spec = get_spec(model_type)
    unknown = sorted(set(extras) - set(spec.extras))
    if unknown:
        raise ConversionError(f"{model_type} takes no {', '.join(unknown)} "
                              f"(it takes: {', '.join(sorted(spec.extras)) or 'nothing else'})")
    if spec.read_config is not None:
        try:
            hf_config = spec.read_config(src)
        except (OSError, ValueError) as e:
            raise ConversionError(f"{src.name}: {e}") from None
    _prepare_dst(dst, src, overwrite)
    try:
        cfg = spec.config_from_hf(hf_config)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json: cannot build a {model_type} model config: "
                              f"{e if isinstance(e, ValueError) else repr(e)}") from None

    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dst), dir=dst.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; dst gets ordinary permissions
        if source is None:
            source = open_weights(src, spec.subfolders)
        state, n_tensors, skipped = _fill(spec, cfg, source, dtype, progress)
        del source
        n_params, n_bytes = save_params(state, tmp / PARAMS_DIR)
        del state
        if ct2:  # CT2's config.json is not an HF one: write the HF config, processor, generation config
            ct2_processor(src, tmp, hf_config=hf_config)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        else:
            for name in COPIED_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            for name in COPIED_DIRS:
                if (src / name).is_dir():
                    shutil.copytree(src / name, tmp / name)
            for name in spec.copied:
                if (src / name).is_file():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src / name, tmp / name)
            if spec.finish is not None:
                spec.finish(src, tmp)
        meta = {"model_type": model_type, "dtype": dtype, "hf_config": hf_config,
                "converted_from": src.resolve().name, "source_format": "ctranslate2" if ct2 else "huggingface",
                "affjax_version": _version(), "format": FORMAT, "skipped_tensors": skipped}
        for name, d in extras.items():
            meta[name] = spec.extras[name](d, tmp, dtype)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        publish(tmp, dst)
    finally:  # after a successful publish tmp no longer exists; after any error it goes
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    if progress:
        print(f"converted {src.name}: {n_tensors} tensors ({len(skipped)} deliberately skipped), {n_params:,} "
              f"parameters, {n_bytes / 2**20:,.1f} MiB ({dtype}) in {secs:.1f} s -> {dst}", flush=True)
    return dst


# --------------------------------------------------------------------------------------------
# temporary directories: `.DST.tmp-HOST-PID-XXXXXXXX` beside dst

log = logging.getLogger(__name__)


def _host_tag() -> str:
    """This machine's name as it appears in temp names: letters, digits and `_` only (no `-` or
    `.`), so that a temp name parses unambiguously."""
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:63] or "host"


def temp_prefix(dst: Path) -> str:
    return f".{dst.name}.tmp-{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # (a reused pid, or another thread of this process converting: keep it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def remove_stale_temps(dst: Path) -> list[Path]:
    """Remove the temporary directories that killed conversions left for this `dst`; return them.

    Only directories named for this very destination are considered (`.DST.tmp-...`; temp folders
    of other destinations in the same parent are never touched). A temp folder of a conversion
    that is still running, in this or another process, must survive. That is recognised by name:
    every temp folder is `.DST.tmp-HOST-PID-XXXXXXXX`, the host and pid of the process writing it.
    It is stale, and removed, when HOST is this machine and no process PID exists
    (`os.kill(pid, 0)` fails with ProcessLookupError). A folder of another host is left alone
    (the destination may sit on a shared filesystem, and that host's processes cannot be seen from
    here): it is only reported. A reused pid makes a stale folder look alive: it is then kept and
    reported, which costs disk space, never a running conversion. (What this cannot see: a
    conversion in another pid namespace under the same host name, e.g. a container sharing the
    host's network; run such conversions with distinct destinations.) Names without host and pid
    (`.DST.tmp-XXXXXXXX`) come from converters before this scheme; a conversion of that kind
    still running against the same destination is not expected, so they are removed as stale.
    """
    parent, name = dst.parent, dst.name
    current = re.compile(rf"\.{re.escape(name)}\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[a-z0-9_]+")
    legacy = re.compile(rf"\.{re.escape(name)}\.tmp-[a-z0-9_]{{8}}")  # mkdtemp's 8 characters
    removed = []
    prefix = f".{name}.tmp-"
    try:
        candidates = sorted(p for p in parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return removed
    for p in candidates:
        if p.is_symlink() or not p.is_dir():
            continue
        m = current.fullmatch(p.name)
        if m is not None:
            if m["host"] != _host_tag():
                log.warning("leaving %s (%s): temporary directory of a conversion on host %s, which may "
                            "still be running; remove it by hand if it is not", p, _fmt_bytes(_tree_bytes(p)),
                            m["host"])
                continue
            if _pid_alive(int(m["pid"])):
                log.warning("leaving %s (%s): temporary directory of process %s, which is running",
                            p, _fmt_bytes(_tree_bytes(p)), m["pid"])
                continue
        elif legacy.fullmatch(p.name) is None:
            continue  # not a temp name of this destination
        size = _tree_bytes(p)
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            log.warning("could not fully remove %s (%s), the temporary directory of an interrupted "
                        "conversion to %s: %s left", p, _fmt_bytes(size), dst, _fmt_bytes(_tree_bytes(p)))
            continue
        log.warning("removed %s (%s): temporary directory left by an interrupted conversion to %s",
                    p, _fmt_bytes(size), dst)
        removed.append(p)
    return removed


def _fill(spec: ModelSpec, cfg, source: _Source, dtype: str, progress: bool):
    """-> (parameter state, tensors read, sorted keys deliberately skipped)."""
    table = spec.table()
    skip = _skip_shared(source, table, spec.shared(cfg) if spec.shared else {})
    skipped = set()

    def ignore(k):
        if k in skip or (spec.ignore is not None and spec.ignore(table.canonical(k), cfg)):
            skipped.add(k)
            return True
        return False
    abstract = spec.abstract_model(cfg, jnp.dtype(dtype))
    tensors: Any = iter(source)
    bar = None
    if progress:
        bar = tqdm(tensors, total=len(source.keys), unit="tensor", desc="converting")
        tensors = bar
    try:
        state = load_streaming(abstract, table, tensors, dtype=jnp.dtype(dtype), ignore=ignore, as_numpy=True)
    finally:
        if bar is not None:
            bar.close()
    return state, len(source.keys), sorted(skipped)


# --------------------------------------------------------------------------------------------
# Kimi-Audio's speech tokenizer (GLM-4-Voice), converted beside the model

SPEECH_TOKENIZER_DIR = "speech_tokenizer"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _convert_speech_tokenizer(src: Path, out: Path, dtype: str) -> dict:
    """The GLM-4-Voice speech tokenizer folder `src` (config.json, preprocessor_config.json,
    safetensors) into `out/speech_tokenizer/`: its non-weight files copied, its tensors streamed
    through SPEECH_TOKENIZER_KEYS into the tokenizer model (affjax.models.kimi_audio.speech_tokenizer)
    and written as `speech_tokenizer/params` (orbax, `dtype`); every missing, unused or mis-shaped
    tensor is one WeightError, and the tensors the tokenizer deliberately leaves out are listed in
    the returned metadata. Load it back with `load_speech_tokenizer`."""
    if not src.is_dir():
        raise ConversionError(f"--speech-tokenizer {src}: not a directory")
    if not (src / "config.json").is_file():
        raise ConversionError(f"--speech-tokenizer {src}: no config.json (not a GLM-4-Voice tokenizer folder)")
    try:
        cfg = speech.SpeechTokenizerConfig.from_hf(json.loads((src / "config.json").read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"--speech-tokenizer {src.name}/config.json: {e!r}") from None
    dst = out / SPEECH_TOKENIZER_DIR
    dst.mkdir()
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(p, dst / p.name)
    spec = ModelSpec(config_from_hf=speech.SpeechTokenizerConfig.from_hf, model_class=speech.WhisperVQEncoder,
                     keys=speech.SPEECH_TOKENIZER_KEYS, aliases=speech.SPEECH_TOKENIZER_ALIASES,
                     ignore=speech.speech_tokenizer_ignore)
    state, n_tensors, skipped = _fill(spec, cfg, open_weights(src), dtype, progress=False)
    n_params, _ = save_params(state, dst / PARAMS_DIR)
    return {"dir": SPEECH_TOKENIZER_DIR, "converted_from": src.resolve().name, "weights": "converted",
            "params": f"{SPEECH_TOKENIZER_DIR}/{PARAMS_DIR}", "tensors": n_tensors, "parameters": n_params,
            "skipped_tensors": skipped}


def load_speech_tokenizer(ckpt_dir: str | os.PathLike, *, dtype=None):
    """The GLM-4-Voice speech tokenizer converted into a Kimi-Audio checkpoint
    (`--speech-tokenizer`) -> (model, SpeechTokenizerConfig). Raises ConversionError when the
    checkpoint has none."""
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / CONFIG_NAME).read_text())
    st = meta.get("speech_tokenizer")
    if not st or st.get("weights") != "converted":
        raise ConversionError(f"{ckpt_dir}: no converted speech tokenizer (convert with --speech-tokenizer)")
    cfg = speech.SpeechTokenizerConfig.from_hf(json.loads((ckpt_dir / st["dir"] / "config.json").read_text()))
    dtype = jnp.dtype(dtype or meta["dtype"])
    abstract = abstract_module(lambda rngs: speech.WhisperVQEncoder(cfg, dtype=dtype, rngs=rngs))
    return _restore(abstract, ckpt_dir / st["params"], dtype), cfg


def save_params(state, path: Path) -> tuple[int, int]:
    """Write the (numpy) parameter tree with orbax, without whole-tree copies.

    Orbax's defaults would roughly triple peak memory here: the numpy handler deep-copies every
    host array before an async write, and the OCDBT driver buffers the whole tree until commit.
    So: the numpy handler without the defensive copy (nothing else touches these arrays), the
    plain per-array zarr layout instead of OCDBT, and chunks of at most 64 MiB so that encoding
    holds only a few chunks at a time. `ocp.StandardCheckpointer().restore` reads this format.
    """
    pure = nnx.to_pure_dict(state)
    leaves = jax.tree_util.tree_leaves(pure)
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    n_bytes = sum(int(x.nbytes) for x in leaves)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=64 << 20), pure)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry)
    absl_log = logging.getLogger("absl")  # orbax warns that it skips merging OCDBT subdirs
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(path.resolve(), args=ocp.args.PyTreeSave(pure, save_args=save_args))
    finally:
        absl_log.setLevel(level)
    return n_params, n_bytes


def publish(tmp: Path, dst: Path) -> None:
    """Move the finished tmp dir to dst; an existing dst (empty, or under overwrite) is replaced."""
    old = None
    if dst.exists():
        if any(dst.iterdir()):
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
        else:
            dst.rmdir()
    try:
        os.replace(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# load


def _sharding_tree(sharding, abstract_pure):
    if sharding is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(lambda _: dev, abstract_pure)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda _: sharding, abstract_pure)
    if callable(sharding):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: sharding(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), x), abstract_pure)
    return sharding  # a tree matching the parameter tree


def load(ckpt_dir: str | os.PathLike, *, dtype=None, sharding=None):
    """Restore a converted checkpoint -> (model: nnx.Module, cfg, meta).

    dtype: parameter (and compute) dtype of the model; default the dtype it was converted in, any
    float dtype works (a float32 checkpoint loads as bfloat16). sharding: None (first device), one
    jax.sharding.Sharding for every leaf, a function (path tuple, jax.ShapeDtypeStruct) -> Sharding,
    or a tree of shardings shaped like `nnx.to_pure_dict(nnx.state(model))`.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt_dir / CONFIG_NAME).read_text())
    except OSError:
        raise ConversionError(f"{ckpt_dir}: no {CONFIG_NAME} (not an affjax checkpoint)") from None
    spec = get_spec(meta["model_type"])
    cfg = spec.config_from_hf(meta["hf_config"])
    dtype = jnp.dtype(dtype or meta["dtype"])
    return _restore(spec.abstract_model(cfg, dtype), ckpt_dir / PARAMS_DIR, dtype, sharding), cfg, meta


def _restore(abstract: nnx.Module, path: Path, dtype, sharding=None) -> nnx.Module:
    """The parameters saved at `path` (orbax) restored into the abstract model, in `dtype`."""
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    shardings = _sharding_tree(sharding, pure)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                          sharding=s),
        pure, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path.resolve(), target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def ensure_converted(src: str | os.PathLike, dst: str | os.PathLike, *, log=print) -> Path:
    """`dst` holding `src` converted (float32): converted now unless `dst` already holds a
    checkpoint of the current format (the cache of installed models)."""
    dst = Path(dst)
    meta = json.loads((dst / CONFIG_NAME).read_text()) if (dst / CONFIG_NAME).is_file() else None
    if meta is None or meta.get("format", 1) < FORMAT:
        log(f"converting {Path(src).name} ({'first use' if meta is None else 'made by an older converter'}) -> {dst}")
        convert(src, dst, overwrite=True, progress=False)
    return dst


def load_hf_model(src: str | os.PathLike, *, dtype: str = "float32"):
    """Convert `src` into a temporary directory and load it (tests, quick use) -> (model, cfg, meta)."""
    with tempfile.TemporaryDirectory(prefix="affjax-ckpt-") as d:
        out = convert(src, Path(d) / "ckpt", dtype=dtype, progress=False)
        return load(out)
