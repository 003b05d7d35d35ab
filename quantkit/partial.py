"""An artifact under construction: block shards written as blocks finish, resumable after a crash.

Layout of `.<out>.partial/` beside the output directory:
  block-00007.safetensors   packed tensors of finished block 7 (written temp + rename)
  hidden-00007.safetensors  the calibration activations leaving block 7 (AWQ only)
  partial.json              the commit point: identity of the run and the blocks finished
A block counts as finished only once partial.json says so, and partial.json is replaced
atomically after the block's files are durably in place (fsync before every rename, of the
directory after it), so a crash -- of the process or of the machine -- at any moment leaves a
state that resumes to exactly the result of an uninterrupted run. Without partial.json nothing
is committed and a new run clears the directory. `finalize` turns the directory into the
artifact (shards named model-XXXXX-of-NNNNN, index, config, tokenizer, manifest with hashes);
it removes partial.json only just before renaming the directory into place, so a finalize that
crashes is simply redone by --resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from .artifact import complete_artifact, replace_dir, save_shard, shard_names, write_text_atomically
from .errors import QuantkitError

STATE_NAME = "partial.json"
# A full disk mid-run: the blocks already committed stay, so the run continues where it stopped.
RESUME_HINT = "free some space and run the same command with --resume: the blocks already finished are kept."


def _atomic_write_text(path: Path, text: str) -> None:
    write_text_atomically(path, text, RESUME_HINT)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_shard(tensors, path, RESUME_HINT)


def _block_name(index: int) -> str:
    return f"block-{index:05d}.safetensors"


def _hidden_name(index: int) -> str:
    return f"hidden-{index:05d}.safetensors"


def _shard_names(num_blocks: int) -> list[str]:
    """Final shard names: the tensors outside the blocks first, then one shard per block."""
    return shard_names(num_blocks + 1)


_LABELS = {
    "source_weights_sha256": "source model weights",
    "recipe": "recipe",
    "source_config": "source model config",
    "calibration_tokens_sha256": "calibration tokens",
    "quantkit_version": "quantkit version",
    "device": "device (--device)",
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

        `identity` names what the result depends on (source weights and config, recipe,
        calibration tokens, quantkit version): resuming with any of them changed would splice
        two different runs.
        """
        if self.dir.exists() and not resume:
            if not force:
                raise QuantkitError(
                    f"an interrupted quantization into {self.out} was found ({self.dir}); pass --resume to "
                    "continue it from its last finished block, or --force to start over."
                )
        elif resume and self.state_path.is_file():
            self.state = self._read_state()
            changed = describe_differences(self.state["identity"], identity)
            if changed:
                raise QuantkitError(
                    f"cannot resume {self.dir}: this run differs from the interrupted one in {', '.join(changed)}; "
                    "source model weights and config, recipe, calibration, device and quantkit version must all be the same. "
                    "Run again with the original inputs, or pass --force instead of --resume to start over."
                )
            self._check_files(num_blocks)
            return len(self.state["blocks"])
        # Nothing committed (or --force): whatever is in the directory is left over -- e.g. the
        # shards of a finalize that crashed after removing partial.json -- and must not end up
        # in this artifact.
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.state = {"identity": identity, "num_blocks": num_blocks, "blocks": []}
        _atomic_write_text(self.state_path, json.dumps(self.state, indent=1))
        return 0

    def _read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            state = e
        if not isinstance(state, dict) or not {"identity", "num_blocks", "blocks"} <= set(state):
            detail = state if isinstance(state, Exception) else "not a partial.json"
            raise QuantkitError(f"{self.state_path} is unreadable ({detail}); the interrupted run cannot be resumed: pass --force to start over.")
        return state

    def _check_files(self, num_blocks: int) -> None:
        """Every committed block's shard is present (renamed, if a finalize crashed) and the depth agrees."""
        done = len(self.state["blocks"])
        names = _shard_names(num_blocks)
        missing = [
            _block_name(i) for i in range(done)
            if not (self.dir / _block_name(i)).is_file() and not (self.dir / names[i + 1]).is_file()
        ]
        if self.state["num_blocks"] != num_blocks or done > num_blocks:
            missing.append(f"(partial.json counts {self.state['num_blocks']} blocks, the model has {num_blocks})")
        if missing:
            raise QuantkitError(
                f"cannot resume {self.dir}: {', '.join(missing)} missing or inconsistent; the directory was changed "
                "since the run was interrupted: pass --force to start over."
            )

    def hidden(self) -> torch.Tensor:
        """The activations entering the first unfinished block (saved when the previous one finished)."""
        path = self.dir / _hidden_name(len(self.state["blocks"]) - 1)
        if not path.is_file():
            raise QuantkitError(f"cannot resume {self.dir}: {path.name} is missing (was the directory changed?); pass --force to start over.")
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor("hidden")

    def add_block(self, index: int, tensors: dict[str, torch.Tensor], hidden: torch.Tensor | None, record: dict) -> None:
        """Store a finished block; it counts as done once partial.json is replaced."""
        if index != len(self.state["blocks"]):
            raise RuntimeError(f"block {index} finished out of order (expected {len(self.state['blocks'])})")
        _atomic_save(tensors, self.dir / _block_name(index))
        if hidden is not None:
            _atomic_save({"hidden": hidden}, self.dir / _hidden_name(index))
        record = {**record, "tensors": sorted(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
        self.state["blocks"].append(record)
        _atomic_write_text(self.state_path, json.dumps(self.state, indent=1))
        if index > 0:  # only after the commit: until then it is the resume point
            (self.dir / _hidden_name(index - 1)).unlink(missing_ok=True)

    def finalize(self, rest: dict[str, torch.Tensor], config: dict, manifest: dict, tokenizer_dir: Path, force: bool) -> Path:
        """Name the shards, add index, config, tokenizer and manifest, and rename into place.

        Every step before partial.json is removed can be redone: a crash in between leaves a
        directory that --resume finalizes again.
        """
        blocks = self.state["blocks"]
        if len(blocks) != self.state["num_blocks"]:
            raise RuntimeError(f"finalize with {len(blocks)} of {self.state['num_blocks']} blocks done")
        if self.out.exists() and not force:  # before anything changes, so that --resume --force can finish
            raise QuantkitError(
                f"output directory {self.out} appeared while quantizing; pass --resume --force to finish this run "
                "into it (replacing it), or move it away and pass --resume."
            )
        names = _shard_names(len(blocks))
        _atomic_save(rest, self.dir / names[0])
        shards = {names[0]: sorted(rest)}
        for i, record in enumerate(blocks):
            if (self.dir / _block_name(i)).exists():  # else renamed by a finalize that crashed
                os.replace(self.dir / _block_name(i), self.dir / names[i + 1])
            shards[names[i + 1]] = record["tensors"]
        for leftover in [*self.dir.glob("hidden-*.safetensors"), *self.dir.glob("*.tmp")]:
            leftover.unlink()
        total_size = sum(t.numel() * t.element_size() for t in rest.values()) + sum(r["bytes"] for r in blocks)
        # The artifact is durable before the commit point goes.
        complete_artifact(self.dir, shards, total_size, config, manifest, tokenizer_dir, RESUME_HINT)
        self.state_path.unlink()
        replace_dir(self.dir, self.out)
        return self.out
