"""Export a quantkit artifact to other checkpoint formats: compressed-tensors, and GGUF (export_gguf.py).

The compressed-tensors "pack-quantized" layout is what llm-compressor writes and what vLLM
(and transformers, through the compressed-tensors library) load. Per quantized linear with
weight W [out, in] and group size g it stores
  weight_packed      int32 [out, ceil(in / 8)]  codes, 8 per int32 along the input dim,
                                                element k of a word at bits 4*k .. 4*k+3
  weight_scale       fp16  [out, in / g]
  weight_zero_point  int32 [out / 8, in / g]    zero points, packed the same way but along
                                                the output dim (compressed-tensors' packed_dim=0)
  weight_shape       int64 [2]                  (out, in)
compressed-tensors thinks of 4-bit codes as signed values in [-8, 7] and packs them shifted by
+8, i.e. as the unsigned nibble 0..15. Its dequantization is
  (q_signed - zp_signed) * scale = ((q - 8) - (z - 8)) * s = (q - z) * s,
so AWQ's unsigned codes q and zero points z go into the nibbles unchanged, the scales are
AWQ's fp16 scales transposed, and the dense weights are bit-identical to dequantize_awq.
Only the packing order differs: AWQ packs along the output dim in AWQ_ORDER, compressed-tensors
packs along the input dim in natural order.

The export is built in a temporary sibling directory and renamed into place, like
write_artifact, and carries its own manifest (`quantkit_export.json`) tying it to the source.
A GGUF export is such a directory too, holding one `model.gguf` (tokenizer and chat template
inside it) beside the manifest, so --force and the all-or-nothing write work the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import __version__ as quantkit_version
from .artifact import (
    INDEX_NAME,
    MANIFEST_NAME,
    Artifact,
    building_dir,  # the same temp dir and swap as write_artifact, so --force behaves identically
    check_output_dir,
    copy_tokenizer_files,
    file_sha256,
    hash_files,
    load_artifact,
    save_shard,
)
from .errors import QuantkitError
from .export_formats import COMPRESSED_TENSORS, GGUF, SUPPORTED_FORMATS
from .pack import NATURAL_ORDER, PACK_FACTOR, pack_int4, unpack_awq

EXPORT_MANIFEST_NAME = "quantkit_export.json"


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned nibbles [rows, cols] (0..15) into int32 [rows, ceil(cols / 8)].

    Element k of a row lands in word k // 8 at bits 4 * (k % 8): the layout of
    compressed_tensors' pack_to_int32(values - 8, 4) (its +8 shift undoes our -8).
    A partial last word is zero-padded, as pack_to_int32 pads before packing.
    """
    padded = torch.nn.functional.pad(values, (0, -values.shape[1] % PACK_FACTOR))
    return pack_int4(padded, NATURAL_ORDER)


def awq_to_pack_quantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """One AWQ GEMM triplet -> the four compressed-tensors pack-quantized tensors (local names)."""
    q, params = unpack_awq(qweight, qzeros, scales)  # q [out, in], zeros [out, n_groups], unsigned
    out_features, in_features = q.shape
    return {
        "weight_packed": pack_int4_rows(q),
        # The stored fp16 scales, not params.scales (fp32): the bits must not change.
        "weight_scale": scales.t().contiguous(),
        # packed_dim=0: pack the transposed zeros along the output dim, then transpose back.
        "weight_zero_point": pack_int4_rows(params.zeros.t()).t().contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }


def ignore_list(awq_config: dict) -> list[str]:
    """compressed-tensors `ignore` for AWQ's modules_to_not_convert (AWQ matches substrings)."""
    ignore = ["lm_head"]
    for module in awq_config.get("modules_to_not_convert") or []:
        if module != "lm_head":
            ignore.append(f"re:.*{re.escape(module)}.*")
    return ignore


def compressed_tensors_config(group_size: int, ignore: list[str], bits: int = 4) -> dict:
    """The config.json `quantization_config` for asymmetric int4 group quantization.

    Built from the library's own pydantic models so that it validates by construction, and
    wrapped with the same top-level keys ModelCompressor.update_config writes.
    """
    # Imported here: compressed_tensors takes seconds to import, and only exports need it.
    import compressed_tensors
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        QuantizationStrategy,
        QuantizationType,
    )

    weights = QuantizationArgs(
        num_bits=bits,
        type=QuantizationType.INT,
        symmetric=False,
        group_size=group_size,
        strategy=QuantizationStrategy.GROUP,
    )
    config = QuantizationConfig(
        config_groups={
            "group_0": QuantizationScheme(targets=["Linear"], weights=weights, format=CompressionFormat.pack_quantized.value)
        },
        ignore=ignore,
        format=CompressionFormat.pack_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED.value,
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": COMPRESSED_TENSORS,
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(mode="json", exclude={"quant_method"}),
    }


def _check_paths(source: Path, out: Path) -> None:
    """--force replaces `out`: never let that delete the source artifact."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or src.is_relative_to(dst):
        raise QuantkitError(f"output directory {out} would overwrite the source artifact {source}; choose another -o.")


class _TensorReader:
    """Reads single tensors by name from an artifact's shards, keeping the files open."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self.handles: dict[str, Any] = {}
        self.by_file: dict[Path, list[str]] = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            self.by_file[f] = sorted(handle.keys())
            self.handles.update({name: handle for name in self.by_file[f]})

    def get(self, name: str) -> torch.Tensor:
        return self.handles[name].get_tensor(name)


def _converted_shard(names: list[str], reader: _TensorReader) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors for one source shard: triplets converted, everything else as is.

    A module's converted tensors go to the shard holding its qweight, even when its qzeros or
    scales sit in the next shard, so no module is split across output shards.
    """
    for name in names:
        if name.endswith((".qzeros", ".scales")):
            continue  # consumed with their qweight
        if not name.endswith(".qweight"):
            yield name, reader.get(name)
            continue
        module = name[: -len(".qweight")]
        qweight, scales = reader.get(name), reader.get(f"{module}.scales")
        for local, tensor in awq_to_pack_quantized(qweight, reader.get(f"{module}.qzeros"), scales).items():
            yield f"{module}.{local}", tensor


def _write_compressed_tensors(artifact: Artifact, tmp: Path) -> dict:
    """Shards, index, config.json and the tokenizer files into `tmp`; returns the manifest's format entries."""
    group_size = artifact.quantization["group_size"]  # load_artifact checked the settings against the tensors
    files = artifact.weight_files
    weight_map: dict[str, str] = {}
    total = 0
    with ExitStack() as stack:
        reader = _TensorReader(files, stack)
        for f in files:
            shard = dict(_converted_shard(reader.by_file[f], reader))
            save_shard(dict(sorted(shard.items())), tmp / f.name)
            weight_map.update({n: f.name for n in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
    quantization_config = compressed_tensors_config(group_size, ignore_list(artifact.quantization))
    config = {**artifact.config, "quantization_config": quantization_config}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_tokenizer_files(artifact.path, tmp)
    return {"compressed_tensors_version": quantization_config["version"]}


def _write_gguf(artifact: Artifact, tmp: Path) -> dict:
    from .export_gguf import write_gguf  # gguf and the runtime's config parsers: loaded only for this format

    return write_gguf(artifact, tmp)


def _check_gguf(artifact: Artifact) -> None:
    from .export_gguf import check_gguf_exportable

    check_gguf_exportable(artifact)


_WRITERS = {COMPRESSED_TENSORS: _write_compressed_tensors, GGUF: _write_gguf}
# What a format cannot hold is refused before anything is written (compressed-tensors holds any artifact).
_CHECKS = {GGUF: _check_gguf}


def export_artifact(artifact_path: Path | str, out_dir: Path | str, fmt: str = COMPRESSED_TENSORS, force: bool = False) -> Path:
    """Write the artifact at `artifact_path` in format `fmt` to `out_dir`; returns `out_dir`.

    The source is loaded through load_artifact, so its hashes are verified first. Nothing
    appears at `out_dir` unless the whole export succeeded.
    """
    if fmt not in SUPPORTED_FORMATS:
        raise QuantkitError(f"unknown export format '{fmt}'; supported formats: {', '.join(SUPPORTED_FORMATS)}.")
    source, out = Path(artifact_path), Path(out_dir)
    _check_paths(source, out)
    check_output_dir(out, force)
    artifact = load_artifact(source)
    if fmt in _CHECKS:
        _CHECKS[fmt](artifact)

    with building_dir(out) as tmp:
        format_entries = _WRITERS[fmt](artifact, tmp)
        written = hash_files(tmp)
        manifest = {
            "format": fmt,
            "quantkit_version": quantkit_version,
            **format_entries,
            "source": {
                "path": str(source.resolve()),
                "manifest": MANIFEST_NAME,
                "manifest_sha256": file_sha256(source / MANIFEST_NAME),
                "files": artifact.manifest.get("files", {}),
            },
            "files": written,
        }
        (tmp / EXPORT_MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return out
