"""Recipes: one YAML file states the model, the quantization, the calibration and the gates."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .awq import AWQSettings
from .errors import QuantkitError


@dataclass(frozen=True)
class CalibrationSettings:
    source: str | None = None  # None: the bundled LAMBADA development passages
    samples: int = 128
    seqlen: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    name: str = "default"
    model: str | None = None
    quantization: AWQSettings = field(default_factory=AWQSettings)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    gates: dict[str, float] = field(default_factory=dict)  # enforced by `quantkit eval --gate`

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, **overrides: Any) -> "Recipe":
        """Apply command-line overrides (None means 'not given'), routed to the right section."""
        quant = {k: v for k, v in overrides.items() if v is not None and k in _field_names(AWQSettings)}
        calib = {k: v for k, v in overrides.items() if v is not None and k in _field_names(CalibrationSettings)}
        unknown = set(k for k, v in overrides.items() if v is not None) - set(quant) - set(calib)
        if unknown:
            raise ValueError(f"unknown recipe overrides: {sorted(unknown)}")
        return dataclasses.replace(
            self,
            quantization=dataclasses.replace(self.quantization, **quant),
            calibration=dataclasses.replace(self.calibration, **calib),
        )


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _section(data: Any, cls, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise QuantkitError(f"recipe section '{where}' must be a mapping, got {type(data).__name__}.")
    unknown = set(data) - _field_names(cls)
    if unknown:
        raise QuantkitError(
            f"recipe section '{where}' has unknown keys {sorted(unknown)}; known keys: {sorted(_field_names(cls))}."
        )
    return cls(**data)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"recipe {path} not found; pass a YAML file such as recipes/smollm2-135m.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QuantkitError(f"recipe {path} is not valid YAML: {e}") from None
    known = {"name", "model", "quantization", "calibration", "gates"}
    if not isinstance(data, dict) or set(data) - known:
        extra = sorted(set(data) - known) if isinstance(data, dict) else []
        raise QuantkitError(f"recipe {path} must be a mapping with keys {sorted(known)}; unexpected: {extra}.")
    gates = data.get("gates") or {}
    if not isinstance(gates, dict) or not all(isinstance(v, (int, float)) for v in gates.values()):
        raise QuantkitError(f"recipe {path}: 'gates' must map gate names to numbers.")
    return Recipe(
        name=str(data.get("name", path.stem)),
        model=data.get("model"),
        quantization=_section(data.get("quantization"), AWQSettings, "quantization"),
        calibration=_section(data.get("calibration"), CalibrationSettings, "calibration"),
        gates={k: float(v) for k, v in gates.items()},
    )
