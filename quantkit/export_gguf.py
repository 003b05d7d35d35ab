"""Export a quantkit artifact to one GGUF file that llama.cpp runs, its int4 linears as Q4_1 blocks.

A llama.cpp Q4_1 block covers 32 consecutive input features of one output row: fp16 d, fp16 m
and 16 bytes of nibbles (byte j holds value j in its low nibble and value j + 16 in its high
one, the order of gguf.quants.Q4_1); a value is d * q + m. AWQ stores
  W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]
with integer zeros z in [0, 15] and fp16 scales s, so with d = s and m = -z * s the codes q go
into the nibbles unchanged. A group of 64 or 128 is 2 or 4 blocks with the same d and m.

The one inexact step is storing m in fp16. z * s has at most 4 + 11 significant bits, so it is
exact in fp32, and its round-to-nearest fp16 is off by at most half an fp16 ulp:
  |fl16(m) - m| <= max(2**-11 * |z * s|, 2**-25)     (2**-25: half the subnormal spacing)
which in fp16's normal range is at most 15/2048 of the quantization step s. d * q + fl16(m) is
then exact in fp32 (both are multiples of s's last bit and below 2**5 * s), so for a reader that
dequantizes in fp32 (gguf.quants) this rounding is the whole difference from dequantize_awq.

Other tensors go as llama.cpp's converter writes them: 2-D weights (embeddings, an untied
lm_head) as F16, which the artifact already stores, 1-D norms and biases as F32. What differs
between architectures is data in ARCHITECTURES, not branches in the loops:
- llama (and mistral): llama.cpp rotates consecutive pairs of a head's dimensions where HF pairs
  its two halves, so attn_q / attn_k rows (and biases) are permuted per head, as llama.cpp's
  converter does for HF checkpoints. The permutation moves whole output rows, and codes, zeros
  and scales are all per row, so it is exact.
- gemma3_text: llama.cpp rotates halves as HF does (no permutation); its norms multiply by the
  stored weight where HF multiplies by (1 + w), so every norm is stored as 1 + w; local layers
  get their own RoPE base and window, listed per layer.
The config is read by the runtime's own parsers (what `quantkit serve` runs is what is exported)
and whatever llama.cpp would run differently is refused. The tokenizer goes into the metadata
in one of the two forms llama.cpp reproduces exactly: byte-level BPE (vocabulary, merges) or,
for a BPE with byte fallback on "▁"-escaped text (Gemma's), llama.cpp's SentencePiece form,
whose merge order is given by scores: a token's score is minus the rank of the first merge that
makes it. Special ids, what the tokenizer adds around a text, and the chat template go with it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import gguf
import numpy as np
import torch

from quantkit.runtime.models import Gemma3Config, LlamaConfig, MistralConfig

from .artifact import FILE_MODE, WRITE_AGAIN, Artifact, _writing  # _writing: the artifact writer's disk-full message
from .errors import QuantkitError
from .pack import unpack_awq

GGUF_FILE_NAME = "model.gguf"
Q4_1_BLOCK = 32  # input features per Q4_1 block (gguf.GGML_QUANT_SIZES[Q4_1][0])
Q4_1 = gguf.GGMLQuantizationType.Q4_1
FP16_MAX = 65504.0
# Half an fp16 ulp, relative (normal range) and absolute (subnormal range): the bound on |fl16(m) - m|.
MIN_ROUNDING_RELATIVE = 2.0**-11
MIN_ROUNDING_ABSOLUTE = 2.0**-25
OTHER_FORMAT = "Export it with --format compressed-tensors instead (vLLM, transformers load that)."


def min_rounding_bound(m: torch.Tensor) -> torch.Tensor:
    """The most fl16(m) may differ from the exact min m = -z * s (see the module docstring)."""
    return torch.clamp(MIN_ROUNDING_RELATIVE * m.abs(), min=MIN_ROUNDING_ABSOLUTE)


# ---------------------------------------------------------------------------- the block mapping


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    """fp16 values [..., n] -> uint8 [..., 2n], little-endian as GGUF stores them on any host."""
    return values.to(torch.float16).numpy().astype("<f2").view(np.uint8)


def check_group_size(group_size: int) -> None:
    if group_size % Q4_1_BLOCK:
        raise QuantkitError(
            f"group size {group_size} does not split into llama.cpp's Q4_1 blocks of {Q4_1_BLOCK} input features, "
            "each with one scale and one min; only group sizes that are multiples of 32 map exactly. "
            "Quantize again with --group-size 32 (or 64 or 128)."
        )


def awq_to_q4_1(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Codes [out, in], zeros [out, in / g] and fp16 scales [out, in / g] -> Q4_1 rows, the exact mins.

    Returns uint8 [out, in / 32 * 20] (per block: d, m, 16 bytes of nibbles; the byte layout
    GGUFWriter.add_tensor takes with raw_dtype=Q4_1) and the fp32 mins -z * s before their fp16
    rounding, one per group, for checking the rounding.
    """
    check_group_size(group_size)
    if scales.dtype != torch.float16:
        raise ValueError(f"AWQ scales are stored as fp16, got {scales.dtype}")
    out_features, in_features = q.shape
    per_group = group_size // Q4_1_BLOCK
    mins = -(zeros.float() * scales.float())  # exact in fp32: a 4-bit integer times an 11-bit significand
    if mins.numel() and mins.abs().max() > FP16_MAX:
        raise QuantkitError(
            f"a Q4_1 min -zero * scale reaches {mins.abs().max().item():.6g}, beyond fp16's {FP16_MAX:g}: this artifact's "
            "scales are too large for llama.cpp's Q4_1 blocks. Check the source weights for outliers."
        )
    n_blocks = in_features // Q4_1_BLOCK
    d = _fp16_bytes(scales.repeat_interleave(per_group, dim=1)).reshape(out_features, n_blocks, 2)
    m = _fp16_bytes(mins.repeat_interleave(per_group, dim=1)).reshape(out_features, n_blocks, 2)
    codes = q.to(torch.uint8).reshape(out_features, n_blocks, Q4_1_BLOCK)
    half = Q4_1_BLOCK // 2
    nibbles = (codes[..., :half] | (codes[..., half:] << 4)).numpy()  # [out, n_blocks, 16]
    blocks = np.concatenate([d, m, nibbles], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_features, n_blocks * 20)), mins


def rope_row_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order taking an HF Llama q/k projection to llama.cpp's: new row i is old row perm[i].

    HF lays a head's rows out as [2 halves, head_dim / 2] (rotate_half pairs j with j + head_dim/2),
    llama.cpp's llama as [head_dim / 2, 2] (it rotates consecutive pairs).
    """
    if rows % (2 * n_head):
        raise QuantkitError(f"a q/k projection with {rows} rows does not split into {n_head} heads of an even size.")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


# ---------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class GGUFArch:
    """How one HF model_type becomes one llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    runtime_config: type  # the runtime's parser of config.json (refuses what `quantkit serve` cannot run)
    # config.json + parsed config -> the architecture's own metadata (GGUFWriter.add_<key>: value);
    # raises a QuantkitError for whatever llama.cpp would compute differently.
    metadata: Callable[[Mapping, object], dict[str, object]]
    permute_qk: bool = False  # llama.cpp rotates consecutive pairs (LLAMA_ROPE_TYPE_NORM), HF halves
    norm_shift: float = 0.0  # added to every *norm.weight: llama.cpp multiplies by what HF's (1 + w) is
    tied_default: bool = False  # tie_word_embeddings when config.json leaves it out


def _refuse(problem: str) -> QuantkitError:
    return QuantkitError(f"GGUF export: {problem}. {OTHER_FORMAT}")


def _rope(theta: float, scaling: dict | None) -> dict[str, object]:
    if scaling is None:
        return {"rope_freq_base": theta}
    if scaling["rope_type"] == "linear":
        return {"rope_freq_base": theta, "rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": float(scaling["factor"])}
    raise _refuse(f"RoPE scaling '{scaling['rope_type']}' is not written (only plain and linear RoPE are)")


def _llama_metadata(config: Mapping, c: LlamaConfig) -> dict[str, object]:
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(f"llama.cpp's llama architecture uses SiLU; this model's hidden_act is '{config['hidden_act']}'")
    if any(w is not None for w in c.layer_windows):
        raise _refuse("llama.cpp's llama architecture has no sliding-window attention, which this model uses")
    return _rope(c.rope_theta, c.rope_scaling)


def _gemma3_metadata(config: Mapping, c: Gemma3Config) -> dict[str, object]:
    # llama.cpp scales Gemma 3 attention by head_dim ** -0.5, except in its 62-layer (27B) model.
    llama_cpp_scalar = c.hidden_size / c.num_heads if c.num_layers == 62 else c.head_dim
    if c.query_pre_attn_scalar != llama_cpp_scalar:
        raise _refuse(f"llama.cpp scales this model's attention by {llama_cpp_scalar:g} ** -0.5; its query_pre_attn_scalar is {c.query_pre_attn_scalar:g}")
    if c.local_rope[1] is not None:
        raise _refuse("llama.cpp applies no RoPE scaling to Gemma 3's sliding-window layers, which this model scales")
    meta = {**_rope(*c.global_rope), "rope_freq_base_swa": c.local_rope[0]}
    if any(c.local_layers):  # the per-layer list, so llama.cpp's default (every 6th layer global) is never assumed
        window = config.get("sliding_window") or c.max_position_embeddings  # no window: local RoPE all the same
        meta |= {"sliding_window": int(window), "sliding_window_pattern": list(c.local_layers)}
    if c.final_logit_softcapping:
        meta["final_logit_softcapping"] = float(c.final_logit_softcapping)
    return meta


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch(gguf.MODEL_ARCH.LLAMA, LlamaConfig, _llama_metadata, permute_qk=True),
    "mistral": GGUFArch(gguf.MODEL_ARCH.LLAMA, MistralConfig, _llama_metadata, permute_qk=True),
    "gemma3_text": GGUFArch(gguf.MODEL_ARCH.GEMMA3, Gemma3Config, _gemma3_metadata, norm_shift=1.0, tied_default=True),
}


@dataclass(frozen=True)
class GGUFModel:
    """An artifact's config as the GGUF needs it: the architecture, the shapes and the metadata."""

    arch: GGUFArch
    n_layers: int
    n_head: int
    n_head_kv: int
    vocab_size: int
    tied: bool
    metadata: dict[str, object]  # GGUFWriter.add_<key>(value), in order

    @classmethod
    def from_config(cls, config: Mapping) -> GGUFModel:
        model_type = config.get("model_type")
        arch = ARCHITECTURES.get(model_type)
        if arch is None:
            raise QuantkitError(
                f"GGUF export maps the architectures {', '.join(sorted(ARCHITECTURES))} to llama.cpp; this artifact is "
                f"'{model_type}', which it does not map. {OTHER_FORMAT}"
            )
        try:
            c = arch.runtime_config.from_hf(config)
        except ValueError as exc:
            raise _refuse(f"this model's config is outside what quantkit runs ({exc})") from exc
        metadata = {
            "context_length": c.max_position_embeddings,
            "embedding_length": c.hidden_size,
            "block_count": c.num_layers,
            "feed_forward_length": c.intermediate_size,
            "head_count": c.num_heads,
            "head_count_kv": c.num_kv_heads,
            "key_length": c.head_dim,
            "value_length": c.head_dim,
            "rope_dimension_count": c.head_dim,
            "layer_norm_rms_eps": c.rms_norm_eps,
            "vocab_size": c.vocab_size,
            **arch.metadata(config, c),
        }
        tied = bool(config.get("tie_word_embeddings", arch.tied_default))
        return cls(arch, c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size, tied, metadata)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch.arch]

    @cached_property
    def _names(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.arch.arch, self.n_layers)

    def tensor_name(self, hf_name: str) -> tuple[str, gguf.MODEL_TENSOR]:
        """An HF tensor name -> (llama.cpp's name, its kind), from gguf's own map for the architecture."""
        found = self._names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in gguf.MODEL_TENSORS[self.arch.arch]:
            raise _refuse(f"tensor {hf_name} has no place in llama.cpp's {self.arch_name} architecture")
        kind, name = found
        return name, kind

    def qk_heads(self, kind: gguf.MODEL_TENSOR) -> int | None:
        """The heads whose rows a q/k tensor permutes into llama.cpp's RoPE order; None for others."""
        if not self.arch.permute_qk:
            return None
        return {gguf.MODEL_TENSOR.ATTN_Q: self.n_head, gguf.MODEL_TENSOR.ATTN_K: self.n_head_kv}.get(kind)


# ---------------------------------------------------------------------------- the tokenizer


def _is_byte_level(pre: Mapping | None) -> bool:
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def _escapes_spaces(normalizer: Mapping | None, pre: Mapping | None) -> bool:
    """Spaces replaced by '▁' and nothing else: llama.cpp's SentencePiece escaping without a prefix space."""
    replaces = bool(normalizer) and normalizer.get("type") == "Replace" and normalizer.get("pattern") == {"String": " "} and normalizer.get("content") == "\u2581"
    # Splitting at ' ' after the normalizer removed every ' ' does nothing.
    return replaces and (pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}))


def tokenizer_kind(tokenizer_json: Mapping) -> tuple[str, str]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) under which llama.cpp splits text as this tokenizer.json does.

    'gpt2' (byte-level BPE) with GPT-2's regex ('gpt-2') or that regex after splitting every digit
    ('smollm'); 'llama' (SentencePiece) for a BPE with byte fallback on '▁'-escaped text. Anything
    else is refused rather than exported to tokenize differently.
    """
    model = tokenizer_json.get("model") or {}
    normalizer, pre = tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")
    if model.get("type") == "BPE" and not model.get("ignore_merges"):
        if model.get("byte_fallback"):
            if _escapes_spaces(normalizer, pre):
                return "llama", "default"
        elif normalizer is None:
            if _is_byte_level(pre):
                return "gpt2", "gpt-2"
            steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else None
            if steps and len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") and _is_byte_level(steps[1]):
                return "gpt2", "smollm"
    raise QuantkitError(
        f"GGUF export cannot name a llama.cpp tokenizer that splits text as this one does (model {model.get('type')!r}"
        f"{', byte_fallback' if model.get('byte_fallback') else ''}, normalizer {json.dumps(normalizer)[:120]}, pre_tokenizer "
        f"{json.dumps(pre)[:200]}); it knows byte-level BPE (GPT-2's split, alone or after single digits) and BPE with byte "
        f"fallback on '\u2581'-escaped text (Gemma's). {OTHER_FORMAT}"
    )


def _read_tokenizer_json(tokenizer_dir: Path) -> dict:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise QuantkitError(f"GGUF export needs the fast tokenizer's tokenizer.json in {tokenizer_dir}; it is not there.")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # 'gpt2' only
    scores: list[float] | None = None  # 'llama' only
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def merge_scores(merges: list[tuple[str, str]], tokens: list[str]) -> list[float]:
    """SentencePiece scores giving HF's merge order: minus the rank of the first merge making a token.

    llama.cpp merges, among adjacent pairs whose concatenation is a token, the highest-scoring one
    first; HF merges the listed pair of lowest rank. Tokens no merge makes (characters, bytes,
    specials) score below every merge.
    """
    rank: dict[str, int] = {}
    for k, (left, right) in enumerate(merges):
        rank.setdefault(left + right, k)
    return [-float(rank.get(t, len(merges))) for t in tokens]


def gguf_vocab(tokenizer_dir: Path, vocab_size: int) -> GGUFVocab:
    """The vocabulary as llama.cpp reads it, from the tokenizer quantkit itself loads for the model."""
    from .sources import load_tokenizer

    tokenizer_json = _read_tokenizer_json(tokenizer_dir)
    model, pre = tokenizer_kind(tokenizer_json)
    tokenizer = load_tokenizer(tokenizer_dir)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise QuantkitError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}.")
    byte_fallback = bool(tokenizer_json["model"].get("byte_fallback"))
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses, named as llama.cpp's converter names them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif byte_fallback and _BYTE_TOKEN.fullmatch(by_id[i]):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    # tokenizers >= 0.20 stores a merge as a pair, older ones as "left right" (no token of either kind holds a space).
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tokenizer_json["model"].get("merges", [])]
    special = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special[kind] = int(token_id)
    # What the HF tokenizer adds around a text, so llama.cpp tokenizes prompts as quantkit does.
    bare, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    add_bos = len(full) > len(bare) and "bos" in special and full[0] == special["bos"]
    add_eos = len(full) > len(bare) and "eos" in special and full[-1] == special["eos"]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    spm = model == "llama"  # SentencePiece: the merge order travels as scores, byte-level BPE lists the merges
    return GGUFVocab(model, pre, tokens, [int(t) for t in types], [] if spm else [f"{a} {b}" for a, b in merges],
                     merge_scores(merges, tokens) if spm else None, special, add_bos, add_eos, template)


# ---------------------------------------------------------------------------- the file


@dataclass
class GGUFTensor:
    name: str
    data: np.ndarray  # F16/F32 values, or Q4_1 bytes
    q4_1: bool = False


def write_gguf_file(path: Path, model: GGUFModel, vocab: GGUFVocab, tensors: list[GGUFTensor], name: str) -> None:
    """One GGUF file for llama.cpp, fsynced and readable by all."""
    writer = gguf.GGUFWriter(str(path), model.arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for key, value in model.metadata.items():
        getattr(writer, f"add_{key}")(value)
    any_q4_1 = any(t.q4_1 for t in tensors)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if any_q4_1 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(False)  # tokenizer_kind accepts only escaping without a prefix space
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)

    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=Q4_1 if t.q4_1 else None)
    with _writing(path, WRITE_AGAIN):  # a full disk: one line naming the path and the free space
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    os.chmod(path, FILE_MODE)


@dataclass
class _MinRounding:
    """The largest fp16 rounding of a Q4_1 min, absolute and as a fraction of the bound."""

    max_abs: float = 0.0
    max_of_bound: float = 0.0

    def add(self, mins: torch.Tensor) -> None:
        if not mins.numel():
            return
        err = (mins.half().float() - mins).abs()
        self.max_abs = max(self.max_abs, err.max().item())
        self.max_of_bound = max(self.max_of_bound, (err / min_rounding_bound(mins)).max().item())


def _natural_key(name: str) -> list:
    """Layer 2 before layer 10: the file lists blocks in order, as llama.cpp's converter writes them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def artifact_gguf_tensors(artifact: Artifact, model: GGUFModel, group_size: int, rounding: _MinRounding | None = None) -> Iterator[GGUFTensor]:
    """The artifact's tensors in llama.cpp's names, order and layout: AWQ triplets as Q4_1, the rest dense."""
    tensors = artifact.tensors()
    for hf_name in sorted(tensors, key=_natural_key):
        if hf_name.endswith((".qzeros", ".scales")):
            continue  # consumed with their qweight
        if not hf_name.endswith(".qweight"):
            yield dense_gguf_tensor(hf_name, tensors[hf_name], model)
            continue
        module = hf_name[: -len(".qweight")]
        name, kind = model.tensor_name(f"{module}.weight")
        q, params = unpack_awq(tensors[hf_name], tensors[f"{module}.qzeros"], tensors[f"{module}.scales"])
        scales, zeros = tensors[f"{module}.scales"].t(), params.zeros  # the stored fp16 bits, [out, n_groups]
        if (n_head := model.qk_heads(kind)) is not None:
            perm = rope_row_permutation(q.shape[0], n_head)
            q, zeros, scales = q[perm], zeros[perm], scales[perm]
        blocks, mins = awq_to_q4_1(q, zeros, scales.contiguous(), group_size)
        if rounding is not None:
            rounding.add(mins)
        yield GGUFTensor(name, blocks, q4_1=True)


def dense_gguf_tensor(hf_name: str, tensor: torch.Tensor, model: GGUFModel) -> GGUFTensor:
    """An unquantized HF tensor as llama.cpp expects it: renamed, q/k rows in its RoPE order, norms shifted, F16 or F32."""
    name, kind = model.tensor_name(hf_name)
    if (n_head := model.qk_heads(kind)) is not None:  # a q/k weight kept dense, or a q/k bias
        tensor = tensor[rope_row_permutation(tensor.shape[0], n_head)]
    if model.arch.norm_shift and hf_name.endswith("norm.weight"):
        tensor = tensor.float() + model.arch.norm_shift  # in fp32, as the runtime computes 1 + w
    # llama.cpp's converter: 1-D tensors (norms, biases) in F32, matrices in F16.
    dtype = torch.float32 if tensor.dim() == 1 else torch.float16
    return GGUFTensor(name, tensor.to(dtype).contiguous().numpy())


def dense_gguf_tensors(state_dict: Mapping[str, torch.Tensor], model: GGUFModel) -> list[GGUFTensor]:
    """A dense HF state dict as GGUF tensors (a tied lm_head left out): the F16 reference of an export."""
    names = [n for n in state_dict if not (model.tied and n == "lm_head.weight")]
    return [dense_gguf_tensor(n, state_dict[n], model) for n in sorted(names, key=_natural_key)]


def check_gguf_exportable(artifact: Artifact) -> tuple[GGUFModel, int]:
    """The GGUF model and group size, or a QuantkitError saying why the artifact cannot become Q4_1 GGUF."""
    model = GGUFModel.from_config(artifact.config)
    group_size = artifact.quantization["group_size"]
    check_group_size(group_size)
    tokenizer_kind(_read_tokenizer_json(artifact.path))
    return model, group_size


def write_gguf(artifact: Artifact, tmp: Path) -> dict:
    """model.gguf into `tmp`; returns what the export manifest records about it."""
    model, group_size = check_gguf_exportable(artifact)
    vocab = gguf_vocab(artifact.path, model.vocab_size)
    rounding = _MinRounding()
    tensors = list(artifact_gguf_tensors(artifact, model, group_size, rounding))
    write_gguf_file(tmp / GGUF_FILE_NAME, model, vocab, tensors, name=artifact.path.resolve().name)
    return {
        "gguf_version": _package_version("gguf"),
        "gguf_file": GGUF_FILE_NAME,
        "gguf_architecture": model.arch_name,
        "gguf_tokenizer": f"{vocab.model}/{vocab.pre}",
        "q4_1": {
            "group_size": group_size,
            "blocks_per_group": group_size // Q4_1_BLOCK,
            "tensors": sum(t.q4_1 for t in tensors),
            # fp16 rounding of m = -zero * scale, the only difference from the artifact's dequantization.
            "max_min_rounding": rounding.max_abs,
            "max_min_rounding_of_bound": rounding.max_of_bound,
            "bound": "|fl16(m) - m| <= max(2**-11 * |m|, 2**-25)",
        },
        "ggml_quant_version": gguf.GGML_QUANT_VERSION,
    }


def _package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)
