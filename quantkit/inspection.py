"""`quantkit inspect`: what an artifact holds, what it saves, and whether its files verify.

A foreign AWQ checkpoint (AutoAWQ's export, no quantkit.json) gets its settings, sizes and
whether quantkit can serve it (quantkit/autoawq.py's checks) instead of manifest and hashes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .artifact import MANIFEST_NAME, examine_artifact
from .autoawq import check_autoawq_checkpoint, declares_quantization, read_awq_settings
from .errors import QuantkitError

# Bytes per element of safetensors' dtype names.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1,
             "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1}


def size_summary(tensors_meta: dict[str, tuple[list[int], int]]) -> dict[str, int]:
    """Bytes of the artifact's tensors vs the same model stored densely in fp16.

    tensors_meta maps tensor name -> (shape, bytes per element).
    """
    packed_linear = dense_linear = other = 0
    for name, (shape, itemsize) in tensors_meta.items():
        nbytes = itemsize * _numel(shape)
        if name.endswith(".qweight"):
            in_features, words = shape
            dense_linear += in_features * words * 8 * 2  # eight fp16 weights per int32 word
            packed_linear += nbytes
        elif name.endswith((".qzeros", ".scales")):
            packed_linear += nbytes
        else:
            other += nbytes
    return {
        "linear_fp16_bytes": dense_linear,
        "linear_packed_bytes": packed_linear,
        "other_fp16_bytes": other,
        "model_fp16_bytes": dense_linear + other,
        "model_packed_bytes": packed_linear + other,
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _rounding(recipe: dict) -> str:
    """How the codes were rounded onto the grid, as the recipe recorded it (older artifacts: to nearest)."""
    if recipe.get("rounding", "nearest") != "gptq":
        return "codes rounded to nearest"
    return "codes rounded by GPTQ" + (" in act-order" if recipe.get("gptq_act_order") else "")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _echo_sizes(sizes: dict[str, int], echo: Callable[[str], None]) -> None:
    echo(f"{'':14}{'fp16':>14}{'packed':>14}{'ratio':>8}")
    echo(f"{'linears':14}{_mib(sizes['linear_fp16_bytes']):>14}{_mib(sizes['linear_packed_bytes']):>14}"
         f"{sizes['linear_fp16_bytes'] / max(sizes['linear_packed_bytes'], 1):>7.2f}x")
    echo(f"{'whole model':14}{_mib(sizes['model_fp16_bytes']):>14}{_mib(sizes['model_packed_bytes']):>14}"
         f"{sizes['model_fp16_bytes'] / max(sizes['model_packed_bytes'], 1):>7.2f}x")
    echo("  (embeddings, norms and lm_head stay fp16)")


def inspect_autoawq(path: Path, echo: Callable[[str], None] = print) -> bool:
    """Settings, files and sizes of a foreign AWQ checkpoint; returns whether quantkit can serve it."""
    settings = read_awq_settings(path)  # unreadable or contradictory settings: nothing to show
    echo(f"checkpoint    {path}  (foreign AWQ export: no quantkit.json, so no provenance or hashes)")
    q = settings.quantization_config()
    echo(f"quantization  {q['quant_method']} {q['bits']}-bit, group {q['group_size']}, zero_point={q['zero_point']}, "
         f"version={q['version']}, not converted: {q['modules_to_not_convert']}  (from {settings.source})")
    try:
        checkpoint = check_autoawq_checkpoint(path)
    except QuantkitError as e:
        echo(f"servable      NO: {e}")
        return False
    config = checkpoint.config
    echo(f"model         {config.get('model_type')} ({config.get('architectures', ['?'])[0]}), "
         f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}")
    echo(f"weights       {', '.join(checkpoint.files)}")
    echo("")
    _echo_sizes(size_summary({n: (list(m.shape), _ITEMSIZE[m.dtype]) for n, m in checkpoint.tensors.items()}), echo)
    echo("")
    echo(f"servable      yes: {len(checkpoint.quantized_modules)} packed linears in the AWQ GEMM layout")
    return True


def inspect_artifact(path: Path, show_layers: bool = True, echo: Callable[[str], None] = print) -> bool:
    """Print the report; returns False when any file fails verification or the config does not
    describe the tensors. Damage is reported line by line, never raised: only a directory without a
    usable manifest is an error."""
    path = Path(path)
    if declares_quantization(path):
        return inspect_autoawq(path, echo)
    report = examine_artifact(path)
    manifest, config = report.manifest, report.config or {}
    echo(f"artifact      {path}")
    if report.config is not None:
        q = config.get("quantization_config") or {}
        echo(f"model         {config.get('model_type')} ({(config.get('architectures') or ['?'])[0]}), "
             f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
             f"{config.get('num_attention_heads')} heads / {config.get('num_key_value_heads')} kv heads")
        echo(f"quantization  {q.get('quant_method')} {q.get('bits')}-bit, group {q.get('group_size')}, "
             f"zero_point={q.get('zero_point')}, version={q.get('version')}, not converted: {q.get('modules_to_not_convert')}")
    recipe = (manifest.get("recipe") or {}).get("quantization") or {}
    source = manifest.get("source") or {}
    echo(f"method        {recipe.get('method')}, {_rounding(recipe)}  (source {source.get('spec')}, "
         f"weights sha256 {str(source.get('weights_sha256', ''))[:16]}...)")
    calib = manifest.get("calibration")
    if calib:
        echo(f"calibration   {calib.get('source')}: {calib.get('samples')} x {calib.get('seqlen')} tokens, seed {calib.get('seed')}")
    timings = manifest.get("timings", {})
    if timings:
        echo(f"time          {timings.get('total_s', 0):.1f} s total, {timings.get('quantize_s', 0):.1f} s quantizing; "
             f"peak RSS {_mib(manifest.get('peak_rss_bytes', 0))}")
    ran_on = manifest.get("device")
    if ran_on:
        peak = ran_on.get("peak_memory_bytes")
        echo(f"device        {ran_on.get('type')}" + (f", peak GPU memory {_mib(peak)}" if peak else ""))

    if report.tensors:
        echo("")
        _echo_sizes(size_summary({n: (list(m.shape), _ITEMSIZE.get(m.dtype, 0)) for n, m in report.tensors.items()}), echo)

    layers = manifest.get("layers", {})
    if show_layers and layers and report.ok:
        echo("")
        echo(f"{'layer':48}{'shape':>14}{'weight err':>12}{'output err':>12}")
        for name, row in layers.items():
            out_err = row.get("output_rel_err")
            echo(f"{name:48}{'x'.join(map(str, row['shape'])):>14}{row['weight_rel_err']:>12.2e}"
                 f"{(f'{out_err:.2e}' if out_err is not None else '-'):>12}")
        echo("  (relative squared error ||W_q - W||^2/||W||^2; output err on calibration tokens)")

    echo("")
    for c in report.files:
        echo(f"sha256 ok     {c.name}" if c.ok else f"FAILED        {c.name}: {c.problem}")
    if report.problem:
        echo(f"FAILED        {report.problem}")
    listed = [c for c in report.files if c.status != "UNLISTED"]
    echo(f"verification  {'passed' if report.ok else 'FAILED'} ({sum(c.ok for c in listed)}/{len(listed)} files "
         f"listed in {MANIFEST_NAME} verified)")
    return report.ok
