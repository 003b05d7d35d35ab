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
