"""The artifact: the only contract between quantization and everything after it.

A directory holding safetensors shards in the AWQ GEMM layout, config.json with an AWQ
`quantization_config` (so vLLM, transformers and AutoAWQ read it), the tokenizer files and
`quantkit.json`, the manifest: provenance, settings, per-layer errors and a sha256 per file.

This module is the format's one writer and one reader:
- Writing: shards are saved durably (temp file, fsync, rename) and readable by all (0644);
  `complete_artifact` adds the index, config, tokenizer, the README.md model card
  (quantkit/model_card.py) and the manifest to a directory of shards, listing exactly the files
  it wrote; recording an evaluation re-renders the card (`append_to_manifest`); a full disk is
  one clear error naming the path and the free space. The directory is built beside the output
  and renamed into place, so an interrupted write leaves no half artifact.
- Reading: the manifest is the one list of the artifact's files. Loading re-hashes every
  listed file, refuses a weight file the manifest does not list (it would override real
  tensors), checks config.json's quantization settings against the tensors' shapes, and reads
  exactly the listed shards. `examine_artifact` collects every problem without raising, for
  `quantkit inspect`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import QuantkitError
from .model_card import render_model_card
from .pack import TensorMeta, check_packed_tensors, dequantize_awq, pack_awq
from .quantizer import QuantParams

MANIFEST_NAME = "quantkit.json"
CARD_NAME = "README.md"
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
# Files a loader (quantkit's, transformers', vLLM's) could take weights from: one in an artifact
# directory that the manifest does not list is refused, never read and never ignored silently.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
FILE_MODE = 0o644  # safetensors >= 0.7 creates its files 0600: artifacts are shared read-only
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------- what goes in


class PackedLinear(Protocol):
    """A quantized linear as the quantizer returns it: codes [out, in], their group params, a bias."""

    q: torch.Tensor
    params: QuantParams
    bias: torch.Tensor | None


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


def artifact_tensors(state_dict: Mapping[str, torch.Tensor], quantized: Mapping[str, PackedLinear], tied_lm_head: bool) -> dict[str, torch.Tensor]:
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


# ---------------------------------------------------------------------------- writing


class DiskFull(QuantkitError):
    pass


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors reports the OS error inside its own exception's text.
    return isinstance(e, SafetensorError) and ("os error 28" in str(e) or "No space left" in str(e) or "os error 122" in str(e))


@contextlib.contextmanager
def _writing(path: Path, hint: str) -> Iterator[None]:
    """Turns a full disk while writing `path` into one line naming the path, the free space and what to do."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if not _is_disk_full(e):
            raise
        try:
            left = shutil.disk_usage(path.parent).free
            free = f"{left / 2**20:,.1f} MiB free" if left >= 2**20 else f"{left:,} bytes free"
        except OSError:
            free = "free space unknown"
        raise DiskFull(f"no space left on the device writing {path} ({free} there); {hint}") from None


WRITE_AGAIN = "free some space (or write elsewhere) and run the command again."


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path` so that after a power loss either the old or the complete new file is there.

    Without the first fsync the rename can reach the disk before the data (an empty file that a
    commit record already counts); without the second the rename itself can be lost.
    """
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def save_shard(tensors: Mapping[str, torch.Tensor], path: Path, hint: str = WRITE_AGAIN) -> None:
    """Write a safetensors file durably and atomically, readable by all; a full disk is a DiskFull naming it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _writing(path, hint):
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, FILE_MODE)
            _durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str, hint: str = WRITE_AGAIN) -> None:
    """Replace a text file in one step (temp file, fsync, rename); a full disk is a DiskFull naming it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _writing(path, hint):
            tmp.write_text(text)
            _durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_names(count: int) -> list[str]:
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def complete_artifact(
    directory: Path, shards: Mapping[str, list[str]], total_size: int, config: dict, manifest: dict, tokenizer_dir: Path,
    hint: str = WRITE_AGAIN,
) -> None:
    """Turn a directory holding the saved `shards` (file name -> its tensors) into an artifact: the index
    (for several shards), config.json, the tokenizer files, README.md (the model card) and the
    manifest, which lists and hashes exactly these files. Everything is fsynced before it returns,
    so renaming the directory into place afterwards commits a durable artifact."""
    directory = Path(directory)
    written = list(shards)
    if len(shards) > 1:
        weight_map = {tensor: file for file, names in shards.items() for tensor in names}
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomically(directory / INDEX_NAME, json.dumps(index, indent=2), hint)
        written.append(INDEX_NAME)
    write_text_atomically(directory / "config.json", json.dumps(config, indent=2, sort_keys=True), hint)
    written.append("config.json")
    with _writing(directory, hint):
        written += copy_tokenizer_files(tokenizer_dir, directory)
    write_text_atomically(directory / CARD_NAME, _model_card(directory, manifest, config, shards), hint)
    written.append(CARD_NAME)
    for name in written:  # shards and texts were synced as written; the copies were not
        _fsync(directory / name)
    files = {name: file_sha256(directory / name) for name in sorted(written)}
    write_text_atomically(directory / MANIFEST_NAME, json.dumps({**manifest, "files": files}, indent=2), hint)
    _fsync(directory)


def write_artifact(
    out: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    manifest: dict,
    tokenizer_dir: Path,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write an artifact from tensors in memory (quantize streams blocks through quantkit.partial instead)."""
    out = Path(out)
    check_output_dir(out, force)
    with building_dir(out) as tmp:
        shards = _split(tensors, max_shard_bytes)
        names = shard_names(len(shards))
        for name, shard in zip(names, shards):
            save_shard(shard, tmp / name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        complete_artifact(tmp, {name: list(shard) for name, shard in zip(names, shards)}, total, config, manifest, tokenizer_dir)
    return out


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
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


def _model_card(directory: Path, manifest: Mapping, config: Mapping, shards) -> str:
    return render_model_card(manifest, config, {name: (Path(directory) / name).stat().st_size for name in shards})


def append_to_manifest(path: Path, key: str, entry: dict) -> None:
    """Append `entry` to the manifest's list `key` (an evaluation, say), and re-render the model card
    it describes, listing the card's new sha256: afterwards every listed file still verifies.

    Two files change, in this order: the new card is written and synced beside the old one, the
    manifest (the commit point) is replaced, then the card renamed into place. A full disk or a
    failure before the commit changes nothing; the one gap left is between the two renames. The card
    is re-rendered only where the manifest lists one: an artifact written before cards existed may
    hold a README.md of someone else's, which is theirs to keep.
    """
    path = Path(path)
    manifest = read_manifest(path)
    manifest.setdefault(key, []).append(entry)
    if CARD_NAME not in manifest["files"]:
        write_text_atomically(path / MANIFEST_NAME, json.dumps(manifest, indent=2))
        return
    shards = [name for name in manifest["files"] if name.endswith(".safetensors")]
    card = _model_card(path, manifest, read_json_object(path / "config.json"), shards)
    tmp = path / (CARD_NAME + ".tmp")
    try:
        with _writing(path / CARD_NAME, WRITE_AGAIN):
            tmp.write_text(card)
            os.chmod(tmp, FILE_MODE)
            _fsync(tmp)
        manifest["files"] = {**manifest["files"], CARD_NAME: file_sha256(tmp)}
        write_text_atomically(path / MANIFEST_NAME, json.dumps(manifest, indent=2))
    except BaseException:  # before the commit: the old card and manifest stand
        tmp.unlink(missing_ok=True)
        raise
    _durable_replace(tmp, path / CARD_NAME)


def check_output_dir(out: Path, force: bool) -> None:
    """Fail before any work is done if the output exists and --force was not given."""
    if out.exists() and not force:
        raise QuantkitError(f"output directory {out} already exists; pass --force to replace it or choose another -o.")
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output path {out} exists and is not a directory; remove it or choose another -o.")


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


def copy_tokenizer_files(source_dir: Path, target_dir: Path) -> list[str]:
    """The tokenizer and generation files of `source_dir` that exist, copied unchanged; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(target_dir) / name)
            os.chmod(Path(target_dir) / name, FILE_MODE)
            copied.append(name)
    return copied


def hash_files(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file in `directory` (not recursive), by name."""
    return {p.name: file_sha256(p) for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name not in exclude}


def replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- reading


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`, or a QuantkitError saying what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QuantkitError(f"{path} is missing; copy the complete directory.") from None
    except OSError as e:
        raise QuantkitError(f"cannot read {path} ({e}); check the file's permissions.") from None
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise QuantkitError(f"{path} is not valid JSON ({str(e)[:200]}); the file is damaged: copy or export it again.") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{path} holds {type(data).__name__}, not a JSON object; the file is damaged: export it again.")
    return data


def open_safetensors(file: Path):
    """safe_open that reports a damaged file as a QuantkitError naming it."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise QuantkitError(f"{file} is not a readable safetensors file ({e}); the checkpoint is damaged: copy it again.") from None


def header_meta(file: Path) -> dict[str, TensorMeta]:
    """Shape and dtype of every tensor in a safetensors file, from its header only."""
    with open_safetensors(file) as handle:
        out = {}
        for name in handle.keys():
            sl = handle.get_slice(name)
            out[name] = TensorMeta(tuple(sl.get_shape()), sl.get_dtype())
        return out


def read_manifest(path: Path) -> dict:
    """The manifest, refused unless it lists the artifact's files with a sha256 each."""
    path = Path(path)
    if not path.is_dir():
        raise QuantkitError(f"artifact {path} does not exist or is not a directory; pass the -o directory of `quantkit quantize`.")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise QuantkitError(f"{path} is not a quantkit artifact (no {MANIFEST_NAME}); pass the output directory of `quantkit quantize`.")
    manifest = read_json_object(manifest_path)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise QuantkitError(
            f"{manifest_path} lists no files (no 'files' entry with a sha256 per file), so nothing in {path} can be verified; "
            "the artifact is refused rather than served unverified: quantize it again."
        )
    for name, digest in files.items():
        if Path(name).name != name or name in (".", "..", MANIFEST_NAME):
            raise QuantkitError(f"{manifest_path} lists {name!r}, which is not a file of {path}; the manifest is damaged: quantize again.")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise QuantkitError(f"{manifest_path} gives {name} the sha256 {digest!r}, not 64 hex digits; the manifest is damaged: quantize again.")
    return manifest


@dataclass(frozen=True)
class FileCheck:
    name: str
    status: str = "ok"  # or MISSING, MISMATCH, UNLISTED, FAILED (unreadable, not a regular file)
    problem: str | None = None  # what is wrong and the fix

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _check_file(path: Path, expected: str) -> FileCheck:
    try:
        info = path.stat()  # follows a symlink (a hub cache links its blobs): what is read is what counts
    except FileNotFoundError:
        return FileCheck(path.name, "MISSING", "missing: the manifest lists it; copy the complete artifact")
    except OSError as e:
        return FileCheck(path.name, "FAILED", f"unreadable ({e.strerror}); check the file and its permissions")
    if not stat.S_ISREG(info.st_mode):
        target = f" (a link to {os.readlink(path)})" if path.is_symlink() else ""
        return FileCheck(path.name, "FAILED", f"not a regular file{target}; an artifact holds plain files: copy the real file here")
    try:
        actual = file_sha256(path)
    except OSError as e:
        return FileCheck(path.name, "FAILED", f"unreadable ({e.strerror}); check the file and its permissions")
    if actual != expected:
        return FileCheck(path.name, "MISMATCH", "sha256 mismatch: the file was changed or damaged since it was written; copy or quantize it again")
    return FileCheck(path.name)


def _unlisted_weight_files(path: Path, listed: Mapping[str, str]) -> list[FileCheck]:
    return [
        FileCheck(p.name, "UNLISTED", f"unlisted: a weight file that {MANIFEST_NAME} does not list (a loader could take tensors from it); "
                          "remove it, or quantize again if it belongs to the artifact")
        for p in sorted(path.iterdir())
        if p.name not in listed and (p.name.endswith(WEIGHT_FILE_SUFFIXES) or p.name == INDEX_NAME)
    ]


def verify_artifact(path: Path, manifest: dict | None = None) -> list[FileCheck]:
    """Re-hash every file the manifest lists, and flag weight files it does not list."""
    path = Path(path)
    listed = (manifest or read_manifest(path))["files"]
    return [_check_file(path / name, expected) for name, expected in sorted(listed.items())] + _unlisted_weight_files(path, listed)


def _weight_map(path: Path, listed: Mapping[str, str]) -> dict[str, str]:
    """Tensor name -> listed shard: the index if the manifest lists one, else the one listed shard."""
    shards = sorted(n for n in listed if n.endswith(".safetensors"))
    if not shards:
        raise QuantkitError(f"{path}/{MANIFEST_NAME} lists no .safetensors file; the artifact holds no weights: quantize again.")
    if INDEX_NAME not in listed:
        if len(shards) > 1:
            raise QuantkitError(f"{path}/{MANIFEST_NAME} lists {len(shards)} shards but no {INDEX_NAME}; the artifact is damaged: quantize again.")
        return {name: shards[0] for name in header_meta(path / shards[0])}
    mapping = read_json_object(path / INDEX_NAME).get("weight_map")
    if not isinstance(mapping, dict) or not mapping:
        raise QuantkitError(f"{path}/{INDEX_NAME} has no weight_map; the artifact is damaged: quantize again.")
    named = set(mapping.values())
    if named != set(shards):
        raise QuantkitError(
            f"{path}/{INDEX_NAME} names the shards {sorted(named)} but {MANIFEST_NAME} lists {shards}; the two must agree: quantize again."
        )
    return dict(mapping)


def tensors_by_file(mapping: Mapping[str, str]) -> dict[str, list[str]]:
    """Tensor name -> file, regrouped as file -> its tensors (files sorted): each shard is opened once."""
    by_file: dict[str, list[str]] = {}
    for name, file in mapping.items():
        by_file.setdefault(file, []).append(name)
    return dict(sorted(by_file.items()))


def read_tensors(path: Path, mapping: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The tensors `mapping` names (name -> file in `path`), each from its file; nothing else is read."""
    out: dict[str, torch.Tensor] = {}
    for file, names in tensors_by_file(mapping).items():
        with open_safetensors(Path(path) / file) as handle:
            out.update({name: handle.get_tensor(name) for name in names})
    return out


def tensor_meta(path: Path, mapping: Mapping[str, str]) -> dict[str, TensorMeta]:
    """Header metadata of each mapped tensor, from its shard; a tensor missing from its shard is damage."""
    meta: dict[str, TensorMeta] = {}
    for file, names in tensors_by_file(mapping).items():
        present = header_meta(path / file)
        absent = sorted(set(names) - set(present))
        if absent:
            raise QuantkitError(
                f"{path}: {INDEX_NAME} says {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''} are in {file}, but that "
                "file does not hold them; the index and shards are from different writes: copy them again."
            )
        meta.update({name: present[name] for name in names})
    return meta


def _check_quantization(path: Path, config: dict, meta: Mapping[str, TensorMeta]) -> None:
    """config.json's quantization_config states what the tensors are: refuse it where they disagree."""
    where = f"{path}/config.json"
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "awq":
        raise QuantkitError(f"{where} has no AWQ quantization_config; it is not a quantized artifact.")
    expected = {"bits": 4, "zero_point": True, "version": "gemm"}
    wrong = {k: q.get(k) for k, v in expected.items() if q.get(k) != v}
    if wrong:
        raise QuantkitError(f"{where}: quantization_config has {wrong}, but quantkit artifacts are {expected}; the config was edited: quantize again.")
    group_size = q.get("group_size")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise QuantkitError(f"{where}: quantization_config group_size is {group_size!r}, not an integer; the config was edited: quantize again.")
    not_converted = q.get("modules_to_not_convert") or []
    check_packed_tensors(meta, group_size, tuple(not_converted), path, "config.json's quantization_config")


@dataclass
class Examination:
    """Everything `quantkit inspect` and the loader need to know about an artifact directory."""

    path: Path
    manifest: dict
    files: list[FileCheck]
    config: dict | None = None
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    weight_map: dict[str, str] = field(default_factory=dict)
    problem: str | None = None  # of config.json or the tensors, once every file verified

    @property
    def ok(self) -> bool:
        return self.problem is None and all(f.ok for f in self.files)

    def describe(self) -> str:
        bad = [f"{f.name}: {f.problem}" for f in self.files if not f.ok]
        return "; ".join(bad + ([self.problem] if self.problem else []))


def examine_artifact(path: Path) -> Examination:
    """Verify an artifact without raising on damage: every listed file hashed, unlisted weight files
    flagged, then (only if all files verified) config.json parsed and checked against the tensor
    headers. Raises QuantkitError only when there is no usable manifest to check against."""
    path = Path(path)
    manifest = read_manifest(path)
    report = Examination(path, manifest, verify_artifact(path, manifest))
    config_ok = any(f.name == "config.json" and f.ok for f in report.files)
    try:
        if "config.json" not in manifest["files"]:
            raise QuantkitError(f"{path}/{MANIFEST_NAME} does not list config.json; the artifact is damaged: quantize again.")
        if config_ok:
            report.config = read_json_object(path / "config.json")
        if not all(f.ok for f in report.files):
            return report  # damaged files are not parsed: their bytes are not what was written
        report.weight_map = _weight_map(path, manifest["files"])
        report.tensors = tensor_meta(path, report.weight_map)
        _check_quantization(path, report.config, report.tensors)
    except QuantkitError as e:
        report.problem = str(e)
    return report


@dataclass
class Artifact:
    path: Path
    config: dict
    manifest: dict
    weight_map: dict[str, str]  # tensor -> the listed shard holding it

    @property
    def quantization(self) -> dict:
        return self.config["quantization_config"]

    @property
    def weight_files(self) -> list[Path]:
        """The shards the manifest lists, and no other file."""
        return [self.path / name for name in sorted(set(self.weight_map.values()))]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the index (or the one listed shard) names, each read from its listed shard."""
        return dict(sorted(read_tensors(self.path, self.weight_map).items()))


def load_artifact(path: Path) -> Artifact:
    """The artifact, once every listed file verified and its config describes its tensors; else a
    QuantkitError naming each problem and the fix."""
    report = examine_artifact(path)
    if not report.ok:
        raise QuantkitError(f"artifact {path} failed verification ({report.describe()}).")
    return Artifact(path=Path(path), config=report.config, manifest=report.manifest, weight_map=report.weight_map)


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
