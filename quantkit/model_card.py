"""The artifact's README.md: a model card rendered from its manifest and config.

Pure formatting (dicts in, text out): quantkit/artifact.py, the format's one writer, renders it
when an artifact is completed and again whenever an evaluation is recorded, then lists and hashes
it like every other file. The same inputs always give the same text (no clock, no paths of its
own), so the card's hash only changes when what it describes does. A manifest with parts missing
(older artifacts, tests' minimal ones) still renders: whatever is unknown says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from .errors import QuantkitError
from .gates import format_markdown

# The upstream hub id of each spec that names the embedded default model (quantkit/sources.py).
_EMBEDDED = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Licenses known for certain, by upstream hub id prefix; anything else points at the source's own.
_LICENSES = {"huggingfacetb/smollm2-": ("Apache-2.0", "apache-2.0")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
SHOWN_EVALUATIONS = 3  # newest first; the manifest keeps them all
PLACEHOLDER = "MODEL_DIR"  # the card cannot know where the directory will live (or its hub id)


def render_model_card(manifest: Mapping[str, Any], config: Mapping[str, Any], file_sizes: Mapping[str, int]) -> str:
    """README.md for an artifact: `manifest` as quantkit.json holds it (its "files" are not needed),
    `config` as config.json, `file_sizes` bytes by file name (the .safetensors ones are summed)."""
    source = _mapping(manifest.get("source"))
    recipe = _mapping(manifest.get("recipe"))
    settings = _mapping(recipe.get("quantization"))
    quant = _mapping(config.get("quantization_config"))
    group = quant.get("group_size", settings.get("group_size"))
    bits = quant.get("bits", settings.get("bits", 4))
    upstream = upstream_model(source)
    license_ = known_license(upstream)
    name = _display_name(source, upstream)

    parts = [
        _front_matter(upstream, license_),
        f"# {_title(name, bits, settings.get('method'), group)}\n",
        f"{_method(settings)} quantization of `{source.get('spec', 'an unrecorded source model')}` to {bits}-bit weights, made with "
        f"quantkit {manifest.get('quantkit_version', '(version not recorded)')}"
        + (f" on {manifest['created']}" if manifest.get("created") else "") + ". "
        "The files are an ordinary AWQ GEMM checkpoint (safetensors), so quantkit, vLLM and transformers load them.\n",
        _quantization_section(manifest, source, settings, quant, bits, group),
        _recipe_section(recipe, source),
        _size_section(manifest, file_sizes, group),
        _accuracy_section(manifest.get("evaluations")),
        _usage_section(),
        _license_section(license_, upstream),
    ]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


# ---------------------------------------------------------------------------- what the source is


def upstream_model(source: Mapping[str, Any]) -> str | None:
    """The source's Hugging Face hub id, when the manifest shows one: the embedded default's
    upstream, or a hub id that was downloaded (its path is then in the hub's cache layout; a
    relative directory such as out/model looks like a hub id but is not)."""
    spec = str(source.get("spec") or "")
    if spec.strip().lower() in _EMBEDDED:
        return _EMBEDDED[spec.strip().lower()]
    if _HUB_ID.match(spec):
        org, model = spec.split("/")
        if f"models--{org}--{model}" in str(source.get("path") or ""):
            return spec
    return None


def known_license(upstream: str | None) -> tuple[str, str] | None:
    """(name, hub metadata id) of the source's license where quantkit knows it for certain."""
    if not upstream:
        return None
    return next((lic for prefix, lic in _LICENSES.items() if upstream.lower().startswith(prefix)), None)


def _display_name(source: Mapping[str, Any], upstream: str | None) -> str:
    spec = str(upstream or source.get("spec") or "model").rstrip("/")
    return spec.rsplit("/", 1)[-1] or "model"


def _front_matter(upstream: str | None, license_: tuple[str, str] | None) -> str:
    """The Hub's metadata block: what it can show (base model, license) without reading the text."""
    meta: dict[str, Any] = {}
    if license_:
        meta["license"] = license_[1]
    if upstream:
        meta["base_model"] = upstream
    meta["tags"] = ["quantkit", "awq", "int4"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


# ---------------------------------------------------------------------------- sections


def _title(name: str, bits: Any, method: Any, group: Any) -> str:
    short = {"awq": " AWQ", "rtn": " RTN"}.get(str(method), "")
    return f"{name} — int{bits}{short}" + (f", group {group}" if group else "")


def _method(settings: Mapping[str, Any]) -> str:
    return {"awq": "AWQ", "rtn": "Round-to-nearest (RTN)"}.get(str(settings.get("method")), "int4")


def _rounding(settings: Mapping[str, Any]) -> str:
    if settings.get("rounding", "nearest") != "gptq":
        return "to nearest"
    order = " (act-order: columns of the largest inputs first)" if settings.get("gptq_act_order") else ""
    return "in GPTQ's error-compensating order" + order


def _quantization_section(manifest, source, settings, quant, bits, group) -> str:
    method = settings.get("method")
    how = {
        "awq": "activation-aware per-channel scales searched on calibration text"
               + (", per-group clipping" if settings.get("clip") else "") + ", then int4 codes",
        "rtn": "codes on each group's min-max grid (no calibration)",
    }.get(str(method), "not recorded")
    rows = [
        ("source model", f"`{source['spec']}`" if source.get("spec") else "not recorded"),
        ("source weights sha256", f"`{source['weights_sha256']}`" if source.get("weights_sha256") else "not recorded"),
        ("method", f"{_method(settings)}: {how}" if method else "not recorded"),
        ("rounding", f"codes rounded {_rounding(settings)}" if method else "not recorded"),
        ("weights", f"{bits}-bit, group size {group or 'not recorded'}, asymmetric (a zero point per group), AWQ GEMM layout "
                    f"(`quant_method: {quant.get('quant_method', 'awq')}`, `version: {quant.get('version', 'gemm')}`)"),
        ("kept in fp16", ", ".join([f"`{m}`" for m in quant.get("modules_to_not_convert") or []] + ["embeddings", "norms"])),
        ("calibration", _calibration(manifest.get("calibration"), method)),
    ]
    lines = ["## Quantization\n", "| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _calibration(record: Any, method: Any) -> str:
    if not isinstance(record, Mapping):
        return "none (round-to-nearest needs no calibration)" if method == "rtn" else "not recorded"
    samples, seqlen = record.get("samples"), record.get("seqlen")
    counted = isinstance(samples, int) and isinstance(seqlen, int)
    tokens = f"{samples} samples x {seqlen} tokens = {samples * seqlen:,} tokens" if counted else "token count not recorded"
    sha = f", tokens sha256 `{record['tokens_sha256']}`" if record.get("tokens_sha256") else ""
    return f"{record.get('source', 'source not recorded')}; {tokens}, seed {record.get('seed', 'not recorded')}{sha}"


def _recipe_section(recipe: Mapping[str, Any], source: Mapping[str, Any]) -> str:
    if not recipe:
        return ""
    model = source.get("spec") or "MODEL"
    return (
        f"## Recipe\n\nThe recipe as recorded (`{recipe.get('name', 'unnamed')}`). Saved as `recipe.yaml`, it reproduces the "
        f"quantization: `quantkit quantize {model} --recipe recipe.yaml -o OUT`.\n\n"
        "```yaml\n" + yaml.safe_dump(dict(recipe), sort_keys=False) + "```\n"
    )


def _size_section(manifest: Mapping[str, Any], file_sizes: Mapping[str, int], group: Any) -> str:
    shards = {n: s for n, s in file_sizes.items() if n.endswith(".safetensors")}
    lines = ["## Size\n"]
    if shards:
        lines.append(f"- weights on disk: {_mib(sum(shards.values()))} in {len(shards)} safetensors file{'s' if len(shards) > 1 else ''}")
    layers = _mapping(manifest.get("layers"))
    weights = sum(_numel(entry.get("shape")) for entry in layers.values() if isinstance(entry, Mapping))
    if weights and isinstance(group, int) and group > 0:
        per_weight = 0.5 + 2.5 / group  # a 4-bit code, plus an fp16 scale and a 4-bit zero per group
        lines.append(
            f"- quantized linears: {weights:,} weights in {len(layers)} layers, {_mib(2 * weights)} in fp16 -> "
            f"{_mib(per_weight * weights)} packed ({8 * per_weight:.3g} bits per weight with group {group}'s scales and zeros, "
            f"{2 / per_weight:.2f}x smaller)"
        )
    return "\n".join(lines) + "\n" if len(lines) > 1 else ""


def _accuracy_section(evaluations: Any) -> str:
    head = "## Accuracy\n\n"
    entries = [e for e in evaluations if isinstance(e, Mapping)] if isinstance(evaluations, list) else []
    if not entries:
        return head + (f"Not evaluated yet. `quantkit eval {PLACEHOLDER}` measures it against the source model "
                       "(the same tasks, runtime and dtype for both) and adds the table here.\n")
    out = [head + "Measured by `quantkit eval` against the source model (the same lm-eval tasks, runtime and dtype for "
           "both): retention is int4 / baseline for accuracy (± its paired standard error, in points), increase is int4 / baseline - 1 "
           "for perplexity. Newest first.\n"]
    for entry in reversed(entries[-SHOWN_EVALUATIONS:]):
        baseline = _mapping(entry.get("baseline"))
        limit = entry.get("limit")
        scope = f"the first {limit} examples of each task" if limit else "every example"
        out.append(f"### {entry.get('date', 'undated')}: {scope}\n\nbaseline `{baseline.get('model', 'not recorded')}` "
                   f"({baseline.get('dtype', 'dtype not recorded')}), lm-eval {entry.get('lm_eval_version', '(version not recorded)')}\n")
        try:
            out.append(format_markdown(entry) + "\n")
        except QuantkitError as e:  # an entry not in report form: say so, never fail the write
            out.append(f"(this evaluation's results are not in report form: {e})\n")
    if len(entries) > SHOWN_EVALUATIONS:
        out.append(f"{len(entries) - SHOWN_EVALUATIONS} earlier evaluation(s) are in quantkit.json.\n")
    return "\n".join(out)


def _usage_section() -> str:
    d = PLACEHOLDER
    return f"""## Use it

`{d}` is this directory (or its hub id, once uploaded).

**quantkit** (CPU runtime: paged KV cache, continuous batching, fused int4 kernels; verifies every file's sha256 on load):

```bash
quantkit serve {d}            # OpenAI-compatible API on http://127.0.0.1:8000/v1
quantkit inspect {d}          # settings, sizes, per-layer errors, hash check
```

```python
from quantkit import LLM, SamplingParams
print(LLM("{d}").generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))[0].text)
```

**vLLM** (GPU) detects AWQ from config.json's `quantization_config`, so `--quantization awq` only states it; which
kernel runs (Marlin or the plain AWQ GEMM) depends on the vLLM release and the GPU:

```bash
vllm serve {d} --quantization awq --dtype float16
```

**transformers** 5 has no AWQ kernels of its own: it loads AWQ checkpoints through gptqmodel, which costs a
`pip install gptqmodel` (with accelerate) that brings gptqmodel's compiled kernels and their dependencies (a prebuilt
wheel matching your torch and CUDA, or a build from source). quantkit and vLLM need none of it.

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{d}", dtype=torch.float16, device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{d}")
```

`quantkit.json` is the manifest: provenance, settings, per-layer errors, timings, recorded evaluations and the sha256 of
every file (this one included).
"""


def _license_section(license_: tuple[str, str] | None, upstream: str | None) -> str:
    if license_:
        return f"## License\n\n{license_[0]}, the license of the source model (`{upstream}`), whose weights these are derived from.\n"
    return "## License\n\nThese weights are derived from the source model's: see the source model's license.\n"


# ---------------------------------------------------------------------------- helpers


def _mapping(x: Any) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}


def _numel(shape: Any) -> int:
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) for d in shape):
        return 0
    n = 1
    for d in shape:
        n *= d
    return n


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
