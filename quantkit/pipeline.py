"""`quantkit quantize` as a function: resolve, calibrate, quantize, pack, write.

`run_quantize` is the entry point the Python API (`quantkit.quantize`) and the command line share:
recipe file or Recipe, overrides checked by the recipe schema, a progress bar over blocks.
`quantize` is the step beneath it, for callers holding a finished Recipe.
`time_block_quantization` times that per-block work on one random block of any config (benchmarks).

`device` ("auto", "cpu", "cuda"; kernels/backend.py's resolve_device decides) is where the
calibration passes, the scale and clip searches and the rounding run; the model stays on the
CPU and its blocks visit the device one at a time (quantkit/awq.py). It is a property of the
run, not of the recipe, and the manifest records it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import platform
import resource
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from . import __version__
from .artifact import artifact_tensors, awq_quantization_config, check_output_dir
from .awq import (
    CLIP_STYLES, COMPUTE_DTYPES, METHODS, AWQSettings, BlockDone, ProgressFn, capture_block_inputs, check_group_sizes, check_rounding,
    quantize_blocks,
)
from .calibration import build_calibration_set, calibration_sha256, load_calibration_texts
from .errors import QuantkitError
from .kernels import cpu_ext
from .kernels.backend import resolve_device
from .models import get_adapter
from .quantizer import SUPPORTED_BITS
from .partial import PartialArtifact
from .recipe import CalibrationSettings, Recipe, load_recipe
from .shards import ShardedCheckpoint, load_block, load_outside_blocks, outside_block_state, release_block, skeleton_model
from .sources import load_tokenizer, resolve_model, weights_sha256


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    VmHWM belongs to the current address space, so it starts afresh at exec; ru_maxrss would
    also carry the peak of whatever process forked this one (a benchmark driver, say).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def read_source_config(model_dir: Path) -> dict:
    """The source's config.json, which must name its model_type (the adapter is chosen by it)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        config["model_type"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{model_dir}/config.json is unreadable or has no model_type ({e}); pass a Hugging Face model directory.") from None
    return config


# The settings a keyword of run_quantize may override: every quantization and calibration field.
OVERRIDABLE = tuple(f.name for cls in (AWQSettings, CalibrationSettings) for f in dataclasses.fields(cls))


def plan_recipe(recipe: Recipe | str | Path | None = None, **overrides: Any) -> Recipe:
    """The recipe to run: `recipe` (a Recipe, a YAML path, or None for the defaults) with `overrides`
    applied, each checked by the recipe schema (None means 'not given'). A keyword that names no
    setting is a TypeError listing the ones that exist."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise TypeError(f"unknown recipe override(s) {unknown}; the settings that can be overridden are {list(OVERRIDABLE)}.")
    base = recipe if isinstance(recipe, Recipe) else load_recipe(recipe) if recipe is not None else Recipe()
    return base.with_overrides(**overrides)


@contextlib.contextmanager
def block_progress(description: str) -> Iterator[ProgressFn]:
    """A tqdm bar over decoder blocks, as `quantize(progress=...)` reports them: opened at the first
    finished block (a resumed run starts part-way) and closed however the run ends."""
    from tqdm import tqdm

    bar: tqdm | None = None

    def progress(done: int, total: int, _seconds: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=done - 1, unit="block", desc=description)
        bar.update(1)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def run_quantize(
    model: str | Path | None,
    out: str | Path,
    recipe: Recipe | str | Path | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    progress: bool | ProgressFn = True,
    device: str = "auto",
    **overrides: Any,
) -> Path:
    """Quantize `model` into the artifact directory `out`; returns `out`. This is `quantkit.quantize`.

    `model` is a model directory, a hub id or "smollm2-135m"; None takes the recipe's `model:`.
    `recipe` is a recipe YAML path, a Recipe or None (the defaults); keyword overrides are its
    quantization and calibration settings (method="rtn", group_size=32, samples=64, source="x.txt",
    ...), checked by the recipe schema. `progress`: True draws a bar over blocks, False nothing, a
    callable gets (blocks done, blocks total, seconds of the last block). `force` replaces `out`;
    `resume` continues an interrupted run from its last finished block. `device`: where the
    blocks are quantized, "cpu", "cuda" or "auto" (cuda where a GPU is visible).
    """
    plan = plan_recipe(recipe, **overrides)
    model = model or plan.model
    if not model:
        raise QuantkitError("no model given; pass MODEL (a directory, a hub id or 'smollm2-135m') or a recipe with 'model:'.")
    if progress is True:
        with block_progress(f"{plan.quantization.method} g{plan.quantization.group_size}") as bar:
            return quantize(model, Path(out), plan, force=force, progress=bar, resume=resume, device=device)
    return quantize(model, Path(out), plan, force=force, progress=progress or None, resume=resume, device=device)


def quantize(
    model_spec: str | Path,
    out: Path,
    recipe: Recipe,
    force: bool = False,
    progress: ProgressFn | None = None,
    resume: bool = False,
    device: str = "auto",
) -> Path:
    """Quantize `model_spec` as `recipe` says and write the artifact to `out`.

    The source is streamed from its safetensors shards one block at a time and each finished
    block is written out at once (quantkit/shards.py, quantkit/partial.py), so peak memory does
    not grow with depth; with `resume`, an interrupted run continues from its last finished block.
    Each block is quantized on `device` ("auto", "cpu", "cuda") and comes back to the CPU to be
    written, so the artifact's format does not depend on it.
    """
    run_on = torch.device(resolve_device(device))  # --device cuda without a GPU: refused before anything loads
    settings, calib = recipe.quantization, recipe.calibration
    _check_settings(settings, run_on)
    out = Path(out)
    check_output_dir(out, force)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    _reset_peak_device_memory(run_on)

    model_dir = resolve_model(model_spec)
    source_config = read_source_config(model_dir)
    adapter = get_adapter(source_config["model_type"])  # before loading weights: fail fast
    checkpoint = ShardedCheckpoint(model_dir)
    model = skeleton_model(model_dir, checkpoint.dtype)
    blocks = adapter.blocks(model)
    check_group_sizes(blocks, adapter, settings.group_size)  # shapes only: before any weight is read
    load_outside_blocks(model, checkpoint, adapter)
    tokenizer = load_tokenizer(model_dir)
    source_sha = weights_sha256(model_dir)
    timings["load_s"] = time.perf_counter() - start

    calib_ids, calib_record = None, None
    if settings.method == "awq":
        t = time.perf_counter()
        texts, description = load_calibration_texts(calib.source)
        calib_ids = build_calibration_set(texts, tokenizer, calib.samples, calib.seqlen, calib.seed)
        calib_record = {
            "source": description,
            "samples": calib.samples,
            "seqlen": calib.seqlen,
            "seed": calib.seed,
            "tokens_sha256": calibration_sha256(calib_ids),
        }
        timings["calibration_s"] = time.perf_counter() - t

    partial = PartialArtifact(out)
    first = partial.begin(_identity(source_sha, source_config, recipe, calib_record, run_on), len(blocks), resume=resume, force=force)
    hidden, block_kwargs = None, None
    if settings.method == "awq" and first < len(blocks):  # all done: a crashed finalize, nothing to calibrate
        hidden, block_kwargs = capture_block_inputs(model, blocks, calib_ids)
        if first:
            hidden.copy_(partial.hidden())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def store(done: BlockDone) -> None:
        state = {done.prefix + n: t for n, t in done.block.state_dict().items()}
        quantized = {done.prefix + n: ql for n, ql in done.linears.items()}
        partial.add_block(done.index, artifact_tensors(state, quantized, tied), done.hidden, _block_record(done))
        release_block(done.block)
        if progress:
            progress(done.index + 1, len(blocks), done.seconds)

    t = time.perf_counter()
    if first < len(blocks):
        quantize_blocks(
            blocks, adapter, settings, hidden, block_kwargs, on_done=store, start=first,
            load_block=lambda i, block: load_block(block, adapter.block_prefix(i), checkpoint), device=run_on,
        )
    timings["quantize_s"] = time.perf_counter() - t

    config = dict(source_config)
    config["quantization_config"] = awq_quantization_config(settings.group_size, settings.bits)
    config["torch_dtype"] = "float16"
    if "dtype" in config:
        config["dtype"] = "float16"
    rest = artifact_tensors(outside_block_state(model, adapter), {}, tied)
    records = partial.state["blocks"]
    timings["total_s"] = time.perf_counter() - start
    manifest = _manifest(model_spec, model_dir, source_sha, recipe, calib_record, records)
    manifest["timings"] = {**timings, "per_block_s": [r["seconds"] for r in records], "resumed_at_block": first or None}
    manifest["peak_rss_bytes"] = peak_rss_bytes()
    manifest["device"] = _device_record(run_on)
    return partial.finalize(rest, config, manifest, model_dir, force=force)


def _check_settings(settings, device: torch.device) -> None:
    if settings.method not in METHODS:
        raise QuantkitError(f"unknown method '{settings.method}'; use one of {', '.join(METHODS)}.")
    if settings.compute_dtype not in COMPUTE_DTYPES:
        raise QuantkitError(f"compute_dtype '{settings.compute_dtype}' is not supported; use one of {', '.join(COMPUTE_DTYPES)}.")
    if settings.compute_dtype != "float32" and device.type == "cpu" and not cpu_ext.cpu_has_bf16_instructions():
        warnings.warn(
            f"compute_dtype {settings.compute_dtype}: this CPU has no AVX-512 BF16, so {settings.compute_dtype} matmuls are emulated "
            "(8.6x slower than fp32 at 256 rows on an AVX2 EPYC, benchmarks/dtype_paths.py); set compute_dtype: float32 in the "
            "recipe for a faster calibration pass", RuntimeWarning, stacklevel=3)
    if settings.clip_style not in CLIP_STYLES:
        raise QuantkitError(f"clip_style '{settings.clip_style}' is not supported; use one of {', '.join(CLIP_STYLES)}.")
    if settings.bits not in SUPPORTED_BITS:
        raise QuantkitError(f"{settings.bits}-bit quantization is not supported; use bits: 4.")
    check_rounding(settings)


def _identity(source_sha: str, source_config: dict, recipe: Recipe, calib_record: dict | None, device: torch.device) -> dict:
    """Everything the quantized tensors depend on: a resumed run must match the interrupted one in all of it.

    The config counts as much as the weights (depth, norm epsilon, rotary base, windows); of
    the recipe only the sections that shape the tensors do (its name and gates do not). So does
    the device: its sums run in another order, and a code at a rounding tie may fall either way.
    """
    return {
        "source_weights_sha256": source_sha,
        "source_config": source_config,
        "recipe": {k: v for k, v in recipe.to_dict().items() if k in ("quantization", "calibration")},
        "calibration_tokens_sha256": calib_record["tokens_sha256"] if calib_record else None,
        "quantkit_version": __version__,
        "device": device.type,
    }


def _reset_peak_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_device_memory(device: torch.device) -> int | None:
    """Peak bytes torch allocated on a GPU since the last reset; None on the CPU (peak RSS covers it)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _device_record(device: torch.device) -> dict:
    """The manifest's record of where the blocks were quantized (a resumed run: this process's part of the peak)."""
    record: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        record["peak_memory_bytes"] = _peak_device_memory(device)
    return record


def _block_record(done: BlockDone) -> dict:
    """What the manifest keeps of a block: per-linear errors and the searched scales' alphas."""
    return {
        "seconds": round(done.seconds, 3),
        "layers": {
            done.prefix + name: {"shape": list(ql.q.shape), "weight_rel_err": ql.weight_rel_err, "output_rel_err": ql.output_rel_err}
            for name, ql in done.linears.items()
        },
        "scale_search": {
            done.prefix + search.group.inspect: {"alpha": search.alpha, "linears": list(search.group.linears)}
            for search in done.searches
        },
    }


def _manifest(model_spec: str, model_dir: Path, source_sha: str, recipe: Recipe, calib_record: dict | None, records: list[dict]) -> dict:
    layers = {name: entry for r in records for name, entry in r["layers"].items()}
    alphas = {name: entry for r in records for name, entry in r["scale_search"].items()}
    return {
        "format": "quantkit-artifact/1",
        "quantkit_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"spec": str(model_spec), "path": str(model_dir), "weights_sha256": source_sha},
        "recipe": recipe.to_dict(),
        "calibration": calib_record,
        "layers": layers,
        "scale_search": alphas,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
        },
    }


# --- timing one block (benchmarks) -------------------------------------------------------------


@dataclass(frozen=True)
class BlockTiming:
    """One random block quantized as the pipeline quantizes each block."""

    seconds: float  # to the device, calibration pass, searches, rounding, next block's inputs, back on the CPU
    peak_device_memory_bytes: int | None  # cuda: torch's peak allocation during the block; cpu: None (see _peak_device_memory)
    device: str  # "cpu" | "cuda": where it ran
    linears: int  # how many linears were quantized


def time_block_quantization(
    config: dict[str, Any],
    device: str = "auto",
    dtype: str | torch.dtype = "bfloat16",
    num_samples: int = 128,
    seqlen: int = 512,
    settings: AWQSettings | None = None,
    seed: int = 0,
) -> BlockTiming:
    """Time the pipeline's per-block work (awq.quantize_blocks) on one random decoder block.

    `config` is a Hugging Face config dict naming its model_type (e.g. Llama-3-8B's: hidden 4096,
    intermediate 14336, 32 heads, 8 kv heads); the block is built from it with random weights in
    `dtype` (the checkpoint's storage dtype), without the rest of the model: one layer and a tiny
    vocabulary, whose only use is to produce the block's kwargs (positions, rotary tables, masks)
    as the pipeline captures them. The calibration inputs are random hidden states,
    [num_samples, seqlen, hidden], fp32 as the pipeline keeps them. `settings` default to the
    recipe defaults (AWQ, bf16 forward passes). The first call on a GPU also pays CUDA's start-up
    (kernel loading, cuBLAS handles): time a second call for a steady-state figure.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if "model_type" not in config:
        raise QuantkitError("the config has no model_type; pass a Hugging Face config dict (config.json's contents).")
    adapter = get_adapter(config["model_type"])
    run_on = torch.device(resolve_device(device))
    settings = settings or AWQSettings()
    _check_settings(settings, run_on)
    storage = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(storage, torch.dtype) or not storage.is_floating_point:
        raise QuantkitError(f"dtype {dtype!r} is not a floating-point torch dtype; use bfloat16, float16 or float32.")
    vocab = 256  # only one sample of token ids ever runs through the embedding
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "quantization_config")}
    # Special token ids would lie outside the tiny vocabulary, and no generation happens here.
    fields.update(num_hidden_layers=1, vocab_size=vocab, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if isinstance(fields.get("layer_types"), list):
        fields["layer_types"] = fields["layer_types"][:1]  # the first layer's kind (sliding or full attention)
    hf_config = AutoConfig.for_model(config["model_type"], **fields)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=storage).eval()
    blocks = adapter.blocks(model)
    check_group_sizes(blocks, adapter, settings.group_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seqlen), generator=generator)
    _, block_kwargs = capture_block_inputs(model, blocks, ids)
    hidden = torch.randn(num_samples, seqlen, hf_config.hidden_size, generator=generator)
    done: list[BlockDone] = []
    _reset_peak_device_memory(run_on)
    quantize_blocks(blocks, adapter, settings, hidden if settings.method == "awq" else None, block_kwargs, on_done=done.append, device=run_on)
    return BlockTiming(seconds=done[0].seconds, peak_device_memory_bytes=_peak_device_memory(run_on), device=run_on.type,
                       linears=len(done[0].linears))
