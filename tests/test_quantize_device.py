"""`quantize --device`: blocks visit the device one at a time; the artifact does not depend on where.

Everything here runs on the CPU except the tests marked `on_cuda`, which compare a CUDA run with
the CPU path and run only with QUANTKIT_TEST_DEVICE=cuda (on a machine with a GPU).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import read_safetensors_dir

from quantkit import awq
from quantkit.awq import AWQSettings, _cast_floats, capture_block_inputs, collect_features, search_clip
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.models import get_adapter
from quantkit.pack import unpack_awq
from quantkit.pipeline import BlockTiming, quantize, run_quantize, time_block_quantization
from quantkit.quantizer import compute_qparams, gptq_quantize
from quantkit.recipe import Recipe

ADAPTER = get_adapter("llama")
# Small enough for seconds, and every device-sensitive step runs: calibration statistics,
# Hessians, the scale search, clipping and GPTQ's column loop.
FAST = dict(group_size=32, samples=8, seqlen=64, search_samples=4)
GPTQ = Recipe().with_overrides(**FAST, rounding="gptq")
TEST_DEVICE = os.environ.get("QUANTKIT_TEST_DEVICE", "cpu")
on_cuda = pytest.mark.skipif(
    TEST_DEVICE != "cuda", reason="compares a CUDA run with the CPU path: set QUANTKIT_TEST_DEVICE=cuda on a machine with a GPU"
)
TINY_LLAMA_CONFIG = dict(  # one block of the tiny Llama shape (conftest's tiny_model_dir)
    model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a GPU, whatever it has: "auto" means cpu, "cuda" is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def same_files(a: Path, b: Path) -> list[str]:
    """Names of the safetensors files of `a`, after checking `b` has the same ones, byte for byte."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def manifest(artifact: Path) -> dict:
    return json.loads((artifact / "quantkit.json").read_text())


# --- the CPU path -----------------------------------------------------------------------------


def test_device_cpu_writes_byte_for_byte_the_artifact_of_the_default_path(tiny_model_dir, tmp_path, no_gpu):
    default = quantize(tiny_model_dir, tmp_path / "default", GPTQ)  # device "auto": the CPU here
    explicit = quantize(tiny_model_dir, tmp_path / "cpu", GPTQ, device="cpu")
    assert len(same_files(default, explicit)) == 3  # outside the blocks + one shard per block
    assert (default / "model.safetensors.index.json").read_text() == (explicit / "model.safetensors.index.json").read_text()
    assert manifest(default)["layers"] == manifest(explicit)["layers"]  # the same errors, to the last digit


def test_the_manifest_records_the_device_that_ran(tiny_model_dir, tmp_path, no_gpu):
    path = run_quantize(tiny_model_dir, tmp_path / "rtn", method="rtn", group_size=32, progress=False, device="auto")
    assert manifest(path)["device"] == {"type": "cpu"}  # peak GPU memory is recorded on cuda only


def test_the_cli_passes_device_through_to_the_manifest(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "rtn"
    result = CliRunner().invoke(main, ["quantize", str(tiny_model_dir), "-o", str(out), "--method", "rtn", "--group-size", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert manifest(out)["device"]["type"] == "cpu"


def test_every_block_is_moved_to_the_device_for_its_turn_and_back_on_the_cpu_when_stored(tiny_model_dir, tmp_path, monkeypatch):
    """The streaming moves run on the CPU too (there as no-ops): the path a GPU run takes is the one tested here."""
    visits: list[tuple[torch.device, set[torch.device]]] = []
    stored: list[set[torch.device]] = []
    real_block_on = awq.block_on

    @contextlib.contextmanager
    def watched_block_on(block, device):
        with real_block_on(block, device) as moved:
            visits.append((device, {p.device for p in moved.parameters()}))
            yield moved

    def seen_by_the_store(done: int, _total: int, _seconds: float) -> None:
        stored.append(done)

    monkeypatch.setattr(awq, "block_on", watched_block_on)
    quantize(tiny_model_dir, tmp_path / "awq", GPTQ, device="cpu", progress=seen_by_the_store)
    cpu = torch.device("cpu")
    # One visit per block, in order, each with a loaded block (not the skeleton's meta tensors) on the device.
    assert visits == [(cpu, {cpu}), (cpu, {cpu})]
    assert stored == [1, 2]


def test_what_a_finished_block_hands_on_is_on_the_cpu(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_block_inputs(model, ADAPTER.blocks(model), ids)
    settings = AWQSettings(group_size=32, search_samples=2, batch_samples=2, rounding="gptq")
    tensors: list[torch.Tensor] = []

    def keep(done: awq.BlockDone) -> None:
        tensors.extend([done.hidden, *done.block.state_dict().values(), *(s.scales for s in done.searches)])
        for ql in done.linears.values():
            tensors.extend([ql.q, ql.params.scales, ql.params.zeros])

    awq.quantize_blocks(ADAPTER.blocks(model), ADAPTER, settings, hidden, kwargs, on_done=keep, device="cpu")
    assert tensors and {t.device.type for t in tensors} == {"cpu"}


def test_a_blocks_kwargs_travel_to_the_device_masks_and_positions_included():
    # meta stands in for a second device: a tensor left behind would keep its CPU device.
    kwargs = {"position_embeddings": (torch.ones(1, 4, 8), torch.zeros(1, 4, 8)), "position_ids": torch.arange(4)[None],
              "attention_mask": torch.ones(1, 1, 4, 4, dtype=torch.bool), "use_cache": False, "past_key_values": None}
    moved = _cast_floats(kwargs, torch.bfloat16, "meta")
    assert {t.device.type for t in (*moved["position_embeddings"], moved["position_ids"], moved["attention_mask"])} == {"meta"}
    assert moved["position_embeddings"][0].dtype == torch.bfloat16 and moved["position_ids"].dtype == torch.int64
    assert moved["attention_mask"].dtype == torch.bool and moved["use_cache"] is False and moved["past_key_values"] is None


def test_the_block_math_allocates_on_the_device_of_its_inputs():
    """Run on meta tensors, any tensor the code creates on the CPU (zeros, full, eye, empty) would
    meet a device tensor and fail: the statistics, the clip search and GPTQ rounding create none."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    block = ADAPTER.blocks(model)[0]
    _, kwargs = capture_block_inputs(model, ADAPTER.blocks(model), torch.randint(0, 64, (1, 16)))
    settings = AWQSettings(group_size=32, compute_dtype="float32", rounding="gptq", search_samples=2, batch_samples=2)
    block.to("meta")
    hidden = torch.empty(4, 16, 64, device="meta")
    names = ADAPTER.quantized_linears(block)
    features = collect_features(block, ADAPTER, names, hidden, _cast_floats(kwargs[0], torch.float32, "meta"), settings)
    assert {t.device.type for t in (*features.mean_abs.values(), *features.hessians.values())} == {"meta"}

    w = torch.empty(96, 64, device="meta")
    low, high = search_clip(w, torch.empty(16, 64, device="meta"), settings)
    codes = gptq_quantize(w, features.hessians["mlp.gate_proj"], compute_qparams(w, 32), act_order=True)
    assert (low.device.type, high.device.type, codes.device.type) == ("meta", "meta", "meta")


# --- refusals -----------------------------------------------------------------------------------


def test_device_cuda_without_a_gpu_is_refused_before_anything_is_read_or_written(tiny_model_dir, tmp_path, no_gpu):
    with pytest.raises(QuantkitError, match="--device cpu"):
        run_quantize(tiny_model_dir, tmp_path / "out", method="rtn", group_size=32, progress=False, device="cuda")
    assert not list(tmp_path.iterdir())  # no artifact, no partial directory


def test_the_cli_refuses_device_cuda_without_a_gpu_in_one_line(tiny_model_dir, tmp_path, no_gpu):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA device is visible" in result.output and "--device cpu" in result.output
    assert "Traceback" not in result.output


def test_an_unknown_device_is_refused_naming_the_choices(tiny_model_dir, tmp_path):
    with pytest.raises(QuantkitError, match="auto, cpu, cuda"):
        run_quantize(tiny_model_dir, tmp_path / "out", method="rtn", group_size=32, progress=False, device="gpu")


def test_a_run_interrupted_on_one_device_does_not_resume_on_another(tiny_model_dir, tmp_path, no_gpu):
    """Sums run in another order on another device, so a resumed run would splice two slightly different results."""

    class Interrupted(Exception):
        pass

    def stop_after_first(done: int, _total: int, _seconds: float) -> None:
        raise Interrupted

    out = tmp_path / "awq"
    with pytest.raises(Interrupted):
        quantize(tiny_model_dir, out, GPTQ, device="cpu", progress=stop_after_first)
    state_path = tmp_path / ".awq.partial" / "partial.json"
    state = json.loads(state_path.read_text())
    assert state["identity"]["device"] == "cpu"
    state["identity"]["device"] = "cuda"  # as if interrupted on a GPU machine
    state_path.write_text(json.dumps(state))
    with pytest.raises(QuantkitError, match=r"device \(--device\) \(cuda -> cpu\)"):
        quantize(tiny_model_dir, out, GPTQ, device="cpu", resume=True)


# --- timing one block (benchmarks) ------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    TINY_LLAMA_CONFIG,
    dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
         sliding_window=32, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512),
], ids=["llama", "gemma3"])
def test_one_random_block_of_a_config_is_timed_through_the_pipelines_block_code(config, monkeypatch):
    calls = []
    real = awq.quantize_blocks

    def counted(*args, **kwargs):
        calls.append(kwargs["device"])
        return real(*args, **kwargs)

    monkeypatch.setattr("quantkit.pipeline.quantize_blocks", counted)
    timing = time_block_quantization(config, device="cpu", dtype="bfloat16", num_samples=4, seqlen=32,
                                     settings=AWQSettings(group_size=32, search_samples=2, batch_samples=2, rounding="gptq"))
    assert isinstance(timing, BlockTiming)
    assert calls == [torch.device("cpu")]
    assert timing.seconds > 0 and timing.device == "cpu" and timing.linears == 7
    assert timing.peak_device_memory_bytes is None  # measured on cuda only


def test_timing_a_config_without_model_type_says_what_to_pass():
    with pytest.raises(QuantkitError, match="model_type"):
        time_block_quantization({"hidden_size": 64}, device="cpu")


# --- on a GPU (QUANTKIT_TEST_DEVICE=cuda) ------------------------------------------------------------


@on_cuda
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_cuda_codes_match_the_cpu_paths_but_for_rounding_ties(tiny_model_dir, tmp_path, rounding, record_property):
    # fp32 forward passes: the comparison then measures summation order only, not bf16 matmul kernels.
    recipe = Recipe().with_overrides(**FAST, rounding=rounding, compute_dtype="float32")
    cpu = read_safetensors_dir(quantize(tiny_model_dir, tmp_path / "cpu", recipe, device="cpu"))
    cuda_path = quantize(tiny_model_dir, tmp_path / "cuda", recipe, device="cuda")
    cuda = read_safetensors_dir(cuda_path)
    assert {n: (t.dtype, t.shape) for n, t in cuda.items()} == {n: (t.dtype, t.shape) for n, t in cpu.items()}  # the same format
    record = manifest(cuda_path)["device"]
    assert record["type"] == "cuda" and record["peak_memory_bytes"] > 0

    differing = total = 0
    for name in (n.removesuffix(".qweight") for n in cpu if n.endswith(".qweight")):
        q_cpu, params_cpu = unpack_awq(cpu[f"{name}.qweight"], cpu[f"{name}.qzeros"], cpu[f"{name}.scales"])
        q_cuda, params_cuda = unpack_awq(cuda[f"{name}.qweight"], cuda[f"{name}.qzeros"], cuda[f"{name}.scales"])
        differing += int((q_cpu != q_cuda).sum())
        total += q_cpu.numel()
        torch.testing.assert_close(params_cuda.scales, params_cpu.scales, rtol=1e-3, atol=0, msg=name)
    fraction = differing / total
    record_property("codes_differing_fraction", fraction)
    print(f"{rounding}: {differing} of {total} codes differ between cuda and cpu ({fraction:.4%})")
    assert fraction < 0.01, f"{fraction:.4%} of the codes differ ({differing} of {total})"


@on_cuda
def test_timing_one_block_on_cuda_reports_its_peak_gpu_memory():
    timing = time_block_quantization(TINY_LLAMA_CONFIG, device="cuda", num_samples=4, seqlen=32,
                                     settings=AWQSettings(group_size=32, search_samples=2, batch_samples=2))
    assert timing.device == "cuda" and timing.seconds > 0 and timing.peak_device_memory_bytes > 0
