"""The artifact: the only contract between quantization and everything after it.

A directory holding safetensors shards in the AWQ GEMM layout, config.json with an AWQ
`quantization_config` (so vLLM, transformers and AutoAWQ read it), the tokenizer files and
`quantkit.json`, the manifest: provenance, settings, per-layer errors and a sha256 per file.
It is built in a temporary sibling directory and renamed into place, so an interrupted write
leaves no half artifact; loading re-hashes every file before trusting it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .awq import QuantizedLinear
from .errors import QuantkitError
from .pack import dequantize_awq, pack_awq

MANIFEST_NAME = "quantkit.json"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales")


def awq_quantization_config(group_size: int, bits: int = 4) -> dict:
    """The `quantization_config` that transformers' AwqConfig and vLLM's AWQ loader parse."""
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }


def artifact_tensors(state_dict: Mapping[str, torch.Tensor], quantized: Mapping[str, QuantizedLinear], tied_lm_head: bool) -> dict[str, torch.Tensor]:
    """Packed triplets for quantized linears, fp16 copies of everything else."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        module = name.rsplit(".", 1)[0]
        if module in quantized or (tied_lm_head and name == "lm_head.weight"):
            continue
        tensors[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    for module, ql in quantized.items():
        for suffix, tensor in pack_awq(ql.q, ql.params).items():
            tensors[f"{module}.{suffix}"] = tensor
        if ql.bias is not None:
            tensors[f"{module}.bias"] = ql.bias.to(torch.float16)
    return {name: t.contiguous() for name, t in sorted(tensors.items())}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def check_output_dir(out: Path, force: bool) -> None:
    """Fail before any work is done if the output exists and --force was not given."""
    if out.exists() and not force:
        raise QuantkitError(f"output directory {out} already exists; pass --force to replace it or choose another -o.")
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output path {out} exists and is not a directory; remove it or choose another -o.")


def write_artifact(
    out: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    manifest: dict,
    tokenizer_dir: Path,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the artifact to a temporary sibling directory, hash it, then rename it to `out`."""
    out = Path(out)
    check_output_dir(out, force)
    with building_dir(out) as tmp:
        shards = _shards(tensors, max_shard_bytes)
        names = ["model.safetensors"] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            weight_map = {t: name for name, shard in zip(names, shards) for t in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        copy_tokenizer_files(tokenizer_dir, tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps({**manifest, "files": hash_files(tmp)}, indent=2))
    return out


@contextlib.contextmanager
def building_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to fill; renamed to `out` (replacing it) only if the block succeeds.

    A failure or an interruption removes it, so `out` is either the old directory or the complete new one.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(source_dir: Path, target_dir: Path) -> None:
    """The tokenizer and generation files of `source_dir` that exist, copied unchanged."""
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(target_dir) / name)


def hash_files(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file in `directory` (not recursive), by name: what a manifest records."""
    return {p.name: file_sha256(p) for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name not in exclude}


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `directory`."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class FileCheck:
    name: str
    expected: str
    actual: str | None  # None: the file is missing

    @property
    def ok(self) -> bool:
        return self.actual == self.expected


@dataclass
class Artifact:
    path: Path
    config: dict
    manifest: dict

    @property
    def quantization(self) -> dict:
        return self.config["quantization_config"]

    @property
    def weight_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def tensors(self) -> dict[str, torch.Tensor]:
        return read_safetensors_dir(self.path)


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise QuantkitError(f"artifact {path} does not exist or is not a directory; pass the -o directory of `quantkit quantize`.")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise QuantkitError(f"{path} is not a quantkit artifact (no {MANIFEST_NAME}); pass the output directory of `quantkit quantize`.")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{manifest_path} is not valid JSON ({e}); the artifact is damaged: quantize again.") from None


def verify_artifact(path: Path) -> list[FileCheck]:
    """Re-hash every file the manifest lists."""
    manifest = read_manifest(path)
    checks = []
    for name, expected in sorted(manifest.get("files", {}).items()):
        f = Path(path) / name
        checks.append(FileCheck(name, expected, file_sha256(f) if f.is_file() else None))
    return checks


def load_artifact(path: Path, verify: bool = True) -> Artifact:
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        bad = [c for c in verify_artifact(path) if not c.ok]
        if bad:
            detail = "; ".join(f"{c.name}: {'missing' if c.actual is None else 'sha256 mismatch'}" for c in bad)
            raise QuantkitError(f"artifact {path} failed verification ({detail}); the files were changed or damaged: copy or quantize it again.")
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "awq":
        raise QuantkitError(f"{path}/config.json has no AWQ quantization_config; it is not a quantized artifact.")
    return Artifact(path=path, config=config, manifest=manifest)


def dequantized_state_dict(artifact: Artifact, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dense weights equivalent to the artifact (nn.Linear layout), for reference computations."""
    tensors = artifact.tensors()
    dense = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            dense[f"{module}.weight"] = dequantize_awq(t, tensors[f"{module}.qzeros"], tensors[f"{module}.scales"], dtype)
        elif not name.endswith(QUANTIZED_SUFFIXES):
            dense[name] = t.to(dtype) if t.is_floating_point() else t
    return dense


def load_dequantized_model(artifact: Artifact, dtype: torch.dtype = torch.float32):
    """A transformers model holding the artifact's dequantized weights (for evaluation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {k: v for k, v in artifact.config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    missing, unexpected = model.load_state_dict(dequantized_state_dict(artifact, dtype), strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise QuantkitError(f"artifact {artifact.path} does not match its config: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    return model
