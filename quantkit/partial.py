"""An artifact under construction: block shards written as blocks finish, resumable after a crash.

Layout of `.<out>.partial/` beside the output directory:
  block-00007.safetensors   packed tensors of finished block 7 (written temp + rename)
  hidden-00007.safetensors  the calibration activations leaving block 7 (AWQ only)
  partial.json              the commit point: identity of the run and the blocks finished
A block counts as finished only once partial.json says so, and partial.json is replaced
atomically after the block's files are in place, so a crash at any moment leaves a state that
resumes to exactly the result of an uninterrupted run. `finalize` turns the directory into the
artifact (shards named model-XXXXX-of-NNNNN, index, config, tokenizer, manifest with hashes)
and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .artifact import INDEX_NAME, MANIFEST_NAME, TOKENIZER_FILES, file_sha256, replace_dir
from .errors import QuantkitError

STATE_NAME = "partial.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


_LABELS = {
    "source_weights_sha256": "source model weights",
    "recipe": "recipe",
    "calibration_tokens_sha256": "calibration tokens",
    "quantkit_version": "quantkit version",
}


def _leaf_changes(old, new, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for key in sorted(set(old) | set(new)) for c in _leaf_changes(old.get(key), new.get(key), f"{path}.{key}" if path else key)]
    return [] if old == new else [f"{path}: {old} -> {new}"]


def describe_differences(interrupted: dict, now: dict) -> list[str]:
    """What changed between the interrupted run's identity and this one's, readably."""
    out = []
    for key in sorted(set(interrupted) | set(now)):
        old, new = interrupted.get(key), now.get(key)
        if old == new:
            continue
        label = _LABELS.get(key, key)
        if isinstance(old, dict) and isinstance(new, dict):
            out.append(f"{label} ({'; '.join(_leaf_changes(old, new))})")
        else:
            out.append(f"{label} ({str(old)[:12]}... -> {str(new)[:12]}...)" if key.endswith("sha256") else f"{label} ({old} -> {new})")
    return out


class PartialArtifact:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out.parent / f".{self.out.name}.partial"
        self.state: dict = {}

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_NAME

    def begin(self, identity: dict, num_blocks: int, resume: bool, force: bool) -> int:
        """Open the partial directory; returns the first block still to do.

        `identity` names what the result depends on (source weights, recipe, calibration tokens,
        quantkit version): resuming with any of them changed would splice two different runs.
        """
        if self.dir.exists() and not resume:
            if not force:
                raise QuantkitError(
                    f"an interrupted quantization into {self.out} was found ({self.dir}); pass --resume to "
                    "continue it from its last finished block, or --force to start over."
                )
            shutil.rmtree(self.dir)
        if resume and self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text())
            changed = describe_differences(self.state["identity"], identity)
            if changed:
                raise QuantkitError(
                    f"cannot resume {self.dir}: this run differs from the interrupted one in {', '.join(changed)}; "
                    "source model weights, recipe, calibration and quantkit version must all be the same. "
                    "Run again with the original inputs, or pass --force instead of --resume to start over."
                )
            return len(self.state["blocks"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = {"identity": identity, "num_blocks": num_blocks, "blocks": []}
        _atomic_write_text(self.state_path, json.dumps(self.state, indent=1))
        return 0

    def hidden(self) -> torch.Tensor:
        """The activations entering the first unfinished block (saved when the previous one finished)."""
        last = len(self.state["blocks"]) - 1
        with safe_open(str(self.dir / f"hidden-{last:05d}.safetensors"), framework="pt") as handle:
            return handle.get_tensor("hidden")

    def add_block(self, index: int, tensors: dict[str, torch.Tensor], hidden: torch.Tensor | None, record: dict) -> None:
        """Store a finished block; it counts as done once partial.json is replaced."""
        if index != len(self.state["blocks"]):
            raise RuntimeError(f"block {index} finished out of order (expected {len(self.state['blocks'])})")
        _atomic_save(tensors, self.dir / f"block-{index:05d}.safetensors")
        if hidden is not None:
            _atomic_save({"hidden": hidden}, self.dir / f"hidden-{index:05d}.safetensors")
        record = {**record, "tensors": sorted(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
        self.state["blocks"].append(record)
        _atomic_write_text(self.state_path, json.dumps(self.state, indent=1))
        (self.dir / f"hidden-{index - 1:05d}.safetensors").unlink(missing_ok=True)  # no longer a resume point

    def finalize(self, rest: dict[str, torch.Tensor], config: dict, manifest: dict, tokenizer_dir: Path, force: bool) -> Path:
        """Name the shards, add index, config, tokenizer and manifest, and rename into place."""
        blocks = self.state["blocks"]
        if len(blocks) != self.state["num_blocks"]:
            raise RuntimeError(f"finalize with {len(blocks)} of {self.state['num_blocks']} blocks done")
        total = len(blocks) + 1
        names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        _atomic_save(rest, self.dir / names[0])
        weight_map = {t: names[0] for t in rest}
        for i, record in enumerate(blocks):
            if (self.dir / f"block-{i:05d}.safetensors").exists():  # else renamed by a finalize that crashed
                os.replace(self.dir / f"block-{i:05d}.safetensors", self.dir / names[i + 1])
            weight_map.update({t: names[i + 1] for t in record["tensors"]})
        total_size = sum(t.numel() * t.element_size() for t in rest.values()) + sum(r["bytes"] for r in blocks)
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, self.dir / name)
        for leftover in [self.state_path, *self.dir.glob("hidden-*.safetensors")]:
            leftover.unlink()
        files = {p.name: file_sha256(p) for p in sorted(self.dir.iterdir()) if p.is_file()}
        (self.dir / MANIFEST_NAME).write_text(json.dumps({**manifest, "files": files}, indent=2))
        if self.out.exists() and not force:
            raise QuantkitError(f"output directory {self.out} appeared while quantizing; pass --force to replace it.")
        replace_dir(self.dir, self.out)
        return self.out
