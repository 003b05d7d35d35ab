"""The Python API (quantkit.quantize, quantkit.evaluate, quantkit.LLM) and the artifact's model card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

import quantkit
from quantkit.artifact import CARD_NAME, MANIFEST_NAME, append_to_manifest, load_artifact, read_manifest, verify_artifact
from quantkit.errors import QuantkitError
from quantkit.gates import GatesBreached
from quantkit.model_card import render_model_card


@pytest.fixture(scope="module")
def rtn_artifact(tiny_model_dir, tmp_path_factory):
    """The tiny model quantized through the public API, with overrides instead of a recipe file."""
    out = tmp_path_factory.mktemp("api") / "tiny-rtn-g32"
    path = quantkit.quantize(tiny_model_dir, out, method="rtn", group_size=32, compute_dtype="float32", progress=False)
    assert path == out
    return out


@pytest.fixture
def artifact_copy(rtn_artifact, tmp_path):
    """A private copy, for tests that record evaluations into it."""
    return shutil.copytree(rtn_artifact, tmp_path / "art")


def evaluation(piqa=(0.60, 0.57), wikitext=(20.0, 21.0)) -> dict:
    """An evaluation entry as `quantkit eval` records it in the manifest."""
    return {
        "date": "2026-12-07", "lm_eval_version": "0.4.13", "baseline": {"model": "src", "dtype": "float32"}, "limit": 4,
        "task_hashes": {}, "report": None,
        "results": {
            "piqa": {"task": "qk_piqa", "metric": "acc_norm", "higher_is_better": True, "baseline": piqa[0], "candidate": piqa[1]},
            "wikitext": {"task": "qk_wikitext", "metric": "word_perplexity", "higher_is_better": False,
                         "baseline": wikitext[0], "candidate": wikitext[1]},
        },
    }


# ---------------------------------------------------------------------------- import cost


def test_import_quantkit_loads_neither_torch_nor_the_api_modules():
    # The command line imports quantkit on every call; the API is loaded on first use.
    code = ("import sys, quantkit; assert quantkit.__version__; "
            "print(sorted(m for m in ('torch', 'lm_eval', 'quantkit.pipeline', 'quantkit.evaluate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_api_names_are_listed_and_resolve_to_the_implementations():
    from quantkit.pipeline import run_quantize
    from quantkit.runtime.engine import LLM
    from quantkit.runtime.sampling import SamplingParams

    assert {"quantize", "evaluate", "LLM", "SamplingParams"} <= set(dir(quantkit))
    assert quantkit.quantize is run_quantize and quantkit.LLM is LLM and quantkit.SamplingParams is SamplingParams
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        quantkit.quantise  # noqa: B018


def test_quantkit_evaluate_is_callable_even_after_its_module_was_imported():
    # The submodule quantkit/evaluate.py is what `quantkit.evaluate` names once imported; it is callable.
    import inspect

    import quantkit.evaluate as module

    assert quantkit.evaluate is module and callable(module)
    assert list(inspect.signature(quantkit.evaluate).parameters)[:2] == ["artifact", "tasks"]


# ---------------------------------------------------------------------------- quantkit.quantize


def test_quantize_applies_the_overrides_and_writes_a_verified_artifact(rtn_artifact):
    artifact = load_artifact(rtn_artifact)  # every listed file verifies
    q = artifact.manifest["recipe"]["quantization"]
    assert (q["method"], q["group_size"], q["compute_dtype"]) == ("rtn", 32, "float32")
    assert artifact.quantization["group_size"] == 32


def test_an_out_of_range_override_is_refused_by_the_recipe_schema_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(QuantkitError, match=r"quantization.group_size = 48 is not one of 32, 64, 128"):
        quantkit.quantize(tiny_model_dir, tmp_path / "out", method="rtn", group_size=48, progress=False)
    assert not list(tmp_path.iterdir())


def test_an_unknown_override_is_a_type_error_naming_it_and_the_known_settings(tiny_model_dir, tmp_path):
    with pytest.raises(TypeError, match=r"\['grup_size'\].*'group_size'"):
        quantkit.quantize(tiny_model_dir, tmp_path / "out", grup_size=32)
    assert not list(tmp_path.iterdir())


def test_a_recipe_file_and_overrides_combine_the_overrides_winning(tmp_path):
    from quantkit.pipeline import plan_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "mine", "quantization": {"method": "rtn", "group_size": 64},
                                      "gates": {"max_task_drop_points": 2}}))
    plan = plan_recipe(recipe, group_size=32, samples=None)  # None: not given, as the CLI passes absent options
    assert (plan.name, plan.quantization.method, plan.quantization.group_size) == ("mine", "rtn", 32)
    assert plan.gates == {"max_task_drop_points": 2.0}


def test_no_model_and_no_recipe_model_is_a_clear_error(tmp_path):
    with pytest.raises(QuantkitError, match="no model given"):
        quantkit.quantize(None, tmp_path / "out", method="rtn")


def test_the_progress_bar_counts_blocks_and_starts_part_way_on_a_resumed_run(capsys):
    from quantkit.pipeline import block_progress

    with block_progress("awq g32") as progress:
        for done in (3, 4):  # a run resumed at block 3 of 4
            progress(done, 4, 0.1)
    err = capsys.readouterr().err
    assert "awq g32" in err and "4/4" in err and "2/4" in err and "1/4" not in err


# ---------------------------------------------------------------------------- quantkit.LLM


def test_llm_generates_from_the_artifact(rtn_artifact):
    llm = quantkit.LLM(rtn_artifact, dtype="float32", num_blocks=16)
    [out] = llm.generate(["The capital of France is"], quantkit.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out.token_ids) == 5 and out.finished and isinstance(out.text, str)


# ---------------------------------------------------------------------------- the model card


def test_the_model_card_is_listed_hashed_and_describes_the_quantization(rtn_artifact, tiny_model_dir):
    manifest = read_manifest(rtn_artifact)
    assert CARD_NAME in manifest["files"]
    assert all(check.ok for check in verify_artifact(rtn_artifact))
    card = (rtn_artifact / CARD_NAME).read_text()
    assert str(tiny_model_dir) in card and manifest["source"]["weights_sha256"] in card
    assert "— int4 RTN, group 32" in card and "Round-to-nearest (RTN)" in card and "group size 32" in card
    assert "none (round-to-nearest needs no calibration)" in card
    assert "Not evaluated yet" in card
    assert "vllm serve MODEL_DIR --quantization awq" in card and "pip install gptqmodel" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "quantkit serve MODEL_DIR" in card
    assert "see the source model's license" in card
    # The recorded recipe is in the card as YAML that loads as a recipe again.
    recipe_yaml = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_yaml) == manifest["recipe"]


def test_the_model_card_is_a_pure_function_of_manifest_config_and_sizes(rtn_artifact):
    # So a card re-rendered when an evaluation is recorded differs only where the evaluation shows.
    manifest = read_manifest(rtn_artifact)
    config = json.loads((rtn_artifact / "config.json").read_text())
    sizes = {n: (rtn_artifact / n).stat().st_size for n in manifest["files"] if n.endswith(".safetensors")}
    assert render_model_card(manifest, config, sizes) == (rtn_artifact / CARD_NAME).read_text()


def test_recording_an_evaluation_re_renders_the_card_and_it_still_verifies(artifact_copy):
    before = read_manifest(artifact_copy)["files"][CARD_NAME]
    append_to_manifest(artifact_copy, "evaluations", evaluation())
    manifest = load_artifact(artifact_copy).manifest  # raises on any hash mismatch
    assert manifest["files"][CARD_NAME] != before and manifest["evaluations"][-1]["date"] == "2026-12-07"
    card = (artifact_copy / CARD_NAME).read_text()
    assert "Not evaluated yet" not in card and "the first 4 examples of each task" in card
    assert "| piqa | acc_norm | 0.6 | 0.57 | -0.03 | 95.0% |" in card
    assert "| wikitext | word_perplexity | 20 | 21 | +1 | +5.0% |" in card
    assert not list(artifact_copy.glob("*.tmp"))


def test_the_card_shows_the_newest_evaluations_first(artifact_copy):
    append_to_manifest(artifact_copy, "evaluations", {**evaluation(piqa=(0.6, 0.3)), "date": "2026-12-01"})
    append_to_manifest(artifact_copy, "evaluations", {**evaluation(), "date": "2026-12-07"})
    card = (artifact_copy / CARD_NAME).read_text()
    assert card.index("### 2026-12-07") < card.index("### 2026-12-01")
    assert all(check.ok for check in verify_artifact(artifact_copy))


def test_an_unlisted_readme_of_an_older_artifact_is_left_alone(artifact_copy):
    # Written before cards existed, the README.md there is the user's own: never overwritten or listed.
    manifest = json.loads((artifact_copy / MANIFEST_NAME).read_text())
    del manifest["files"][CARD_NAME]
    (artifact_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    (artifact_copy / CARD_NAME).write_text("my notes\n")
    append_to_manifest(artifact_copy, "evaluations", evaluation())
    assert (artifact_copy / CARD_NAME).read_text() == "my notes\n"
    assert CARD_NAME not in load_artifact(artifact_copy).manifest["files"]


def test_a_results_entry_not_in_report_form_still_renders_a_card(artifact_copy):
    append_to_manifest(artifact_copy, "evaluations", {"results": {"piqa": 0.6}})
    assert "not in report form" in (artifact_copy / CARD_NAME).read_text()
    load_artifact(artifact_copy)


def smollm2_manifest(**source) -> dict:
    return {
        "quantkit_version": "0.1.0", "created": "2026-12-07T00:00:00+00:00",
        "source": {"spec": "smollm2-135m", "path": "/cache/models/smollm2-135m-instruct", "weights_sha256": "ab" * 32, **source},
        "recipe": {"name": "smollm2-135m-awq-g32", "model": "smollm2-135m",
                   "quantization": {"method": "awq", "group_size": 32, "bits": 4, "clip": True, "rounding": "gptq", "gptq_act_order": True},
                   "calibration": {"source": "lambada-dev", "samples": 128, "seqlen": 512, "seed": 0}, "gates": {}},
        "calibration": {"source": "lambada-dev (bundled)", "samples": 128, "seqlen": 512, "seed": 0, "tokens_sha256": "cd" * 32},
        "layers": {"model.layers.0.mlp.down_proj": {"shape": [576, 1536]}},
    }


def test_an_awq_card_names_the_calibration_tokens_the_rounding_and_the_license():
    config = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm",
                                      "modules_to_not_convert": ["lm_head"]}}
    card = render_model_card(smollm2_manifest(), config, {"model.safetensors": 100 * 2**20, "config.json": 1000})
    assert card.startswith("---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "# SmolLM2-135M-Instruct — int4 AWQ, group 32" in card
    assert "128 samples x 512 tokens = 65,536 tokens, seed 0" in card and "cd" * 32 in card
    assert "GPTQ's error-compensating order (act-order" in card and "per-group clipping" in card
    assert "weights on disk: 100.0 MiB in 1 safetensors file" in card
    assert "884,736 weights in 1 layers" in card and "4.62 bits per weight" in card  # 4 + 20/32
    assert "Apache-2.0, the license of the source model (`HuggingFaceTB/SmolLM2-135M-Instruct`)" in card


def test_a_card_claims_no_license_or_base_model_it_cannot_know():
    # A relative directory looks like a hub id; only a download (the hub's cache layout) is one.
    card = render_model_card(smollm2_manifest(spec="out/smollm2", path="/work/out/smollm2"), {}, {})
    assert "license:" not in card and "base_model" not in card and "see the source model's license" in card
    card = render_model_card(smollm2_manifest(spec="HuggingFaceTB/SmolLM2-360M",
                                              path="/hf/hub/models--HuggingFaceTB--SmolLM2-360M/snapshots/1"), {}, {})
    assert "base_model: HuggingFaceTB/SmolLM2-360M" in card and "license: apache-2.0" in card
    card = render_model_card(smollm2_manifest(spec="Qwen/Qwen3-0.6B", path="/hf/hub/models--Qwen--Qwen3-0.6B/snapshots/1"), {}, {})
    assert "base_model: Qwen/Qwen3-0.6B" in card and "license:" not in card


def test_a_minimal_manifest_renders_saying_what_is_unknown():
    card = render_model_card({}, {}, {})
    assert "not recorded" in card and "Not evaluated yet" in card


# ---------------------------------------------------------------------------- quantkit.evaluate


def test_evaluate_records_the_report_and_lists_the_gates_it_could_not_judge(artifact_copy, tiny_model_dir, tmp_path):
    recipe = tmp_path / "gates.yaml"
    recipe.write_text(yaml.safe_dump({"gates": {"min_task_retention_pct": 1000.0, "max_perplexity_increase_pct": 15.0}}))
    with pytest.raises(GatesBreached) as err:
        quantkit.evaluate(artifact_copy, "piqa", baseline=tiny_model_dir, limit=2, dtype="float32", gate=recipe, progress=False)
    verdict, report = err.value.verdict, err.value.report
    assert [b.gate for b in verdict.breaches] == ["min_task_retention_pct"]
    assert [n.gate for n in verdict.not_judged] == ["max_perplexity_increase_pct"]  # a piqa-only run has no perplexity
    assert "FAIL min_task_retention_pct" in str(err.value) and "not judged max_perplexity_increase_pct" in str(err.value)
    # Recorded before the gates were judged, as `quantkit eval --gate` does; no report file unless asked.
    manifest = load_artifact(artifact_copy).manifest
    assert manifest["evaluations"][-1]["results"] == report["results"] and set(report["results"]) == {"piqa"}
    assert manifest["evaluations"][-1]["report"] is None and not list(artifact_copy.glob("eval-report*"))
    assert "| piqa | acc_norm |" in (artifact_copy / CARD_NAME).read_text()


def test_evaluate_refuses_bad_input_before_running_anything(artifact_copy, tiny_model_dir):
    with pytest.raises(QuantkitError, match="nosuchtask"):
        quantkit.evaluate(artifact_copy, "nosuchtask", baseline=tiny_model_dir, progress=False)
    with pytest.raises(QuantkitError, match="needs thresholds"):  # the artifact's recipe has no gates
        quantkit.evaluate(artifact_copy, "piqa", baseline=tiny_model_dir, gate=True, progress=False)
    assert "evaluations" not in read_manifest(artifact_copy)
