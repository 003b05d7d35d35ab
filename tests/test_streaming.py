"""Quantization streams the source a block at a time: same result as in memory, flat memory, resumable."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import read_safetensors_dir
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
    assert_same_weights(read_safetensors_dir(uninterrupted), in_memory)


def test_the_artifact_is_sharded_per_block_with_an_index_that_covers_every_tensor(uninterrupted):
    index = json.loads((uninterrupted / "model.safetensors.index.json").read_text())
    files = sorted(uninterrupted.glob("*.safetensors"))
    assert len(files) == 5  # embeddings, norm and head + one shard per block
    assert sorted(index["weight_map"]) == sorted(read_safetensors_dir(uninterrupted))
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
    assert_same_weights(read_safetensors_dir(out), read_safetensors_dir(uninterrupted))
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


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_a_half_precision_pass_on_a_cpu_without_bf16_instructions_warns_and_names_the_fix(four_block_model, tmp_path, monkeypatch, compute_dtype):
    monkeypatch.setattr("quantkit.pipeline.cpu_ext.cpu_has_bf16_instructions", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rtn = Recipe().with_overrides(method="rtn", group_size=32, compute_dtype=compute_dtype)
    with pytest.warns(RuntimeWarning, match=f"compute_dtype {compute_dtype}: this CPU has no AVX-512 BF16.*compute_dtype: float32"):
        quantize(four_block_model, tmp_path / "awq", rtn)
    assert (tmp_path / "awq" / "quantkit.json").is_file()  # a warning, not a refusal


@pytest.mark.parametrize("has_bf16, compute_dtype", [(False, "float32"), (True, "bfloat16")])
def test_no_warning_where_the_compute_dtype_suits_the_cpu(four_block_model, tmp_path, monkeypatch, has_bf16, compute_dtype):
    import warnings

    monkeypatch.setattr("quantkit.pipeline.cpu_ext.cpu_has_bf16_instructions", lambda: has_bf16)
    rtn = Recipe().with_overrides(method="rtn", group_size=32, compute_dtype=compute_dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compute_dtype", category=RuntimeWarning)
        quantize(four_block_model, tmp_path / "awq", rtn)


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
    # A fixed mmap threshold: tensors of 4 MiB and more get their own mappings, returned to the
    # system when freed, so the peak measures what quantkit keeps rather than how glibc's heap
    # happened to fragment (which varied between runs: a 12-block AWQ peak 0.5x to 0.9x of the
    # added weights above the 4-block one, under the default dynamic threshold).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(model_dir), str(out), method], capture_output=True, text=True, check=True,
                            env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_memory_does_not_grow_with_depth(tiny_model_dir, tmp_path, method):
    """Three times the blocks (+240 MB of weights).

    Between blocks, resident memory stays put: no finished block is kept. The peak, reached
    inside a block, grows by well under the added weights (loading the whole model would add
    all of them). Heap fragmentation is kept out of the measurement (memory_of_quantizing); with
    the default allocator it adds 0.2x or more of the added weights (BENCHMARKS.md, streaming).
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


# --- crash safety, resume identity, loading: review fixes ------------------------------------

RTN = Recipe().with_overrides(method="rtn", group_size=32)


def test_a_crashed_finalize_is_finished_by_resume_without_redoing_blocks(four_block_model, uninterrupted, tmp_path, monkeypatch):
    import quantkit.artifact

    out = tmp_path / "awq"

    def crash(path):  # every shard renamed, index and config written, hidden states deleted: then the crash
        raise Interrupted

    monkeypatch.setattr(quantkit.artifact, "file_sha256", crash)
    with pytest.raises(Interrupted):
        quantize(four_block_model, out, AWQ)
    assert not list((tmp_path / ".awq.partial").glob("hidden-*"))
    monkeypatch.undo()
    done = []
    quantize(four_block_model, out, AWQ, resume=True, progress=lambda d, _t, _s: done.append(d))
    assert done == []
    assert_same_weights(read_safetensors_dir(out), read_safetensors_dir(uninterrupted))


def test_a_fresh_start_clears_files_no_partial_json_committed(four_block_model, tmp_path):
    """E.g. a finalize that crashed after removing partial.json: its shards must not join a new run's artifact."""
    out = tmp_path / "rtn"
    stale = tmp_path / ".rtn.partial"
    stale.mkdir()
    torch.save({}, stale / "junk.bin")
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    quantize(four_block_model, out, RTN, resume=True)
    assert not (out / "junk.bin").exists() and not (out / "model-00001-of-00009.safetensors").exists()
    manifest = json.loads((out / "quantkit.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != "quantkit.json")


def test_an_output_directory_appearing_mid_run_keeps_the_run_resumable(four_block_model, tmp_path):
    out = tmp_path / "rtn"

    def create_out(done: int, total: int, _seconds: float) -> None:
        if done == total:
            out.mkdir()

    with pytest.raises(QuantkitError, match="--resume --force"):
        quantize(four_block_model, out, RTN, progress=create_out)
    done = []
    quantize(four_block_model, out, RTN, resume=True, force=True, progress=lambda d, _t, _s: done.append(d))
    assert done == [] and (out / "quantkit.json").is_file()


def test_resume_refuses_a_changed_config_but_not_a_renamed_recipe(four_block_model, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(four_block_model, model)
    out = tmp_path / "rtn"
    with pytest.raises(Interrupted):
        quantize(model, out, RTN, progress=interrupt_after(1))
    config = json.loads((model / "config.json").read_text())
    original = dict(config)
    config["rms_norm_eps"] = 1e-3  # same weights, a different model
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantkitError, match=r"source model config \(rms_norm_eps: 1e-06 -> 0.001\)"):
        quantize(model, out, RTN, resume=True)
    (model / "config.json").write_text(json.dumps(original))
    renamed = dataclasses.replace(RTN, name="renamed", gates={"ppl_ratio": 1.1})  # nothing that shapes the tensors
    done = []
    quantize(model, out, renamed, resume=True, progress=lambda d, _t, _s: done.append(d))
    assert done == [2, 3, 4]


def test_block_files_are_durable_before_partial_json_counts_them(tmp_path, monkeypatch):
    import os

    import quantkit.artifact
    from quantkit.partial import PartialArtifact

    partial = PartialArtifact(tmp_path / "out")
    partial.begin({"x": 1}, num_blocks=2, resume=False, force=False)
    events = []
    real_replace = os.replace
    monkeypatch.setattr(quantkit.artifact, "_fsync", lambda p: events.append(("fsync", Path(p).name)))
    monkeypatch.setattr(quantkit.artifact.os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b)))
    partial.add_block(0, {"w": torch.ones(2)}, torch.zeros(3), {"seconds": 0.0})
    d = partial.dir.name
    assert events == [
        ("fsync", "block-00000.safetensors.tmp"), ("replace", "block-00000.safetensors"), ("fsync", d),
        ("fsync", "hidden-00000.safetensors.tmp"), ("replace", "hidden-00000.safetensors"), ("fsync", d),
        ("fsync", "partial.json.tmp"), ("replace", "partial.json"), ("fsync", d),
    ]


def _tied_checkpoint_with_head_and_no_dtype(model_dir: Path, out: Path) -> Path:
    """The tiny tied Llama, re-saved in fp16 with lm_head.weight stored too and no dtype in its config."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(model_dir, out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        tensors = {n: handle.get_tensor(n).half() for n in handle.keys()}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_tied_head_stored_in_the_checkpoint_is_tied_not_loaded_twice(tiny_model_dir, tmp_path):
    from quantkit.shards import ShardedCheckpoint, load_outside_blocks, skeleton_model

    model_dir = _tied_checkpoint_with_head_and_no_dtype(tiny_model_dir, tmp_path / "m")
    checkpoint = ShardedCheckpoint(model_dir)
    assert checkpoint.dtype == torch.float16  # the first float tensor's, as from_pretrained(dtype="auto")
    model = skeleton_model(model_dir, checkpoint.dtype)
    load_outside_blocks(model, checkpoint, get_adapter("llama"))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_skeleton_has_the_buffers_from_pretrained_gives(tmp_path):
    """Buffers made in the default dtype (Gemma's embed_scale) follow the checkpoint's, config dtype or not."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from quantkit.shards import ShardedCheckpoint, skeleton_model

    config = Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("dtype", None), raw.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    reference = dict(load_model(tmp_path, "auto").named_buffers())
    skeleton = dict(skeleton_model(tmp_path, ShardedCheckpoint(tmp_path).dtype).named_buffers())
    assert {n: b.dtype for n, b in skeleton.items()} == {n: b.dtype for n, b in reference.items()}
    assert all(torch.equal(skeleton[n], reference[n]) for n in reference)


def test_persistent_buffers_the_checkpoint_lacks_keep_their_initial_values(tiny_model_dir):
    from quantkit.shards import ShardedCheckpoint, load_block, load_outside_blocks, skeleton_model

    adapter = get_adapter("llama")
    checkpoint = ShardedCheckpoint(tiny_model_dir)
    model = skeleton_model(tiny_model_dir, checkpoint.dtype)
    model.model.register_buffer("extra", torch.arange(3.0))  # persistent: in state_dict(), not in the checkpoint
    block = adapter.blocks(model)[0]
    block.register_buffer("extra", torch.arange(2.0))
    load_outside_blocks(model, checkpoint, adapter)
    load_block(block, adapter.block_prefix(0), checkpoint)
    assert torch.equal(model.model.extra, torch.arange(3.0)) and torch.equal(block.extra, torch.arange(2.0))
    assert not any(p.is_meta for p in block.parameters())


def test_capture_binds_positional_arguments_and_lends_the_layers_attributes():
    """Decoder loops that pass arguments positionally or read attributes of their layers (a mask per attention type)."""
    from torch import nn

    from quantkit.awq import capture_block_inputs

    class Layer(nn.Module):
        def __init__(self, kind: str):
            super().__init__()
            self.attention_type = kind
            self.proj = nn.Linear(4, 4)

        def forward(self, hidden_states, mask, scale=1.0, **kwargs):
            return hidden_states * scale + mask

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.layers = nn.ModuleList([Layer("full"), Layer("sliding")])

        def forward(self, input_ids, use_cache=False):
            h = self.embed(input_ids)
            masks = {"full": torch.zeros(1), "sliding": torch.ones(1)}
            for layer in self.layers:
                h = layer(h, masks[layer.attention_type], 2.0, note=layer.attention_type)
            return h

    model = Toy()
    ids = torch.randint(0, 10, (3, 5))
    hidden, kwargs = capture_block_inputs(model, model.layers, ids)
    assert torch.equal(hidden, model.embed(ids).detach().float())
    assert [set(k) for k in kwargs] == [{"mask", "scale", "note"}] * 2
    assert torch.equal(kwargs[1]["mask"], torch.ones(1)) and kwargs[1]["scale"] == 2.0 and kwargs[1]["note"] == "sliding"
    assert all(isinstance(layer, Layer) for layer in model.layers)  # the real layers are back


def test_resume_names_a_missing_block_shard(four_block_model, tmp_path):
    out = tmp_path / "rtn"
    with pytest.raises(Interrupted):
        quantize(four_block_model, out, RTN, progress=interrupt_after(2))
    (tmp_path / ".rtn.partial" / "block-00001.safetensors").unlink()
    with pytest.raises(QuantkitError, match=r"block-00001.safetensors missing.*--force"):
        quantize(four_block_model, out, RTN, resume=True)


# --- a full disk: one clear line, and the run resumes -----------------------------------------

PAGE = 4096  # tmpfs counts whole pages


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE)


@pytest.fixture(scope="module")
def rtn_reference(tiny_model_dir, tmp_path_factory) -> Path:
    return quantize(tiny_model_dir, tmp_path_factory.mktemp("rtn-ref") / "out", Recipe().with_overrides(method="rtn", group_size=32))


@pytest.mark.parametrize("where", ["block", "finalize"])
def test_a_full_disk_is_one_clear_line_and_the_run_resumes(where, tiny_model_dir, rtn_reference, tmp_path):
    """On a real small filesystem (a tmpfs mounted in a private mount namespace): the disk fills while
    the second block is written, or while finalize writes the tensors outside the blocks."""
    index = json.loads((rtn_reference / "model.safetensors.index.json").read_text())["weight_map"]
    rest, *blocks = sorted(set(index.values()))  # the first shard holds the tensors outside the blocks
    blocks_pages = [_pages(rtn_reference / b) for b in blocks]
    room = 2 + (blocks_pages[0] + blocks_pages[1] // 2 if where == "block" else sum(blocks_pages) + _pages(rtn_reference / rest) // 2)
    disk, copy = tmp_path / "disk", tmp_path / "resumed"
    disk.mkdir()
    cmd = f"{sys.executable} -m quantkit.cli quantize {tiny_model_dir} -o {disk}/out --method rtn --group-size 32"
    script = textwrap.dedent(f"""\
        mount -t tmpfs -o size={room * PAGE} tmpfs {disk} || exit 99
        {cmd} > {tmp_path}/first.log 2>&1; echo $? > {tmp_path}/first.rc
        ls -A {disk} > {tmp_path}/first.ls
        mount -o remount,size=64m {disk}
        {cmd} --resume > {tmp_path}/second.log 2>&1; echo $? > {tmp_path}/second.rc
        cp -r {disk}/out {copy}
    """)
    done = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"could not mount a small tmpfs in a private namespace: {done.stderr}"
    first = (tmp_path / "first.log").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "2", first
    assert "Traceback" not in first and "SafetensorError" not in first
    (line,) = [ln for ln in first.splitlines() if ln.startswith("error:")]
    assert "no space left on the device writing" in line and "bytes free there" in line and "--resume" in line
    written = "block-00001.safetensors" if where == "block" else rest
    assert written in line, line
    assert (tmp_path / "first.ls").read_text().split() == [".out.partial"]  # nothing half-made in place of the artifact
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.log").read_text()
    assert_same_weights(read_safetensors_dir(copy), read_safetensors_dir(rtn_reference))
