"""`quantkit quantize` as a function: resolve, calibrate, quantize, pack, write."""

from __future__ import annotations

import datetime
import json
import platform
import resource
import time
from pathlib import Path

import torch
import transformers

from . import __version__
from .artifact import artifact_tensors, awq_quantization_config, check_output_dir, write_artifact
from .awq import ProgressFn, QuantizeResult, check_group_sizes, quantize_model
from .calibration import build_calibration_set, calibration_sha256, load_calibration_texts
from .errors import QuantkitError
from .models import get_adapter
from .quantizer import SUPPORTED_BITS
from .recipe import Recipe
from .sources import load_model, load_tokenizer, resolve_model, weights_sha256


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


def read_model_type(model_dir: Path) -> str:
    try:
        return json.loads((model_dir / "config.json").read_text())["model_type"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{model_dir}/config.json is unreadable or has no model_type ({e}); pass a Hugging Face model directory.") from None


def quantize(
    model_spec: str,
    out: Path,
    recipe: Recipe,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Quantize `model_spec` as `recipe` says and write the artifact to `out`."""
    settings, calib = recipe.quantization, recipe.calibration
    if settings.method not in ("awq", "rtn"):
        raise QuantkitError(f"unknown method '{settings.method}'; use 'awq' or 'rtn'.")
    if settings.compute_dtype not in ("bfloat16", "float16", "float32"):
        raise QuantkitError(f"compute_dtype '{settings.compute_dtype}' is not supported; use bfloat16, float16 or float32.")
    if settings.clip_style not in ("symmetric", "range"):
        raise QuantkitError(f"clip_style '{settings.clip_style}' is not supported; use symmetric or range.")
    if settings.bits not in SUPPORTED_BITS:
        raise QuantkitError(f"{settings.bits}-bit quantization is not supported; use bits: 4.")
    out = Path(out)
    check_output_dir(out, force)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    model_dir = resolve_model(model_spec)
    adapter = get_adapter(read_model_type(model_dir))  # before loading weights: fail fast
    # Kept in its checkpoint dtype (fp16 for the default model: half the memory of fp32);
    # each block is raised to fp32 only while it is being quantized.
    model = load_model(model_dir, "auto")
    tokenizer = load_tokenizer(model_dir)
    check_group_sizes(adapter.blocks(model), adapter, settings.group_size)  # before calibrating
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

    t = time.perf_counter()
    result = quantize_model(model, adapter, settings, calib_ids, progress)
    timings["quantize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = awq_quantization_config(settings.group_size, settings.bits)
    config["torch_dtype"] = "float16"
    if "dtype" in config:
        config["dtype"] = "float16"
    tensors = artifact_tensors(model.state_dict(), result.linears, bool(getattr(model.config, "tie_word_embeddings", False)))
    manifest = _manifest(model_spec, model_dir, recipe, calib_record, result, timings)
    timings["write_s"] = time.perf_counter() - t  # hashing the shards is not counted
    timings["total_s"] = time.perf_counter() - start
    manifest["timings"] = {**timings, "per_block_s": [round(s, 3) for s in result.block_seconds]}
    manifest["peak_rss_bytes"] = peak_rss_bytes()
    return write_artifact(out, tensors, config, manifest, model_dir, force=force)


def _manifest(model_spec: str, model_dir: Path, recipe: Recipe, calib_record: dict | None, result: QuantizeResult, timings: dict) -> dict:
    alphas = {
        prefix + search.group.inspect: {"alpha": search.alpha, "linears": list(search.group.linears)}
        for prefix, searches in result.searches.items()
        for search in searches
    }
    layers = {
        name: {
            "shape": list(ql.q.shape),
            "weight_rel_err": ql.weight_rel_err,
            "output_rel_err": ql.output_rel_err,
        }
        for name, ql in result.linears.items()
    }
    return {
        "format": "quantkit-artifact/1",
        "quantkit_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"spec": str(model_spec), "path": str(model_dir), "weights_sha256": weights_sha256(model_dir)},
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
