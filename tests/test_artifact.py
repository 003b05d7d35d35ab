"""The artifact: AWQ-compatible config, bit-identical reload, hash verification, atomic writes."""

import json

import pytest
import torch

from quantkit.artifact import (
    MANIFEST_NAME,
    artifact_tensors,
    awq_quantization_config,
    dequantized_state_dict,
    load_artifact,
    load_dequantized_model,
    verify_artifact,
    write_artifact,
)
from quantkit.awq import AWQSettings, quantize_model
from quantkit.errors import QuantkitError
from quantkit.models import get_adapter
from quantkit.sources import load_model

SETTINGS = AWQSettings(compute_dtype="float32", search_samples=4, group_size=32)


@pytest.fixture(scope="module")
def quantized(tiny_model_dir):
    """A tiny model quantized in memory, its tensors, and the artifact written from them."""
    model = load_model(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, get_adapter("llama"), SETTINGS, ids)
    tensors = artifact_tensors(model.state_dict(), result.linears, tied_lm_head=True)
    return model, result, tensors


@pytest.fixture
def artifact_dir(quantized, tiny_model_dir, tmp_path):
    model, _, tensors = quantized
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = awq_quantization_config(SETTINGS.group_size)
    return write_artifact(tmp_path / "art", tensors, config, {"note": "test"}, tiny_model_dir)


def test_layout_names_shapes_and_dtypes(quantized):
    model, result, tensors = quantized
    q_proj = "model.layers.0.self_attn.q_proj"
    assert f"{q_proj}.weight" not in tensors
    assert tensors[f"{q_proj}.qweight"].dtype == torch.int32
    assert tensors[f"{q_proj}.qweight"].shape == (64, 64 // 8)  # [in, out / 8]
    assert tensors[f"{q_proj}.qzeros"].shape == (64 // 32, 64 // 8)  # [in / group, out / 8]
    assert tensors[f"{q_proj}.scales"].shape == (64 // 32, 64) and tensors[f"{q_proj}.scales"].dtype == torch.float16
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16  # embeddings stay unquantized
    assert "lm_head.weight" not in tensors  # tied to the embeddings


def test_reload_is_bit_identical_and_dequantizes_to_the_quantized_model(quantized, artifact_dir):
    model, _, tensors = quantized
    loaded = load_artifact(artifact_dir).tensors()
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name
    dense = dequantized_state_dict(load_artifact(artifact_dir))
    for name, weight in model.state_dict().items():
        if name.endswith("_proj.weight"):
            assert torch.equal(dense[name], weight), name  # codes x fp16 scales, exactly


def test_dequantized_model_reproduces_the_in_memory_logits(quantized, artifact_dir):
    model, _, _ = quantized
    reloaded = load_dequantized_model(load_artifact(artifact_dir))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # The artifact stores norms and embeddings in fp16, so compare at fp16 precision.
        torch.testing.assert_close(reloaded(ids).logits, model.half().float()(ids).logits, rtol=2e-3, atol=2e-3)


def test_config_is_what_awq_loaders_parse(artifact_dir):
    config = json.loads((artifact_dir / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": ["lm_head"],
    }
    from transformers import AwqConfig

    parsed = AwqConfig.from_dict(config["quantization_config"])
    assert parsed.bits == 4 and parsed.group_size == 32 and parsed.zero_point


def test_manifest_hashes_every_file_and_tokenizer_is_included(artifact_dir):
    manifest = json.loads((artifact_dir / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert all(check.ok for check in verify_artifact(artifact_dir))


def test_a_flipped_byte_is_caught_on_load(artifact_dir):
    shard = artifact_dir / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(QuantkitError, match="model.safetensors: sha256 mismatch"):
        load_artifact(artifact_dir)
    assert not all(c.ok for c in verify_artifact(artifact_dir))


def test_existing_output_needs_force_and_force_replaces(quantized, tiny_model_dir, artifact_dir):
    _, _, tensors = quantized
    config = json.loads((artifact_dir / "config.json").read_text())
    with pytest.raises(QuantkitError, match="--force"):
        write_artifact(artifact_dir, tensors, config, {"run": 2}, tiny_model_dir)
    write_artifact(artifact_dir, tensors, config, {"run": 2}, tiny_model_dir, force=True)
    assert json.loads((artifact_dir / MANIFEST_NAME).read_text())["run"] == 2
    assert [p.name for p in artifact_dir.parent.iterdir()] == ["art"]  # no temp or backup left


def test_an_interrupted_write_leaves_no_artifact(quantized, tiny_model_dir, tmp_path, monkeypatch):
    _, _, tensors = quantized
    import quantkit.artifact as artifact_module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_module, "file_sha256", fail)  # dies after the shards are written
    with pytest.raises(KeyboardInterrupt):
        write_artifact(tmp_path / "out", tensors, {"quantization_config": {}}, {}, tiny_model_dir)
    assert list(tmp_path.iterdir()) == []


def test_sharded_artifacts_have_an_index_and_reload(quantized, tiny_model_dir, tmp_path):
    _, _, tensors = quantized
    config = {"quantization_config": awq_quantization_config(32)}
    out = write_artifact(tmp_path / "sharded", tensors, config, {}, tiny_model_dir, max_shard_bytes=20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = load_artifact(out).tensors()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


# ---------------------------------------------------------------------------- the manifest is the one list of files


def _rehash(artifact_dir, *names):
    """Update the manifest's hashes of `names`, as someone who edits files and re-signs the manifest would."""
    from quantkit.artifact import file_sha256

    manifest = json.loads((artifact_dir / MANIFEST_NAME).read_text())
    manifest["files"].update({n: file_sha256(artifact_dir / n) for n in names})
    (artifact_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_an_unlisted_weight_file_is_refused_and_never_read(artifact_dir):
    from safetensors.torch import save_file

    real = load_artifact(artifact_dir).tensors()["model.embed_tokens.weight"]
    # A stray shard holding zeroed embeddings would override the real ones if any loader globbed *.safetensors.
    save_file({"model.embed_tokens.weight": torch.zeros_like(real)}, str(artifact_dir / "extra.safetensors"))
    with pytest.raises(QuantkitError, match=r"extra\.safetensors: unlisted: a weight file that quantkit\.json does not list.*remove it"):
        load_artifact(artifact_dir)
    checks = {c.name: c for c in verify_artifact(artifact_dir)}
    assert checks["extra.safetensors"].status == "UNLISTED" and checks["model.safetensors"].ok
    (artifact_dir / "extra.safetensors").unlink()
    assert torch.equal(load_artifact(artifact_dir).tensors()["model.embed_tokens.weight"], real)


def test_the_runtime_refuses_an_artifact_with_an_unlisted_weight_file(artifact_dir):
    from quantkit.runtime.weights import load_weights

    (artifact_dir / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(QuantkitError, match=r"pytorch_model\.bin: unlisted"):
        load_weights(artifact_dir)


def test_only_the_shards_the_manifest_lists_are_read(artifact_dir):
    artifact = load_artifact(artifact_dir)
    (artifact_dir / "notes.txt").write_text("not a weight file: allowed beside the artifact, never read")
    assert [p.name for p in load_artifact(artifact_dir).weight_files] == ["model.safetensors"]
    assert artifact.weight_map == load_artifact(artifact_dir).weight_map


def test_a_manifest_without_files_is_refused_not_served_unverified(artifact_dir):
    manifest = json.loads((artifact_dir / MANIFEST_NAME).read_text())
    del manifest["files"]
    (artifact_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(QuantkitError, match="lists no files .*refused rather than served unverified"):
        load_artifact(artifact_dir)


@pytest.mark.parametrize("name", ["../config.json", "/etc/passwd", "sub/model.safetensors"])
def test_a_manifest_may_list_only_files_of_its_own_directory(artifact_dir, name):
    manifest = json.loads((artifact_dir / MANIFEST_NAME).read_text())
    manifest["files"][name] = "0" * 64
    (artifact_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(QuantkitError, match="which is not a file of"):
        load_artifact(artifact_dir)


def test_a_declared_group_size_that_the_tensors_contradict_is_refused(artifact_dir):
    config = json.loads((artifact_dir / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64  # the tensors are group 32
    (artifact_dir / "config.json").write_text(json.dumps(config))
    _rehash(artifact_dir, "config.json")  # hashes alone would not catch a consistent edit
    with pytest.raises(QuantkitError, match="the scales' shapes imply group size 32 .* says 64"):
        load_artifact(artifact_dir)


def test_a_config_that_is_not_json_is_a_clear_error(artifact_dir):
    (artifact_dir / "config.json").write_text("{not json")
    _rehash(artifact_dir, "config.json")
    with pytest.raises(QuantkitError, match=r"config\.json is not valid JSON"):
        load_artifact(artifact_dir)


def test_a_listed_file_that_is_a_device_is_not_read(artifact_dir):
    (artifact_dir / "model.safetensors").unlink()
    (artifact_dir / "model.safetensors").symlink_to("/dev/zero")  # hashing it would never end
    (check,) = [c for c in verify_artifact(artifact_dir) if c.name == "model.safetensors"]
    assert check.status == "FAILED" and "not a regular file (a link to /dev/zero)" in check.problem


def test_files_are_readable_by_all(artifact_dir):
    modes = {p.name: p.stat().st_mode & 0o777 for p in artifact_dir.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def test_evaluations_are_recorded_without_breaking_verification(artifact_dir):
    from quantkit.artifact import append_to_manifest

    append_to_manifest(artifact_dir, "evaluations", {"results": {"piqa": 0.6}})
    assert load_artifact(artifact_dir).manifest["evaluations"] == [{"results": {"piqa": 0.6}}]
    assert not list(artifact_dir.glob("*.tmp"))
