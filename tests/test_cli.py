"""`quantkit quantize` and `quantkit inspect` from the command line, including bad input."""

import json
import shutil
import time

import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import main

FAST = ["--samples", "8", "--seqlen", "64", "--search-samples", "4"]


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def assert_clean_error(code: int, output: str, *fragments: str):
    assert code == 2, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output


def test_quantize_then_inspect_a_tiny_model_in_seconds(tiny_model_dir, tmp_path):
    out = tmp_path / "tiny-awq"
    start = time.perf_counter()
    code, output = run("quantize", tiny_model_dir, "-o", out, "--group-size", "32", *FAST)
    assert code == 0, output
    assert time.perf_counter() - start < 60
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["recipe"]["quantization"]["method"] == "awq"
    assert manifest["calibration"]["samples"] == 8 and len(manifest["calibration"]["tokens_sha256"]) == 64
    assert len(manifest["layers"]) == 2 * 7 and manifest["peak_rss_bytes"] > 0
    assert manifest["source"]["weights_sha256"]

    code, output = run("inspect", out)
    assert code == 0, output
    assert "awq 4-bit, group 32" in output
    assert "model.layers.1.mlp.down_proj" in output
    assert "verification  passed" in output


def test_rtn_needs_no_calibration_and_uses_the_same_packing(tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir, "-o", tmp_path / "rtn", "--method", "rtn", "--group-size", "64")
    assert code == 0, output
    manifest = json.loads((tmp_path / "rtn" / "quantkit.json").read_text())
    assert manifest["calibration"] is None
    assert json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization_config"]["group_size"] == 64


def test_gptq_rounding_changes_only_the_codes(tiny_model_dir, tmp_path):
    """The first block sees the same inputs in both runs, so its search, scales and zero points are the
    nearest-rounding run's, bit for bit; only codes differ (later blocks see the quantized blocks' outputs)."""
    from conftest import read_safetensors_dir

    tensors = {}
    for rounding in ("nearest", "gptq"):
        out = tmp_path / rounding
        code, output = run("quantize", tiny_model_dir, "-o", out, "--group-size", "32", "--rounding", rounding, *FAST)
        assert code == 0, output
        assert json.loads((out / "quantkit.json").read_text())["recipe"]["quantization"]["rounding"] == rounding
        inspected = run("inspect", out)[1]
        assert "verification  passed" in inspected
        assert {"nearest": "codes rounded to nearest", "gptq": "codes rounded by GPTQ in act-order"}[rounding] in inspected
        tensors[rounding] = read_safetensors_dir(out)
    nearest, gptq = tensors["nearest"], tensors["gptq"]
    assert nearest.keys() == gptq.keys()
    packed = [name for name in nearest if name.startswith("model.layers.0.") and name.endswith(".qweight")]
    assert len(packed) == 7
    for name in packed:
        prefix = name.removesuffix(".qweight")
        assert torch.equal(nearest[prefix + ".scales"], gptq[prefix + ".scales"]), prefix
        assert torch.equal(nearest[prefix + ".qzeros"], gptq[prefix + ".qzeros"]), prefix
    assert any(not torch.equal(nearest[name], gptq[name]) for name in packed)


def test_gptq_rounding_with_rtn_is_a_clean_error(tiny_model_dir, tmp_path):
    assert_clean_error(*run("quantize", tiny_model_dir, "-o", tmp_path / "x", "--method", "rtn", "--rounding", "gptq"), "method 'awq'")


def test_inspect_reports_a_damaged_artifact_and_fails(tiny_model_dir, tmp_path):
    out = tmp_path / "rtn"
    assert run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--group-size", "32")[0] == 0
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    code, output = run("inspect", out)
    assert code == 1
    assert "FAILED        config.json: sha256 mismatch" in output and "verification  FAILED" in output


def test_missing_model(tmp_path):
    code, output = run("quantize", tmp_path / "nope", "-o", tmp_path / "out")
    assert_clean_error(code, output, "nope")


def test_unsupported_architecture_lists_the_supported_ones(tiny_model_dir, tmp_path):
    model = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))
    code, output = run("quantize", model, "-o", tmp_path / "out")
    assert_clean_error(code, output, "'gpt2' is not supported", "llama", "mistral")


def test_group_size_that_does_not_divide_names_the_layer(tiny_model_dir, tmp_path):
    code, output = run("quantize", tiny_model_dir, "-o", tmp_path / "out", "--group-size", "128")
    assert_clean_error(code, output, "model.layers.0.self_attn.q_proj", "64 input features", "[32, 64]")


def test_empty_calibration_file(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, output = run("quantize", tiny_model_dir, "-o", tmp_path / "out", "--group-size", "32", "--calib", empty)
    assert_clean_error(code, output, "empty.txt")


def test_too_short_calibration_set_says_how_many_tokens(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words of calibration text\n")
    code, output = run("quantize", tiny_model_dir, "-o", tmp_path / "out", "--group-size", "32", "--calib", short)
    assert_clean_error(code, output, "tokens")


def test_existing_output_without_force(tiny_model_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    code, output = run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--group-size", "32")
    assert_clean_error(code, output, "already exists", "--force")


def test_bad_recipe_key(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization:\n  group_sise: 64\n")
    code, output = run("quantize", tiny_model_dir, "-o", tmp_path / "out", "--recipe", recipe)
    assert_clean_error(code, output, "group_sise", "known keys")


def test_inspect_of_something_that_is_not_an_artifact(tmp_path):
    code, output = run("inspect", tmp_path)
    assert_clean_error(code, output, "not a quantkit artifact")


@pytest.mark.parametrize("text,expected", [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("64m", 64 * 2**20), ("1000", 1000), ("1.5GB", int(1.5 * 2**30))])
def test_kv_cache_sizes_read_as_bytes(text, expected):
    from quantkit.cli import _parse_bytes

    assert _parse_bytes(text) == expected


def test_serve_rejects_an_unreadable_kv_cache_size_before_loading_anything(tiny_model_dir):
    assert_clean_error(*run("serve", tiny_model_dir, "--kv-cache-memory", "lots"), "512MiB")


def test_serve_reports_a_missing_model_as_an_error(tmp_path):
    assert_clean_error(*run("serve", tmp_path / "nope"), "not found")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_on_cuda_without_a_gpu_is_a_clear_error_before_loading_anything(tmp_path):
    assert_clean_error(*run("serve", tmp_path / "nope", "--device", "cuda"), "no CUDA device is visible")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["eval"], ["bench", "offline"], ["bench", "online", "--slo", "1", "--serve"]],
                         ids=["eval", "bench-offline", "bench-online"])
def test_every_command_that_runs_a_model_takes_device_and_refuses_cuda_without_a_gpu(tiny_model_dir, tmp_path, command):
    """--device is on eval and both benches as on serve and quantize; cuda without a GPU is named
    before anything runs (no evaluation, no workload, no server) and --device cpu is offered."""
    artifact = tmp_path / "rtn"
    assert run("quantize", tiny_model_dir, "-o", artifact, "--method", "rtn", "--group-size", "32")[0] == 0
    assert_clean_error(*run(*command, artifact, "--device", "cuda"), "use --device cpu")


def test_the_cuda_serving_options_are_documented_on_serve():
    code, output = run("serve", "--help")
    assert code == 0
    for option in ("--device", "--gpu-memory-utilization", "--enforce-eager", "--kv-cache-memory"):
        assert option in output


def test_export_writes_compressed_tensors_beside_the_artifact(tiny_model_dir, tmp_path):
    out = tmp_path / "rtn"
    assert run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--group-size", "32")[0] == 0
    code, output = run("export", out, "-o", tmp_path / "ct")
    assert code == 0, output
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert_clean_error(*run("export", out, "-o", tmp_path / "ct"), "already exists", "--force")
    # A format quantkit does not write is refused by the option itself, naming every one it does.
    assert_clean_error(*run("export", out, "-o", tmp_path / "x", "--format", "onnx"), "Invalid value for '--format'", "'onnx'",
                       "'compressed-tensors'", "'gguf'")
    assert not (tmp_path / "x").exists()


def test_quantize_resume_continues_an_interrupted_run(tiny_model_dir, tmp_path):
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    class Stop(Exception):
        pass

    def stop_after_first(done, _total, _seconds):
        if done == 1:
            raise Stop

    out = tmp_path / "rtn"
    with pytest.raises(Stop):
        quantize(tiny_model_dir, out, Recipe().with_overrides(method="rtn", group_size=32), progress=stop_after_first)
    assert_clean_error(*run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--group-size", "32"), "--resume", "--force")
    code, output = run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--group-size", "32", "--resume")
    assert code == 0, output
    assert json.loads((out / "quantkit.json").read_text())["timings"]["resumed_at_block"] == 1


# --- damage is reported, never a traceback ---------------------------------------------------


@pytest.fixture(scope="module")
def rtn_artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtn") / "art"
    assert run("quantize", tiny_model_dir, "-o", out, "--method", "rtn", "--group-size", "32")[0] == 0
    return out


@pytest.fixture
def damaged(rtn_artifact, tmp_path):
    """A fresh copy of the artifact to damage, and the name of its first decoder block's shard."""
    copy = tmp_path / "art"
    shutil.copytree(rtn_artifact, copy)
    return copy, sorted(p.name for p in copy.glob("model-*.safetensors"))[1]


def assert_inspect_fails_naming(path, name: str, *fragments: str) -> str:
    code, output = run("inspect", path)
    assert code == 1, output
    assert "Traceback" not in output
    failed = [line for line in output.splitlines() if line.startswith("FAILED") and name in line]
    assert len(failed) == 1, output
    for fragment in fragments:
        assert fragment in failed[0], output
    assert "verification  FAILED" in output
    return output


def test_inspect_reports_a_truncated_shard(damaged):
    path, shard = damaged
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[: len(data) // 2])
    assert_inspect_fails_naming(path, shard, "sha256 mismatch")


def test_inspect_reports_a_damaged_header_even_under_a_re_signed_manifest(damaged):
    path, shard = damaged
    data = bytearray((path / shard).read_bytes())
    data[8:16] = b"{garbage"  # the JSON header begins after its 8-byte length
    (path / shard).write_bytes(bytes(data))
    manifest = json.loads((path / "quantkit.json").read_text())
    from quantkit.artifact import file_sha256

    manifest["files"][shard] = file_sha256(path / shard)
    (path / "quantkit.json").write_text(json.dumps(manifest))
    assert_inspect_fails_naming(path, shard, "not a readable safetensors file")


def test_inspect_reports_a_link_to_a_device_without_reading_it(damaged):
    path, shard = damaged
    (path / shard).unlink()
    (path / shard).symlink_to("/dev/zero")
    assert_inspect_fails_naming(path, shard, "not a regular file")


def test_inspect_names_an_unlisted_weight_file(damaged):
    from safetensors.torch import save_file

    path, _ = damaged
    save_file({"model.embed_tokens.weight": torch.zeros(8, 8, dtype=torch.float16)}, str(path / "extra.safetensors"))
    output = assert_inspect_fails_naming(path, "extra.safetensors", "does not list", "remove it")
    assert "verification  FAILED" in output


def test_serve_on_an_invalid_config_json_is_a_clear_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')
    assert_clean_error(*run("serve", broken), "config.json is not valid JSON")


def test_artifact_files_are_readable_by_all(rtn_artifact):
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in rtn_artifact.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
