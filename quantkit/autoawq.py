"""Interop in: AWQ GEMM checkpoints as AutoAWQ (or transformers) writes them, without quantkit.json.

Such a directory holds config.json (with an AWQ `quantization_config`), and/or AutoAWQ's older
`quant_config.json` (`w_bit`, `q_group_size`, `zero_point`, `version`), safetensors weights in one
file or in shards named by model.safetensors.index.json, and the tokenizer files. The packed tensors
are exactly quantkit's own artifact layout (quantkit/pack.py), so once validated they go to the same
kernels. Nothing here trusts the checkpoint: settings from both files must agree, every packed
linear must be complete and its shapes must imply the declared group size, and anything the CPU
kernels cannot run exactly (other layouts, bits, symmetric quantization, group sizes) is refused
with the reason before a single tensor is loaded. Pickle weights are never read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifact import INDEX_NAME, MANIFEST_NAME, read_json_object, read_tensors, tensor_meta
from .errors import QuantkitError
from .pack import TensorMeta, check_packed_tensors
from .shards import weight_map

QUANT_CONFIG_NAME = "quant_config.json"  # AutoAWQ's settings file before transformers' quantization_config
SUPPORTED_VERSION = "gemm"
SUPPORTED_BITS = 4
# kernels/cpu_int4.prepare_cpu_int4: the fused int4 op tiles K by 32, so these are the group sizes it runs.
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)

# AWQ `version` values that name another packing of the weights (not loadable as GEMM tensors).
OTHER_LAYOUTS = {
    "gemv": "GEMV layout (qweight [out, in/8], for AutoAWQ's batch-1 CUDA kernel)",
    "gemv_fast": "GEMV-fast layout (interleaved tiles for AutoAWQ's CUDA kernels)",
    "marlin": "Marlin layout (tiled, symmetric, for the Marlin CUDA kernels)",
    "exllama": "ExLlama kernel layout",
    "exllamav2": "ExLlamaV2 kernel layout",
    "ipex": "Intel Extension for PyTorch layout",
}
# Field names: transformers' quantization_config spelling first, then AutoAWQ's quant_config.json.
_ALIASES = {"bits": ("bits", "w_bit"), "group_size": ("group_size", "q_group_size")}
_SUPPORTED_HINT = f"quantkit serves AWQ GEMM checkpoints: version 'gemm', {SUPPORTED_BITS}-bit, zero_point true, group size one of {SUPPORTED_GROUP_SIZES}"


@dataclass(frozen=True)
class AwqSettings:
    """A checkpoint's AWQ settings in transformers' names, whichever file(s) declared them."""

    bits: int
    group_size: int
    zero_point: bool
    version: str  # lower case, as transformers writes it
    modules_to_not_convert: tuple[str, ...]
    source: str  # the file(s) they were read from, for messages

    def quantization_config(self) -> dict:
        """The standard `quantization_config` (what quantkit artifacts, transformers and vLLM read)."""
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": self.version,
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }


@dataclass(frozen=True)
class AwqCheckpoint:
    """A validated checkpoint, before its tensors are read."""

    path: Path
    config: dict  # config.json with the standard quantization_config
    settings: AwqSettings
    weight_map: dict[str, str]  # tensor -> the weight file to read it from
    tensors: dict[str, TensorMeta]
    quantized_modules: tuple[str, ...]

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


# ---------------------------------------------------------------------------- detection


def declares_quantization(path: str | Path) -> bool:
    """A directory without a quantkit manifest whose config.json or quant_config.json declares
    quantization: it must go through this module (which refuses what it cannot serve)."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST_NAME).is_file():
        return False
    if (path / QUANT_CONFIG_NAME).is_file():
        return True
    config = _read_json_or_none(path / "config.json")
    return isinstance(config, dict) and bool(config.get("quantization_config"))


def is_autoawq_checkpoint(path: str | Path) -> bool:
    """A foreign (non-quantkit) directory declaring AWQ quantization: AutoAWQ's or transformers' export."""
    path = Path(path)
    if not declares_quantization(path):
        return False
    if (path / QUANT_CONFIG_NAME).is_file():
        return True
    qc = _read_json_or_none(path / "config.json")["quantization_config"]  # declares_quantization saw a non-empty one
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq"


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- settings


def _field(raw: Mapping[str, Any], name: str, where: str) -> Any:
    """One setting under either of its spellings; both present and different is a contradiction."""
    present = {key: raw[key] for key in _ALIASES.get(name, (name,)) if key in raw}
    if len(set(map(repr, present.values()))) > 1:
        raise QuantkitError(f"{where} gives {name} twice with different values {present}; keep one and re-export.")
    return next(iter(present.values()), None)


def _normalize(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Settings of one file in transformers' names; absent fields stay absent (None)."""
    method = raw.get("quant_method")
    if method is not None and str(method).lower() != "awq":
        raise QuantkitError(
            f"{where} declares quant_method '{method}'; quantkit loads only AWQ checkpoints "
            f"(quant_method 'awq'). Quantize the dense model with `quantkit quantize` instead."
        )
    out = {name: _field(raw, name, where) for name in ("bits", "group_size", "zero_point", "version")}
    if out["version"] is not None:
        out["version"] = str(out["version"]).lower()
    modules = raw.get("modules_to_not_convert")
    if isinstance(modules, str):  # a lone name, not a list of its characters
        modules = [modules]
    if modules is not None and not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise QuantkitError(f"{where}: modules_to_not_convert is {modules!r}; it must be a list of module names (or null).")
    out["modules_to_not_convert"] = None if modules is None else tuple(modules)
    return out


def _merge(declared: dict[str, dict[str, Any]], where: Path) -> dict[str, Any]:
    """One value per field from all files that declare it; files that disagree are refused."""
    merged: dict[str, Any] = {}
    for field in ("bits", "group_size", "zero_point", "version", "modules_to_not_convert"):
        values = {where: d[field] for where, d in declared.items() if d[field] is not None}
        if field == "modules_to_not_convert":  # an empty list and no list mean the same
            values = {w: v for w, v in values.items() if v}
        if len({repr(v) for v in values.values()}) > 1:  # repr: JSON lists and objects do not hash
            detail = ", ".join(f"{where} says {v!r}" for where, v in values.items())
            raise QuantkitError(
                f"{where}: the quantization settings disagree on {field} ({detail}); "
                f"fix or delete the stale file so one set of settings remains."
            )
        merged[field] = next(iter(values.values()), None)
    return merged


def read_awq_settings(path: str | Path) -> AwqSettings:
    """The AWQ settings of a checkpoint directory, from config.json's quantization_config and/or
    quant_config.json (they must agree). Refuses non-AWQ methods and missing essentials; whether
    the settings are servable is check_awq_settings's job (so `inspect` can print them regardless)."""
    path = Path(path)
    declared: dict[str, dict[str, Any]] = {}
    config_path = path / "config.json"
    if not config_path.is_file():
        raise QuantkitError(f"no config.json in {path}; pass a Hugging Face model directory (as AutoAWQ's save_quantized writes).")
    qc = read_json_object(config_path).get("quantization_config")
    if qc is not None:
        if not isinstance(qc, dict):
            raise QuantkitError(f"{config_path}: quantization_config is {type(qc).__name__}, not an object; the checkpoint is damaged.")
        if "quant_method" not in qc:
            raise QuantkitError(f"{config_path}: quantization_config names no quant_method; add \"quant_method\": \"awq\" if it is an AWQ export.")
        declared["config.json quantization_config"] = _normalize(qc, f"{config_path} quantization_config")
    if (path / QUANT_CONFIG_NAME).is_file():
        declared[QUANT_CONFIG_NAME] = _normalize(read_json_object(path / QUANT_CONFIG_NAME), str(path / QUANT_CONFIG_NAME))
    if not declared:
        raise QuantkitError(f"{path} declares no quantization (no quantization_config in config.json, no {QUANT_CONFIG_NAME}); it is not an AWQ checkpoint.")
    merged = _merge(declared, path)
    source = " and ".join(declared)
    for name in ("bits", "group_size"):
        if merged[name] is None:
            raise QuantkitError(f"{path}: {source} does not give {name}; the quantization is unknown, so the checkpoint is refused. Add it to the settings.")
        if isinstance(merged[name], bool) or not isinstance(merged[name], int):
            raise QuantkitError(f"{path}: {name} is {merged[name]!r} in {source}; it must be an integer.")
    zero_point = merged["zero_point"]
    if zero_point is not None and not isinstance(zero_point, bool):
        raise QuantkitError(f"{path}: zero_point is {zero_point!r} in {source}; it must be true or false.")
    return AwqSettings(
        bits=merged["bits"],
        group_size=merged["group_size"],
        # transformers' AwqConfig and AutoAWQ both default to asymmetric GEMM when these are absent.
        zero_point=True if zero_point is None else zero_point,
        version=merged["version"] or SUPPORTED_VERSION,
        modules_to_not_convert=merged["modules_to_not_convert"] or (),
        source=source,
    )


def check_awq_settings(settings: AwqSettings, where: str | Path) -> None:
    """Refuse settings the CPU int4 kernels cannot run exactly, saying why and what is supported."""
    if settings.version != SUPPORTED_VERSION:
        layout = OTHER_LAYOUTS.get(settings.version)
        what = f"the {layout}" if layout else "an unknown layout"
        raise QuantkitError(
            f"{where}: AWQ version '{settings.version}' ({settings.source}) is {what}, not the GEMM layout; "
            f"{_SUPPORTED_HINT}. Re-export the model with AutoAWQ's version='GEMM'."
        )
    if settings.bits != SUPPORTED_BITS:
        raise QuantkitError(f"{where}: {settings.bits}-bit AWQ ({settings.source}) is not supported; {_SUPPORTED_HINT}. Re-quantize with w_bit=4.")
    if not settings.zero_point:
        raise QuantkitError(
            f"{where}: zero_point false ({settings.source}) means symmetric codes without zero points, "
            f"which the int4 kernels ((q - z) * s per group) do not read; {_SUPPORTED_HINT}. Re-quantize with zero_point=True."
        )
    if settings.group_size == -1:
        raise QuantkitError(
            f"{where}: group_size -1 (one group per whole row, {settings.source}) is not supported: the CPU int4 kernels "
            f"need groups of {', '.join(map(str, SUPPORTED_GROUP_SIZES))} input features. Re-quantize with q_group_size=128."
        )
    if settings.group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantkitError(
            f"{where}: group size {settings.group_size} ({settings.source}) is not supported by the CPU int4 kernels; "
            f"{_SUPPORTED_HINT}. Re-quantize with one of those group sizes."
        )


# ---------------------------------------------------------------------------- weight files


# ---------------------------------------------------------------------------- loading


def check_autoawq_checkpoint(path: str | Path) -> AwqCheckpoint:
    """Validate settings, weight files and every packed tensor's layout from file headers only."""
    path = Path(path)
    if not path.is_dir():
        raise QuantkitError(f"{path} is not a directory; pass the directory AutoAWQ's save_quantized wrote.")
    settings = read_awq_settings(path)
    check_awq_settings(settings, path)
    mapping = weight_map(path)
    stray = sorted(p.name for p in path.glob("*.safetensors") if p.name not in set(mapping.values()))
    if stray:  # transformers would ignore it, quantkit too: still, what is served must be what was shipped
        raise QuantkitError(
            f"{path}: {stray[0]} is a weight file that {INDEX_NAME} does not list ({len(stray)} such file(s)); "
            "remove it, or add its tensors to the index if it belongs to the checkpoint."
        )
    meta = tensor_meta(path, mapping)
    modules = check_packed_tensors(meta, settings.group_size, settings.modules_to_not_convert, path, settings.source)
    config = read_json_object(path / "config.json")
    config["quantization_config"] = settings.quantization_config()
    return AwqCheckpoint(path, config, settings, mapping, meta, modules)


def load_autoawq_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config (with a standard AWQ quantization_config) and tensors of a validated AutoAWQ GEMM checkpoint."""
    checkpoint = check_autoawq_checkpoint(path)
    return checkpoint.config, read_tensors(checkpoint.path, checkpoint.weight_map)
