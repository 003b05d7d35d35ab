"""Recipes: every value is checked against the schema when the recipe loads, naming key, value and fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from quantkit.awq import AWQSettings
from quantkit.errors import QuantkitError
from quantkit.quantizer import SUPPORTED_GROUP_SIZES
from quantkit.recipe import CalibrationSettings, Recipe, _Calibration, _Quantization, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def refused(tmp_path, text: str) -> str:
    with pytest.raises(QuantkitError) as err:
        load_recipe(write(tmp_path, text))
    return str(err.value)


# ---------------------------------------------------------------- what loads


def test_there_are_shipped_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe.quantization, AWQSettings) and isinstance(recipe.calibration, CalibrationSettings)
    assert recipe.gates and all(type(v) is float for v in recipe.gates.values())


def test_the_smollm2_recipe_loads_its_values():
    recipe = load_recipe(RECIPES[0])
    assert recipe.name == "smollm2-135m-awq-g32" and recipe.model == "smollm2-135m"
    assert recipe.quantization == AWQSettings(group_size=32, rounding="gptq")
    assert recipe.calibration == CalibrationSettings(source="lambada-dev")


def test_missing_or_empty_sections_take_the_dataclass_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, "quantization:\ncalibration: {}\n"))
    assert recipe == Recipe(name="r")  # the name defaults to the file's stem


def test_the_recorded_recipe_keeps_its_shape(tmp_path):
    # The manifest records to_dict() and a resume compares it with the interrupted run's.
    recipe = load_recipe(write(tmp_path, "quantization:\n  group_size: 32\n  max_shrink: 0\n"))
    assert recipe.to_dict() == dataclasses.asdict(Recipe(name="r", quantization=AWQSettings(group_size=32, max_shrink=0.0)))


@pytest.mark.parametrize("schema,cls", [(_Quantization, AWQSettings), (_Calibration, CalibrationSettings)])
def test_the_schema_checks_exactly_the_dataclass_fields(schema, cls):
    assert set(schema.model_fields) == {f.name for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------- what is refused, and what it says


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("quantization:\n  clip: 'no'\n", ["r.yaml", "quantization.clip = 'no'", "not a boolean", "true or false"]),
        ("quantization:\n  duo_scaling: 1\n", ["quantization.duo_scaling = 1", "not a boolean"]),
        ("calibration:\n  samples: ten\n", ["calibration.samples = 'ten'", "not an integer"]),
        ("calibration:\n  samples: 10.0\n", ["calibration.samples = 10.0", "not an integer"]),
        ("calibration:\n  samples: 0\n", ["calibration.samples = 0", "greater than or equal to 1"]),
        ("calibration:\n  seqlen: '512'\n", ["calibration.seqlen = '512'", "not an integer"]),
        ("quantization:\n  n_grid: 0\n", ["quantization.n_grid = 0", "greater than or equal to 1"]),
        ("quantization:\n  group_size: 32.0\n", ["quantization.group_size = 32.0", "not an integer"]),
        ("quantization:\n  rounding: stochastic\n", ["quantization.rounding = 'stochastic'", "'nearest', 'gptq'"]),
        ("quantization:\n  method: gptq\n", ["quantization.method = 'gptq'", "'awq', 'rtn'"]),
        ("quantization:\n  max_shrink: 1.0\n", ["quantization.max_shrink = 1.0", "less than 1"]),
        ("quantization:\n  max_shrink: .nan\n", ["quantization.max_shrink = nan", "finite number"]),
        ("calibration:\n  source: 5\n", ["calibration.source = 5", "not a string"]),
        ("name: 3\n", ["name = 3", "not a string"]),
        ("quantization: 5\n", ["quantization = 5", "not a mapping"]),
    ],
)
def test_a_wrong_type_or_range_is_refused_at_load_naming_key_value_and_expectation(tmp_path, text, fragments):
    message = refused(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, message


def test_an_unsupported_group_size_lists_the_supported_ones(tmp_path):
    message = refused(tmp_path, "quantization:\n  group_size: 16\n")
    assert "quantization.group_size = 16" in message
    assert ", ".join(map(str, SUPPORTED_GROUP_SIZES)) in message


def test_every_invalid_value_is_reported_at_once(tmp_path):
    message = refused(tmp_path, "quantization:\n  clip: 'no'\n  n_grid: 0\ncalibration:\n  samples: ten\n")
    for key in ("quantization.clip", "quantization.n_grid", "calibration.samples"):
        assert key in message, message


def test_an_unknown_key_is_named_with_the_known_keys_of_its_section(tmp_path):
    message = refused(tmp_path, "quantization:\n  group_sise: 64\n")
    assert "quantization.group_sise" in message and "known keys in 'quantization'" in message
    assert "'group_size'" in message and "'n_grid'" in message
    message = refused(tmp_path, "quantisation:\n  group_size: 64\n")
    assert "quantisation" in message and "'quantization'" in message and "'gates'" in message


def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path):
    assert "must be a mapping" in refused(tmp_path, "- group_size: 64\n")


@pytest.mark.parametrize("threshold", ["true", "'95'", ".nan"])
def test_a_gate_threshold_must_be_a_real_number(tmp_path, threshold):
    message = refused(tmp_path, f"gates:\n  min_task_retention_pct: {threshold}\n")
    assert "r.yaml" in message and "min_task_retention_pct" in message and "finite number" in message


def test_a_true_threshold_is_not_read_as_one(tmp_path):
    # YAML's `true` is Python's True, an int subclass: it used to load as a threshold of 1.0.
    assert "got True" in refused(tmp_path, "gates:\n  max_task_drop_points: true\n")


def test_an_unknown_gate_is_refused_at_load(tmp_path):
    message = refused(tmp_path, "gates:\n  min_accuracy: 95\n")
    assert "min_accuracy" in message and "min_task_retention_pct" in message


def test_integer_gate_thresholds_load_as_floats(tmp_path):
    assert load_recipe(write(tmp_path, "gates:\n  max_task_drop_points: 2\n")).gates == {"max_task_drop_points": 2.0}


# ---------------------------------------------------------------- overrides


def test_overrides_go_to_their_sections_and_none_means_not_given():
    recipe = Recipe().with_overrides(method="rtn", group_size=32, samples=8, clip=False, seqlen=None)
    assert (recipe.quantization.method, recipe.quantization.group_size, recipe.quantization.clip) == ("rtn", 32, False)
    assert (recipe.calibration.samples, recipe.calibration.seqlen) == (8, CalibrationSettings().seqlen)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ({"samples": "ten"}, "calibration.samples = 'ten' is not an integer"),
        ({"n_grid": 0}, "quantization.n_grid = 0 must be greater than or equal to 1"),
        ({"group_size": 16}, "quantization.group_size = 16 is not one of"),
        ({"clip": "no"}, "quantization.clip = 'no' is not a boolean"),
    ],
)
def test_a_bad_override_is_refused_like_a_bad_recipe_value(override, fragment):
    with pytest.raises(QuantkitError) as err:
        Recipe().with_overrides(**override)
    assert fragment in str(err.value)


def test_an_unknown_override_is_a_programming_error():
    with pytest.raises(ValueError, match="group_sise"):
        Recipe().with_overrides(group_sise=32)
