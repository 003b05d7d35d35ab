"""AutoAWQ GEMM checkpoints (no quantkit.json) load, generate, score and serve exactly as their
dequantized weights say; anything quantkit cannot serve exactly is refused with the reason.

The fixture packer below is written from the format's description, not from quantkit/pack.py:
qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out]; nibble slot i
(bits 4i..4i+3) of word j holds column 8j + ORDER[i]; W.T[k, n] = (q[k, n] - z[k//g, n]) * s[k//g, n].
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from conftest import hf_greedy, serving
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.artifact import file_sha256
from quantkit.errors import QuantkitError
from quantkit.runtime.engine import LLM, EngineConfig, LLMEngine
from quantkit.runtime.sampling import SamplingParams
from quantkit.runtime.weights import load_weights

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble slot i holds column 8j + ORDER[i]
GROUP = 32
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DENSE_MODULE = "model.layers.1.mlp.down_proj"  # listed in modules_to_not_convert: stays fp16
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


# ---------------------------------------------------------------------------- the fixture packer


def pack_words(codes: torch.Tensor) -> torch.Tensor:
    """Codes [rows, cols] in [0, 15] -> int32 words [rows, cols / 8] (two's complement)."""
    rows, cols = codes.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for slot, column in enumerate(ORDER):
        words += codes[:, column::8].to(torch.int64) << (4 * slot)  # word j gets column 8j + column
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_linear(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """q [out, in], z and s [out, in/g] (nn.Linear orientation) -> the three GEMM tensors (transposed)."""
    return {"qweight": pack_words(q.t()), "qzeros": pack_words(z.t()), "scales": s.t().contiguous().to(torch.float16)}


def dense_weight(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W [out, in] = (q - z) * s with each group's zero and scale repeated over its input features."""
    g = q.shape[1] // z.shape[1]
    return (q.float() - z.float().repeat_interleave(g, dim=1)) * s.float().repeat_interleave(g, dim=1)


def test_fixture_packer_matches_hand_worked_words():
    # Columns c0..c7 = 1,2,3,4,5,6,7,9. Slots 0..7 hold columns 0,2,4,6,1,3,5,7 -> nibbles (slot 7 first)
    # 9 6 4 2 7 5 3 1 = 0x96427531 = 2520937777 unsigned; top nibble 9 >= 8 so as int32: 2520937777 - 2**32.
    assert pack_words(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 9]])).tolist() == [[-1774029519]]
    # Columns 0..7 -> nibbles 7 5 3 1 6 4 2 0 = 0x75316420 = 1966171168 (positive).
    assert pack_words(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])).tolist() == [[1966171168]]
    # Two words in a row: the second word's columns are 8..15.
    assert pack_words(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7, 9]])).tolist() == [[1966171168, -1774029519]]


def test_fixture_packer_and_quantkit_read_a_hand_worked_8x2_matrix():
    from quantkit.pack import dequantize_awq  # quantkit's reader, checked against the hand values

    # out = 8, in = 2, one group of 2: q[n] = (n, 15 - n), z = 8, s = 0.5 (even n) / 0.25 (odd n).
    q = torch.tensor([[n, 15 - n] for n in range(8)])
    z = torch.full((8, 1), 8)
    s = torch.tensor([[0.5], [0.25]] * 4)
    packed = pack_linear(q, z, s)
    # qweight row k=0 holds q[:, 0] = 0..7 -> 0x75316420; row k=1 holds 15..8 = ~(0..7) -> ~0x75316420 = -1966171169.
    assert packed["qweight"].tolist() == [[1966171168], [-1966171169]]
    # Eight zeros of 8 -> 0x88888888 = 2290649224 - 2**32 = -2004318072.
    assert packed["qzeros"].tolist() == [[-2004318072]]
    assert packed["scales"].tolist() == [[0.5, 0.25] * 4]
    # W[n] = ((n - 8) * s, (7 - n) * s), worked out by hand:
    expected = torch.tensor([
        [-4.0, 3.5], [-1.75, 1.5], [-3.0, 2.5], [-1.25, 1.0],
        [-2.0, 1.5], [-0.75, 0.5], [-1.0, 0.5], [-0.25, 0.0],
    ])
    assert torch.equal(dense_weight(q, z, s), expected)
    assert torch.equal(dequantize_awq(packed["qweight"], packed["qzeros"], packed["scales"]), expected)


# ---------------------------------------------------------------------------- an AutoAWQ-style checkpoint


def write_awq_checkpoint(out: Path, tiny_dir: Path, seed: int = 0, group_sizes: dict[str, int] | None = None,
                         settings: dict | None = None, config_qc: dict | None = None, shards: int = 2) -> dict[str, torch.Tensor]:
    """The tiny Llama as AutoAWQ writes it: random codes for every decoder linear (but DENSE_MODULE), fp16
    other tensors, quant_config.json (AutoAWQ's names), sharded safetensors with an index, the tokenizer.
    Returns the fp32 state dict the checkpoint encodes (nn.Linear layout)."""
    out.mkdir(parents=True)
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        source = {name: f.get_tensor(name) for name in f.keys()}
    config = json.loads((tiny_dir / "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    quantized = {f"model.layers.{i}.{lin}" for i in range(config["num_hidden_layers"]) for lin in LINEARS} - {DENSE_MODULE}
    for name, t in source.items():
        module = name.removesuffix(".weight")
        if module not in quantized:
            tensors[name] = t.to(torch.float16)
            reference[name] = tensors[name].float()
            continue
        out_f, in_f = t.shape
        g = (group_sizes or {}).get(module, GROUP)
        q = torch.randint(0, 16, (out_f, in_f), generator=gen)
        z = torch.randint(0, 16, (out_f, in_f // g), generator=gen)
        s = (0.002 + 0.004 * torch.rand(out_f, in_f // g, generator=gen)).to(torch.float16)
        for suffix, packed in pack_linear(q, z, s).items():
            tensors[f"{module}.{suffix}"] = packed
        reference[name] = dense_weight(q, z, s)
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else ["model.safetensors"]
    weight_map = {name: files[i * len(files) // len(names)] for i, name in enumerate(names)}
    for file in files:
        save_file({n: tensors[n].contiguous() for n in names if weight_map[n] == file}, str(out / file), metadata={"format": "pt"})
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    if config_qc is not None:
        config["quantization_config"] = config_qc
    (out / "config.json").write_text(json.dumps(config))
    quant_config = {"zero_point": True, "q_group_size": GROUP, "w_bit": 4, "version": "GEMM", "modules_to_not_convert": [DENSE_MODULE.removeprefix("model.")]}
    if settings is not None:
        quant_config = {**quant_config, **settings}
    (out / "quant_config.json").write_text(json.dumps(quant_config))
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "generation_config.json":
            shutil.copy2(f, out / f.name)
    return reference


@pytest.fixture(scope="module")
def awq(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("autoawq") / "tiny-awq"
    reference = write_awq_checkpoint(out, tiny_model_dir)
    return {"path": out, "reference": reference}


@pytest.fixture(scope="module")
def hf_reference(awq, tiny_model_dir):
    """transformers' Llama holding the dequantized weights, fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).float().eval()
    missing, unexpected = model.load_state_dict(awq["reference"], strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embeddings
    model.tie_weights()
    return model


def test_load_weights_reads_the_sharded_checkpoint_as_quantized(awq):
    from quantkit.autoawq import is_autoawq_checkpoint

    assert is_autoawq_checkpoint(awq["path"])
    weights = load_weights(awq["path"])
    assert weights.quantized
    assert weights.config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["layers.1.mlp.down_proj"],
    }
    assert weights.tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert f"{DENSE_MODULE}.weight" in weights.tensors and f"{DENSE_MODULE}.qweight" not in weights.tensors


def test_engine_greedy_tokens_equal_transformers_on_the_dequantized_weights(awq, hf_reference):
    from quantkit.kernels.linear import DenseLinear, QuantLinear

    llm = LLM(str(awq["path"]), dtype="float32", num_blocks=32)
    layers = llm.engine.runner.model.layers
    assert isinstance(layers[0].self_attn.qkv_proj, QuantLinear) and isinstance(layers[1].mlp.down_proj, DenseLinear)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (1, 9, 30)]
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY)):
        assert out.token_ids == hf_greedy(hf_reference, prompt, GREEDY.max_tokens)


def test_bf16_fused_kernels_read_the_foreign_layout(awq, hf_reference):
    from quantkit.runtime.model_runner import ModelRunner, StepInput

    tokens = torch.randint(0, 500, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = hf_reference(torch.tensor([tokens])).logits[0].double()
    got = ModelRunner(load_weights(awq["path"]), torch.bfloat16, 16, num_blocks=4).score(StepInput([tokens], [0], [[1, 0]], [True]))
    assert float((got.double() - expected).norm() / expected.norm()) < 3e-2


def test_eval_model_scores_loglikelihoods_of_the_checkpoint(awq, hf_reference):
    from types import SimpleNamespace

    from quantkit.evaluate import QuantkitLM

    lm = QuantkitLM(str(awq["path"]), dtype="float32", max_length=64, batch_tokens=256)
    pairs = [("The cat sat on the", " mat"), ("Once upon a time", " there was a king")]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    for (context, continuation), (logprob, _greedy) in zip(pairs, got):
        ctx, cont = lm._encode_pair(context, continuation)
        with torch.no_grad():
            logp = hf_reference(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
        expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)


def _dir_digest(path: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(path.iterdir())}


def test_eval_bookkeeping_never_writes_into_a_foreign_checkpoint(awq):
    from quantkit.evaluate import describe_model, open_candidate, record_in_manifest
    from quantkit.sources import weights_sha256

    before = _dir_digest(awq["path"])
    candidate = open_candidate(awq["path"])
    assert candidate.foreign and candidate.source_model is None and candidate.gates == {}
    assert awq["path"] not in candidate.report_path.parents
    record = describe_model(str(awq["path"]), "float32")
    assert record["format"] == "autoawq" and record["weights_sha256"] == weights_sha256(awq["path"])
    assert record["quantization"]["group_size"] == GROUP
    assert record_in_manifest(awq["path"], {}, "elsewhere.json") is False
    assert _dir_digest(awq["path"]) == before


def test_inspect_prints_the_awq_settings_of_a_foreign_checkpoint(awq):
    from quantkit.inspection import inspect_artifact

    lines: list[str] = []
    assert inspect_artifact(awq["path"], echo=lines.append)
    text = "\n".join(lines)
    assert "awq 4-bit, group 32" in text and "version=gemm" in text and "quant_config.json" in text
    assert "servable      yes: 13 packed linears" in text  # 2 layers x 7 linears, less the dense one


def test_server_answers_a_completion_from_the_checkpoint(awq):
    from quantkit.runtime.server import create_app

    engine = LLMEngine(EngineConfig(model=str(awq["path"]), dtype="float32", num_blocks=32))
    prompt = "The quick brown fox"
    expected = LLM(str(awq["path"]), dtype="float32", num_blocks=32).generate([prompt], GREEDY)[0]
    with serving(create_app(engine, model_name="tiny-awq")) as url:
        res = httpx.post(f"{url}/v1/completions", json={"model": "tiny-awq", "prompt": prompt, "max_tokens": GREEDY.max_tokens,
                                                        "temperature": 0, "ignore_eos": True}, timeout=60)
    assert res.status_code == 200, res.text
    assert res.json()["choices"][0]["text"] == expected.text and res.json()["usage"]["completion_tokens"] == GREEDY.max_tokens


def test_single_file_checkpoint_with_only_a_transformers_quantization_config_loads(tiny_model_dir, tmp_path, awq):
    qc = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    write_awq_checkpoint(tmp_path / "hf", tiny_model_dir, config_qc=qc, shards=1)
    (tmp_path / "hf" / "quant_config.json").unlink()
    weights = load_weights(tmp_path / "hf")  # DENSE_MODULE stays dense although the list is empty: it has no qweight
    assert weights.quantized and weights.config["quantization_config"]["group_size"] == GROUP
    sharded = load_weights(awq["path"]).tensors
    assert set(weights.tensors) == set(sharded)
    assert all(torch.equal(weights.tensors[n], sharded[n]) for n in sharded)  # same seed, same tensors


def test_agreeing_config_and_quant_config_are_read_as_one(tiny_model_dir, tmp_path):
    from quantkit.autoawq import read_awq_settings

    qc = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    write_awq_checkpoint(tmp_path / "both", tiny_model_dir, config_qc=qc)
    settings = read_awq_settings(tmp_path / "both")
    assert (settings.bits, settings.group_size, settings.zero_point, settings.version) == (4, GROUP, True, "gemm")
    assert settings.source == "config.json quantization_config and quant_config.json"
    assert load_weights(tmp_path / "both").quantized


# ---------------------------------------------------------------------------- refusals


def refusal(path: Path) -> str:
    with pytest.raises(QuantkitError) as info:
        load_weights(path)
    return str(info.value)


@pytest.fixture
def make(tiny_model_dir, tmp_path):
    def build(name: str, **kwargs) -> Path:
        write_awq_checkpoint(tmp_path / name, tiny_model_dir, **kwargs)
        return tmp_path / name

    return build


@pytest.mark.parametrize("settings, expected", [
    ({"version": "GEMV"}, ["version 'gemv'", "GEMV layout", "GEMM"]),
    ({"version": "marlin"}, ["version 'marlin'", "Marlin layout", "gemm"]),
    ({"w_bit": 8}, ["8-bit", "4-bit"]),
    ({"zero_point": False}, ["zero_point false", "zero points", "zero_point=True"]),
    ({"q_group_size": 64}, ["imply group size 32", "says 64"]),
    ({"q_group_size": -1}, ["group_size -1", "whole row"]),
    ({"q_group_size": 16}, ["group size 16", "(32, 64, 128, 256)"]),
])
def test_unsupported_or_contradicted_settings_are_refused(make, settings, expected):
    message = refusal(make("bad", settings=settings))
    for part in expected:
        assert part in message


def test_layers_with_different_group_sizes_are_refused(make):
    message = refusal(make("mixed", group_sizes={"model.layers.1.self_attn.o_proj": 64}))
    assert "different group sizes" in message and "group 64: model.layers.1.self_attn.o_proj" in message


def test_a_shard_named_by_the_index_but_missing_is_refused(make):
    path = make("torn")
    (path / "model-00002-of-00002.safetensors").unlink()
    message = refusal(path)
    assert "model-00002-of-00002.safetensors" in message and "missing" in message


def test_a_tensor_not_where_the_index_says_is_refused(make):
    path = make("misindexed")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"  # it lives in shard 2
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = refusal(path)
    assert "model.norm.weight" in message and "does not hold" in message


def test_a_weight_file_the_index_does_not_list_is_refused(make):
    path = make("stray")
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4, dtype=torch.float16)}, str(path / "extra.safetensors"))
    message = refusal(path)
    assert "extra.safetensors is a weight file that model.safetensors.index.json does not list" in message and "remove it" in message


def test_config_and_quant_config_disagreeing_are_refused(make):
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    message = refusal(make("disagree", config_qc=qc))
    assert "disagree on group_size" in message and "128" in message and "32" in message


def test_an_unknown_quant_method_is_refused(make):
    message = refusal(make("gptq", config_qc={"quant_method": "gptq", "bits": 4, "group_size": 32}))
    assert "quant_method 'gptq'" in message and "AWQ" in message


def test_a_qweight_without_its_qzeros_and_scales_is_refused(make):
    path = make("incomplete", shards=1)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if not n.startswith("model.layers.0.mlp.up_proj.q")}
    tensors.pop("model.layers.0.mlp.up_proj.scales")
    tensors["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(64, 16, dtype=torch.int32)
    save_file(tensors, str(path / "model.safetensors"))
    message = refusal(path)
    assert "model.layers.0.mlp.up_proj lacks qzeros and scales" in message


def test_a_pickle_only_checkpoint_is_refused_without_being_read(make):
    path = make("pickled", shards=1)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"never unpickled")  # not even a valid pickle: it must not be opened
    message = refusal(path)
    assert "pytorch_model.bin" in message and "pickle" in message and "safetensors" in message


def test_a_packed_lm_head_is_refused_not_replaced_by_the_embeddings(make):
    from quantkit.runtime.model_runner import ModelRunner

    path = make("packed-head", shards=1)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (vocab, hidden), generator=gen)
    zeros = torch.randint(0, 16, (vocab, hidden // GROUP), generator=gen)
    tensors.update({f"lm_head.{k}": v for k, v in pack_linear(codes, zeros, torch.full((vocab, hidden // GROUP), 0.01)).items()})
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(QuantkitError, match="packs lm_head") as info:
        ModelRunner(load_weights(path), torch.float32, 16, num_blocks=4)
    assert "modules_to_not_convert" in str(info.value)


def test_bench_offline_measures_an_autoawq_checkpoint_against_the_baseline_it_is_given(make, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from quantkit.cli import main

    path = make("bench")
    fast = ["--requests", "3", "--prompt-tokens", "8-16", "--output-tokens", "3-5", "--modes",
            "engine-one-at-a-time-int4,engine-continuous-int4", "--kv-cache-memory", "4MiB", "-o", str(tmp_path / "out")]
    refused = CliRunner().invoke(main, ["bench", "offline", str(path), *fast])
    assert refused.exit_code == 2 and "--baseline" in refused.output
    result = CliRunner().invoke(main, ["bench", "offline", str(path), "--baseline", str(tiny_model_dir), *fast])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "offline.json").read_text())
    for mode in ("engine-one-at-a-time-int4", "engine-continuous-int4"):
        assert (data["results"][mode]["completed"], data["results"][mode]["failed"]) == (3, 0)
