"""Recipes: one YAML file states the model, the quantization, the calibration and the gates.

A recipe is checked against a schema before any work starts, so a wrong type or range fails
at load time with the key, the value and what was expected (not as a TypeError mid-run, nor
as a string that is silently truthy). The dataclasses below keep the defaults and are what the
pipeline and the manifest use; the schema only says which values are allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .awq import CLIP_STYLES, COMPUTE_DTYPES, METHODS, ROUNDINGS, AWQSettings
from .errors import QuantkitError
from .gates import validate_gates
from .quantizer import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES


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
        """Apply command-line overrides (None means 'not given'), routed to the right section and
        checked by the same schema as a recipe file."""
        given = {k: v for k, v in overrides.items() if v is not None}
        quant = {k: v for k, v in given.items() if k in _field_names(AWQSettings)}
        calib = {k: v for k, v in given.items() if k in _field_names(CalibrationSettings)}
        unknown = set(given) - set(quant) - set(calib)
        if unknown:
            raise ValueError(f"unknown recipe overrides: {sorted(unknown)}")
        data = self.to_dict()
        data["quantization"].update(quant)
        data["calibration"].update(calib)
        return _build(data, "recipe override")


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------- schema


def _one_of(choices: tuple) -> AfterValidator:
    """Membership, checked after the strict type (so 32.0 is refused as a group size, not read as 32)."""

    def check(value):
        if value not in choices:
            raise ValueError(f"is not one of {', '.join(map(repr, choices))}")
        return value

    return AfterValidator(check)


Positive = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    # strict: "no" is not a bool, "10" and 10.0 are not ints; nan/inf are no setting's value.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class _Quantization(_Strict):
    # Field for field the AWQSettings dataclass (awq.py says what each does); no defaults here.
    method: Annotated[str, _one_of(METHODS)]
    group_size: Annotated[int, _one_of(SUPPORTED_GROUP_SIZES)]
    bits: Annotated[int, _one_of(SUPPORTED_BITS)]
    n_grid: Positive
    duo_scaling: bool
    clip: bool
    max_shrink: Annotated[float, Field(ge=0, lt=1)]  # 1 would allow shrinking a group to nothing
    clip_style: Annotated[str, _one_of(CLIP_STYLES)]
    clip_tokens: Positive
    search_samples: Positive
    sink_tokens: Annotated[int, Field(ge=0)]
    batch_samples: Positive
    sequential: bool
    compute_dtype: Annotated[str, _one_of(COMPUTE_DTYPES)]
    rounding: Annotated[str, _one_of(ROUNDINGS)]
    gptq_damp: Annotated[float, Field(ge=0)]
    gptq_act_order: bool


class _Calibration(_Strict):
    source: str | None
    samples: Positive
    seqlen: Positive
    seed: int


class _Recipe(_Strict):
    name: str
    model: str | None
    quantization: _Quantization
    calibration: _Calibration
    gates: dict[str, Any] | None  # names and thresholds are checked by gates.validate_gates


_EXPECTED = {  # pydantic error type -> what the value should have been, in recipe words
    "bool_type": "is not a boolean (write true or false)",
    "int_type": "is not an integer",
    "float_type": "is not a number",
    "finite_number": "is not a finite number",
    "string_type": "is not a string (put it in quotes)",
    "model_type": "is not a mapping (write key: value lines under it)",
    "dict_type": "is not a mapping (write key: value lines under it)",
}


def _problem(err: dict) -> str:
    """One schema error as 'quantization.clip = 'no' is not a boolean (write true or false)'."""
    loc = err["loc"]
    key = ".".join(map(str, loc))
    if err["type"] == "extra_forbidden":
        schema: type[BaseModel] = _Recipe
        for part in loc[:-1]:
            schema = schema.model_fields[part].annotation
        where = f"in '{'.'.join(map(str, loc[:-1]))}'" if len(loc) > 1 else "at the top level"
        return f"unknown key {key}; known keys {where}: {sorted(schema.model_fields)}"
    if err["type"] == "value_error":
        expected = str(err["ctx"]["error"])
    else:
        expected = _EXPECTED.get(err["type"], err["msg"].replace("Input should be", "must be"))
    return f"{key} = {err['input']!r} {expected}"


def _section(data: Any, cls) -> Any:
    """The section with the dataclass's defaults filled in (the schema requires every key)."""
    if data is None:
        return dataclasses.asdict(cls())
    if isinstance(data, dict):
        return {**dataclasses.asdict(cls()), **data}
    return data  # not a mapping: the schema says so


def _build(data: dict[str, Any], where: str) -> Recipe:
    """The Recipe `data` describes, or one QuantkitError listing every invalid value."""
    data = {**data, "quantization": _section(data.get("quantization"), AWQSettings),
            "calibration": _section(data.get("calibration"), CalibrationSettings)}
    try:
        checked = _Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
        raise QuantkitError(f"{where}: " + "; ".join(problems) + ".") from None
    try:
        gates = validate_gates(checked.gates or {})
    except QuantkitError as e:
        raise QuantkitError(f"{where}: gates: {e}") from None
    return Recipe(
        name=checked.name,
        model=checked.model,
        quantization=AWQSettings(**checked.quantization.model_dump()),
        calibration=CalibrationSettings(**checked.calibration.model_dump()),
        gates=gates,
    )


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"recipe {path} not found; pass a YAML file such as recipes/smollm2-135m.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QuantkitError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise QuantkitError(
            f"recipe {path} must be a mapping with keys {sorted(_Recipe.model_fields)}; got {type(data).__name__}."
        )
    return _build({"name": path.stem, "model": None, "gates": None, **data}, f"recipe {path}")
