"""Export to compressed-tensors: checked against the compressed-tensors library and transformers.

The exported weights are read back by the library's own code (its pack-quantized decompressor,
its model-free checkpoint dequantizer, and transformers' compressed-tensors loader) and must
dequantize to exactly what quantkit's AWQ reader produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_safetensors_dir
from safetensors import safe_open

from quantkit.artifact import (
    INDEX_NAME,
    MANIFEST_NAME,
    artifact_tensors,
    awq_quantization_config,
    dequantized_state_dict,
    file_sha256,
    load_artifact,
    write_artifact,
)
from quantkit.awq import AWQSettings, quantize_model
from quantkit.errors import QuantkitError
from quantkit.export import (
    EXPORT_MANIFEST_NAME,
    awq_to_pack_quantized,
    compressed_tensors_config,
    export_artifact,
    ignore_list,
    pack_int4_rows,
)
from quantkit.models import get_adapter
from quantkit.pack import pack_awq
from quantkit.quantizer import compute_qparams, quantize
from quantkit.sources import load_model

GROUP = 32
SETTINGS = AWQSettings(method="rtn", compute_dtype="float32", group_size=GROUP)
LINEAR_WITH_BIAS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama's attention_bias=True


@pytest.fixture(scope="module")
def quantized_tensors(tiny_model_dir):
    """RTN-quantized tiny Llama tensors, plus random fp16 biases on the attention linears."""
    model = load_model(tiny_model_dir)
    result = quantize_model(model, get_adapter("llama"), SETTINGS)
    tensors = artifact_tensors(model.state_dict(), result.linears, tied_lm_head=True)
    g = torch.Generator().manual_seed(1)
    for module in result.linears:
        if module.endswith(LINEAR_WITH_BIAS):
            out_features = tensors[f"{module}.scales"].shape[1]
            tensors[f"{module}.bias"] = torch.randn(out_features, generator=g).half()
    return dict(sorted(tensors.items()))


def make_artifact(tensors, tiny_model_dir: Path, out: Path, **kwargs) -> Path:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["attention_bias"] = True
    config["quantization_config"] = awq_quantization_config(GROUP)
    return write_artifact(out, tensors, config, {"note": "export test"}, tiny_model_dir, **kwargs)


@pytest.fixture(scope="module")
def artifact_dir(quantized_tensors, tiny_model_dir, tmp_path_factory) -> Path:
    return make_artifact(quantized_tensors, tiny_model_dir, tmp_path_factory.mktemp("src") / "art")


@pytest.fixture(scope="module")
def exported(artifact_dir, tmp_path_factory) -> Path:
    return export_artifact(artifact_dir, tmp_path_factory.mktemp("exp") / "ct")


def quantized_modules(tensors) -> list[str]:
    return sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))


# --- the mapping, against the library's own packing and its own AWQ converter ---------------


def random_triplet(out_features: int = 48, in_features: int = 128, seed: int = 0):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    params = compute_qparams(w, GROUP)
    return pack_awq(quantize(w, params), params)


def test_packing_is_compressed_tensors_pack_to_int32():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 16, (6, 12), generator=torch.Generator().manual_seed(0))  # 12: a partial word
    signed = (codes - 8).to(torch.int8)  # the library's signed int4 convention
    assert torch.equal(pack_int4_rows(codes), pack_to_int32(signed, 4))
    assert torch.equal(pack_int4_rows(codes.t()).t(), pack_to_int32(signed, 4, packed_dim=0))
    # Hand-worked: element k of a row sits at bits 4k..4k+3.
    assert pack_int4_rows(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])).item() == 0x76543210
    assert pack_int4_rows(torch.tensor([[15, 0, 0, 0, 0, 0, 0, 15]])).item() == 0xF000000F - 2**32


def test_mapping_matches_the_librarys_autoawq_converter():
    """compressed-tensors ships its own AWQ->pack-quantized converter: same tensors, bit for bit."""
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    triplet = random_triplet()
    theirs = AutoAWQConverter(group_size=GROUP).process({f"m.{k}": v for k, v in triplet.items()})
    ours = awq_to_pack_quantized(**triplet)
    assert set(theirs) == {f"m.{k}" for k in ours}
    for name, tensor in ours.items():
        assert theirs[f"m.{name}"].dtype == tensor.dtype, name
        assert torch.equal(theirs[f"m.{name}"], tensor), name


def test_layout_shapes_and_dtypes_are_what_vllm_allocates(exported, quantized_tensors):
    tensors = read_safetensors_dir(exported)
    for module in quantized_modules(quantized_tensors):
        in_features, packed_out = quantized_tensors[f"{module}.qweight"].shape
        out_features = packed_out * 8
        assert tensors[f"{module}.weight_packed"].dtype == torch.int32
        assert tensors[f"{module}.weight_packed"].shape == (out_features, in_features // 8)
        assert tensors[f"{module}.weight_scale"].dtype == torch.float16
        assert tensors[f"{module}.weight_scale"].shape == (out_features, in_features // GROUP)
        assert tensors[f"{module}.weight_zero_point"].dtype == torch.int32
        assert tensors[f"{module}.weight_zero_point"].shape == (out_features // 8, in_features // GROUP)
        assert tensors[f"{module}.weight_shape"].dtype == torch.int64
        assert tensors[f"{module}.weight_shape"].tolist() == [out_features, in_features]
        assert not any(f"{module}.{s}" in tensors for s in ("qweight", "qzeros", "scales", "weight"))
    # Everything that was not a quantized triplet is copied byte for byte (biases included).
    copied = {n: t for n, t in quantized_tensors.items() if not n.endswith((".qweight", ".qzeros", ".scales"))}
    assert any(n.endswith(".bias") for n in copied)
    for name, tensor in copied.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name


# --- round trip through the library: exact equality with quantkit's dequantization ---------------


def test_library_checkpoint_dequantizer_reproduces_quantkit_fp16_exactly(exported, artifact_dir):
    """The library's model-free reader, on the exported directory, with the stored fp16 scales."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    reader = CompressedTensorsDequantizer(str(exported), dtype=torch.float16)
    theirs = reader.validate(read_safetensors_dir(exported))  # validate = decompress + no leftover qparams
    ours = dequantized_state_dict(load_artifact(artifact_dir), torch.float16)
    assert theirs.keys() == ours.keys()
    assert sum(n.endswith("_proj.weight") for n in ours) == 14  # 7 linears x 2 layers
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name


def test_pack_quantized_decompressor_reproduces_quantkit_fp32_exactly(exported, artifact_dir):
    """The same in fp32: with fp32 scales the library's (q - zp) * s is exact, as is quantkit's."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(json.loads((exported / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    tensors = read_safetensors_dir(exported)
    ours = dequantized_state_dict(load_artifact(artifact_dir), torch.float32)
    modules = sorted(n[: -len(".weight_packed")] for n in tensors if n.endswith(".weight_packed"))
    assert len(modules) == 14
    for module in modules:
        local = {k: tensors[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
        local["weight_scale"] = local["weight_scale"].float()
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert weight.dtype == torch.float32 and torch.equal(weight, ours[f"{module}.weight"]), module
        assert weight.abs().sum() > 0 and weight.unique().numel() > 16  # real random weights, not zeros


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # dequantize=True is the point
def test_transformers_loads_the_export_with_identical_weights(exported, artifact_dir):
    """transformers + compressed-tensors, the llm-compressor load path, dequantizing on load.

    (Not dequantize=False: in compressed-tensors 0.20 that path pre-allocates weight_zero_point
    unpacked, [out, groups], and rejects the packed [out / 8, groups] tensor that the library's
    own compressor, vLLM and this export all use: a size mismatch for any asymmetric checkpoint.)
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, info = AutoModelForCausalLM.from_pretrained(
        exported, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float16, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    ours = dequantized_state_dict(load_artifact(artifact_dir), torch.float16)
    for name, tensor in ours.items():
        assert torch.equal(loaded[name], tensor), name


def test_sharded_artifact_exports_to_matching_shards(quantized_tensors, tiny_model_dir, tmp_path):
    source = make_artifact(quantized_tensors, tiny_model_dir, tmp_path / "sharded", max_shard_bytes=20_000)
    out = export_artifact(source, tmp_path / "ct")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in source.glob("*.safetensors")) and len(shards) > 2
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as handle:
            assert name in handle.keys()
    tensors = read_safetensors_dir(out)
    assert set(index["weight_map"]) == set(tensors)
    single = read_safetensors_dir(export_artifact(make_artifact(quantized_tensors, tiny_model_dir, tmp_path / "one"), tmp_path / "ct1"))
    assert tensors.keys() == single.keys()
    assert all(torch.equal(tensors[n], t) for n, t in single.items())


# --- configs ----------------------------------------------------------------------------------


def test_exported_config_parses_with_compressed_tensors_and_transformers(exported, artifact_dir, tmp_path):
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig

    config = json.loads((exported / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]

    parsed = QuantizationConfig.model_validate(qc)
    (scheme,) = parsed.config_groups.values()
    assert scheme.targets == ["Linear"] and scheme.format == "pack-quantized"
    w = scheme.weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.group_size) == (4, "int", False, "group", GROUP)
    assert scheme.input_activations is None and scheme.output_activations is None

    hf = CompressedTensorsConfig.from_dict(qc)
    assert hf.quant_method == "compressed-tensors"
    assert hf.quantization_config.config_groups["group_0"].weights == w

    # The top-level keys are the ones the library's own writer (ModelCompressor.update_config) emits.
    (tmp_path / "config.json").write_text("{}")
    ModelCompressor(quantization_config=parsed).update_config(str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == qc

    # Everything but quantization_config is the source artifact's config, untouched.
    source = json.loads((artifact_dir / "config.json").read_text())
    assert source["quantization_config"]["quant_method"] == "awq"
    assert {k: v for k, v in config.items() if k != "quantization_config"} == {
        k: v for k, v in source.items() if k != "quantization_config"
    }


def test_modules_to_not_convert_become_ignore_patterns():
    qc = compressed_tensors_config(64, ["lm_head", "re:.*gate.*"])
    assert qc["ignore"] == ["lm_head", "re:.*gate.*"] and qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert ignore_list({"modules_to_not_convert": ["lm_head", "mlp.gate"]}) == ["lm_head", r"re:.*mlp\.gate.*"]
    assert ignore_list({"modules_to_not_convert": None}) == ["lm_head"]


def test_awq_artifact_config_parses_as_transformers_awq_config(artifact_dir):
    """The *source* artifact's config, as transformers reads it.

    Parsing needs no AWQ backend: AwqConfig's constructor only validates fields; a kernel
    package (gptqmodel / autoawq) is needed only once a model is actually loaded with it.
    transformers 5 renamed AWQ's `version` to `format` and accepts `version` as a legacy alias.
    """
    from transformers import AwqConfig

    qc = json.loads((artifact_dir / "config.json").read_text())["quantization_config"]
    parsed = AwqConfig.from_dict(qc)
    assert parsed.quant_method == "awq"
    assert parsed.bits == 4 and parsed.group_size == GROUP and parsed.zero_point is True
    assert parsed.format == "gemm" and parsed.to_dict()["version"] == "gemm"
    assert parsed.modules_to_not_convert == ["lm_head"]


# --- manifest and tokenizer -------------------------------------------------------------------


def test_export_manifest_ties_the_output_to_its_source(exported, artifact_dir):
    manifest = json.loads((exported / EXPORT_MANIFEST_NAME).read_text())
    source_manifest = json.loads((artifact_dir / MANIFEST_NAME).read_text())
    assert manifest["format"] == "compressed-tensors"
    assert manifest["source"]["path"] == str(artifact_dir.resolve())
    assert manifest["source"]["files"] == source_manifest["files"]
    assert manifest["source"]["manifest_sha256"] == file_sha256(artifact_dir / MANIFEST_NAME)
    written = {p.name for p in exported.iterdir()} - {EXPORT_MANIFEST_NAME}
    assert set(manifest["files"]) == written
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= written
    assert all(manifest["files"][n] == file_sha256(exported / n) for n in written)
    assert (exported / "tokenizer.json").read_bytes() == (artifact_dir / "tokenizer.json").read_bytes()
    assert not (exported / MANIFEST_NAME).exists()  # not a quantkit artifact: no quantkit.json


# --- bad input and atomicity ------------------------------------------------------------------


def test_unknown_format_lists_the_supported_ones(artifact_dir, tmp_path):
    with pytest.raises(QuantkitError, match=r"unknown export format 'onnx'; supported formats: compressed-tensors, gguf\."):
        export_artifact(artifact_dir, tmp_path / "out", fmt="onnx")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force_and_force_replaces(artifact_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(QuantkitError, match="already exists; pass --force"):
        export_artifact(artifact_dir, out)
    assert (out / "stale.txt").exists()
    export_artifact(artifact_dir, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup left


def test_output_may_not_replace_the_source_even_with_force(artifact_dir):
    for target in (artifact_dir, artifact_dir.parent):
        with pytest.raises(QuantkitError, match="would overwrite the source artifact"):
            export_artifact(artifact_dir, target, force=True)
    assert load_artifact(artifact_dir)  # untouched, hashes still verify


def test_a_non_artifact_directory_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(QuantkitError, match=r"is not a quantkit artifact \(no quantkit.json\)"):
        export_artifact(tiny_model_dir, tmp_path / "out")
    with pytest.raises(QuantkitError, match="does not exist or is not a directory"):
        export_artifact(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_source_is_refused(quantized_tensors, tiny_model_dir, tmp_path):
    source = make_artifact(quantized_tensors, tiny_model_dir, tmp_path / "art")
    data = bytearray((source / "model.safetensors").read_bytes())
    data[-100] ^= 0x01
    (source / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(QuantkitError, match="failed verification"):
        export_artifact(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unsupported_awq_variant_is_refused(quantized_tensors, tiny_model_dir, tmp_path):
    config = {"quantization_config": {**awq_quantization_config(GROUP), "zero_point": False, "version": "gemv"}}
    source = write_artifact(tmp_path / "art", quantized_tensors, config, {}, tiny_model_dir)
    with pytest.raises(QuantkitError, match=r"quantization_config has \{'zero_point': False, 'version': 'gemv'\}"):
        export_artifact(source, tmp_path / "out")


def test_a_linear_missing_part_of_its_triplet_is_refused(quantized_tensors, tiny_model_dir, tmp_path):
    broken = {n: t for n, t in quantized_tensors.items() if n != "model.layers.1.mlp.up_proj.qzeros"}
    source = make_artifact(broken, tiny_model_dir, tmp_path / "art")  # hashes are fine: the damage is upstream
    with pytest.raises(QuantkitError, match=r"model\.layers\.1\.mlp\.up_proj lacks qzeros"):
        export_artifact(source, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_an_interrupted_export_leaves_nothing_behind(artifact_dir, tmp_path, monkeypatch):
    import quantkit.export as export_module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # dies after the shards and config are written

    monkeypatch.setattr(export_module, "file_sha256", fail)
    with pytest.raises(KeyboardInterrupt):
        export_artifact(artifact_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_forced_export_keeps_the_previous_output(artifact_dir, tmp_path, monkeypatch):
    import quantkit.export as export_module

    out = export_artifact(artifact_dir, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "save_shard", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_artifact(artifact_dir, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
