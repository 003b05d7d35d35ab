"""Quantization streams the source a block at a time: same result as in memory, flat memory, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantkit.artifact import artifact_tensors
from quantkit.awq import quantize_model
from quantkit.bench.synthetic import checkpoint_bytes, synthetic_llama
from quantkit.calibration import build_calibration_set, load_calibration_texts
from quantkit.errors import QuantkitError
from quantkit.models import get_adapter
from quantkit.pipeline import quantize
from quantkit.recipe import Recipe
from quantkit.sources import load_model, load_tokenizer

AWQ = Recipe().with_overrides(group_size=32, samples=8, seqlen=64, search_samples=4)


class Interrupted(Exception):
    pass


def interrupt_after(blocks: int):
    def progress(done: int, _total: int, _seconds: float) -> None:
        if done == blocks:
            raise Interrupted

    return progress


def artifact_weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            out.update({n: handle.get_tensor(n) for n in handle.keys()})
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def four_block_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A random 4-block Llama stored as one shard per block plus an index."""
    return synthetic_llama(tmp_path_factory.mktemp("synthetic") / "m", layers=4, hidden=128, intermediate=256, tokenizer_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def uninterrupted(four_block_model, tmp_path_factory) -> Path:
    return quantize(four_block_model, tmp_path_factory.mktemp("full") / "awq", AWQ)


def test_streamed_artifact_equals_quantizing_the_whole_model_in_memory(four_block_model, uninterrupted):
    model = load_model(four_block_model, "auto")
    recipe = AWQ
    texts, _ = load_calibration_texts(recipe.calibration.source)
    c = recipe.calibration
    ids = build_calibration_set(texts, load_tokenizer(four_block_model), c.samples, c.seqlen, c.seed)
    result = quantize_model(model, get_adapter("llama"), recipe.quantization, ids)
    in_memory = artifact_tensors(model.state_dict(), result.linears, tied_lm_head=False)
    assert_same_weights(artifact_weights(uninterrupted), in_memory)


def test_the_artifact_is_sharded_per_block_with_an_index_that_covers_every_tensor(uninterrupted):
    index = json.loads((uninterrupted / "model.safetensors.index.json").read_text())
    files = sorted(uninterrupted.glob("*.safetensors"))
    assert len(files) == 5  # embeddings, norm and head + one shard per block
    assert sorted(index["weight_map"]) == sorted(artifact_weights(uninterrupted))
    assert {f.name for f in files} == set(index["weight_map"].values())
    assert not list(uninterrupted.parent.glob(".*partial*"))  # nothing left behind


@pytest.mark.parametrize("stop_after", [1, 3])
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(four_block_model, uninterrupted, tmp_path, stop_after):
    out = tmp_path / "awq"
    with pytest.raises(Interrupted):
        quantize(four_block_model, out, AWQ, progress=interrupt_after(stop_after))
    assert not out.exists()
    state = json.loads((tmp_path / ".awq.partial" / "partial.json").read_text())
    assert len(state["blocks"]) == stop_after

    done = []
    quantize(four_block_model, out, AWQ, resume=True, progress=lambda d, _t, _s: done.append(d))
    assert done == list(range(stop_after + 1, 5))  # finished blocks were not redone
    assert_same_weights(artifact_weights(out), artifact_weights(uninterrupted))
    assert json.loads((out / "config.json").read_text()) == json.loads((uninterrupted / "config.json").read_text())
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["timings"]["resumed_at_block"] == stop_after
    assert len(manifest["layers"]) == 4 * 7


def test_a_leftover_partial_run_is_not_silently_discarded(four_block_model, tmp_path):
    out = tmp_path / "rtn"
    rtn = Recipe().with_overrides(method="rtn", group_size=32)
    with pytest.raises(Interrupted):
        quantize(four_block_model, out, rtn, progress=interrupt_after(2))
    with pytest.raises(QuantkitError, match="--resume"):
        quantize(four_block_model, out, rtn)
    quantize(four_block_model, out, rtn, force=True)  # --force starts over
    assert (out / "quantkit.json").is_file()


def test_resume_refuses_a_different_recipe(four_block_model, tmp_path):
    out = tmp_path / "awq"
    with pytest.raises(Interrupted):
        quantize(four_block_model, out, AWQ, progress=interrupt_after(1))
    with pytest.raises(QuantkitError, match=r"recipe \(calibration.seed: 0 -> 7\)"):
        quantize(four_block_model, out, AWQ.with_overrides(seed=7), resume=True)


def test_resume_refuses_a_different_source_model(four_block_model, tiny_model_dir, tmp_path):
    other = synthetic_llama(tmp_path / "other", layers=4, hidden=128, intermediate=256, tokenizer_dir=tiny_model_dir, seed=1)
    out = tmp_path / "awq"
    with pytest.raises(Interrupted):
        quantize(four_block_model, out, AWQ, progress=interrupt_after(1))
    with pytest.raises(QuantkitError, match="source model weights"):
        quantize(other, out, AWQ, resume=True)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from quantkit.pipeline import quantize
    from quantkit.recipe import Recipe

    def rss():
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS:")).split()[1]) * 1024

    between_blocks = []
    recipe = Recipe().with_overrides(method=sys.argv[3], group_size=64, samples=4, seqlen=64, search_samples=2)
    path = quantize(sys.argv[1], sys.argv[2], recipe, progress=lambda *_: between_blocks.append(rss()))
    peak = json.loads((path / "quantkit.json").read_text())["peak_rss_bytes"]
    print(json.dumps({"peak": peak, "between_blocks": between_blocks}))
    """
)


def memory_of_quantizing(model_dir: Path, out: Path, method: str) -> dict:
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(model_dir), str(out), method], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_memory_does_not_grow_with_depth(tiny_model_dir, tmp_path, method):
    """Three times the blocks (+240 MB of weights).

    Between blocks, resident memory stays put: no finished block is kept. The peak, reached
    inside a block, grows by well under the added weights (loading the whole model would add
    all of them); what growth remains is glibc heap fragmentation, which varies from run to run
    and levels off with depth (BENCHMARKS.md, streaming).
    """
    sizes, runs = [], []
    for layers in (4, 12):
        model = synthetic_llama(tmp_path / f"m{layers}", layers=layers, hidden=1024, intermediate=4096, tokenizer_dir=tiny_model_dir)
        sizes.append(checkpoint_bytes(model))
        runs.append(memory_of_quantizing(model, tmp_path / f"out{layers}", method))
    growth = sizes[1] - sizes[0]
    assert growth > 200 * 2**20
    between = runs[1]["between_blocks"]
    assert len(between) == 12 and max(between) - min(between) < 0.1 * growth, between
    assert runs[1]["peak"] - runs[0]["peak"] < 0.8 * growth, (sizes, runs)
