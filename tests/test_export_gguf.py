"""Export to GGUF: read back with the `gguf` package and checked against quantkit's own dequantization.

Every Q4_1 tensor of the file, dequantized by gguf.quants (the reference of llama.cpp's block
layout), equals the artifact's AWQ dequantization but for the fp16 rounding of the block min
m = -zero * scale: bit for bit d * q + fl16(m), with |fl16(m) - m| <= max(2**-11 * |m|, 2**-25).
For Llama q/k rows are compared after llama.cpp's RoPE row order is applied to the artifact's
weights; Gemma 3 keeps HF's row order and stores its (1 + w) norms as 1 + w. The tokenizer in the
metadata is the artifact's: tokens by id, merges (byte-level BPE) or merge-rank scores
(SentencePiece form, checked by tokenizing as llama.cpp's algorithm does), special ids, the chat
template. What llama.cpp would run differently is refused before anything is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from quantkit.artifact import MANIFEST_NAME, artifact_tensors, awq_quantization_config, dequantized_state_dict, file_sha256, load_artifact, write_artifact
from quantkit.awq import AWQSettings, quantize_model
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.export import EXPORT_MANIFEST_NAME, SUPPORTED_FORMATS, export_artifact
from quantkit.export_gguf import GGUF_FILE_NAME, GGUFModel, awq_to_q4_1, min_rounding_bound, rope_row_permutation, tokenizer_kind
from quantkit.models import get_adapter
from quantkit.pack import dequantize_awq, pack_awq, unpack_awq
from quantkit.quantizer import compute_qparams, quantize
from quantkit.sources import load_model, load_tokenizer

Q4_1, F16, F32 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
LINEAR_WITH_BIAS = ("q_proj", "k_proj", "v_proj", "o_proj")
N_HEAD, N_HEAD_KV = 4, 2  # both tiny models' attention
# HF linear -> (llama.cpp name, heads whose rows llama.cpp's llama RoPE order permutes)
LINEARS = {"self_attn.q_proj": ("attn_q", N_HEAD), "self_attn.k_proj": ("attn_k", N_HEAD_KV), "self_attn.v_proj": ("attn_v", None),
           "self_attn.o_proj": ("attn_output", None), "mlp.gate_proj": ("ffn_gate", None), "mlp.up_proj": ("ffn_up", None),
           "mlp.down_proj": ("ffn_down", None)}
TEXTS = ["The cat sat on the mat.", "  two spaces,\tand a tab\nthen a line", "numbers 12345 and 3.14", "snow \u2603 and caf\u00e9", ""]


def load_calibration_text() -> str:
    from quantkit.calibration import load_calibration_texts

    return load_calibration_texts(None)[0][400][:400]  # a passage the tokenizer was not trained on


def awq_tensors(model, model_type: str, group_size: int, tied: bool = True, biases: bool = False) -> dict[str, torch.Tensor]:
    """RTN-quantized tensors of `model` (optionally with random fp16 attention biases, a random untied lm_head)."""
    result = quantize_model(model, get_adapter(model_type), AWQSettings(method="rtn", compute_dtype="float32", group_size=group_size))
    state = model.state_dict()
    g = torch.Generator().manual_seed(group_size)
    if not tied:
        state["lm_head.weight"] = torch.randn(state["lm_head.weight"].shape, generator=g) * 0.05
    tensors = artifact_tensors(state, result.linears, tied_lm_head=tied)
    for module in result.linears:
        if biases and module.endswith(LINEAR_WITH_BIAS):
            tensors[f"{module}.bias"] = torch.randn(tensors[f"{module}.scales"].shape[1], generator=g).half()
    return dict(sorted(tensors.items()))


def make_artifact(tensors, tokenizer_dir: Path, out: Path, group_size: int, **config_changes) -> Path:
    config = json.loads((tokenizer_dir / "config.json").read_text())
    config.update(quantization_config=awq_quantization_config(group_size), **config_changes)
    return write_artifact(out, tensors, config, {"note": "gguf export test"}, tokenizer_dir)


def llama_artifact(model_dir: Path, out: Path, group_size: int = 32, tied: bool = True, **config_changes) -> Path:
    tensors = awq_tensors(load_model(model_dir), "llama", group_size, tied=tied, biases=True)
    return make_artifact(tensors, model_dir, out, group_size, attention_bias=True, **config_changes)


def read_gguf(export_dir: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(export_dir / GGUF_FILE_NAME)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def gguf_dense(tensor) -> torch.Tensor:
    """A GGUF tensor as fp32 [rows, cols] in nn.Linear layout (ggml lists its dims innermost first)."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def gguf_tensors(export_dir: Path) -> dict:
    return {t.name: t for t in read_gguf(export_dir).tensors}


def assert_min_rounding_only(actual: torch.Tensor, zeros, scales, group_size: int, expected: torch.Tensor) -> None:
    """actual == expected + (fl16(m) - m) exactly, and that rounding within its bound, per weight."""
    m = -(zeros.double() * scales.double()).repeat_interleave(group_size, dim=1)
    rounding = m.half().double() - m
    assert torch.equal(actual.double(), expected.double() + rounding)
    assert (rounding.abs() <= min_rounding_bound(m)).all()
    assert (rounding != 0).any() and (rounding == 0).float().mean() > 0.05  # some m round; m = 0 (z = 0) never does


def assert_q4_1_tensors_match(export_dir: Path, artifact_dir: Path, n_layers: int, permute: bool) -> None:
    """Every quantized linear of the artifact is one Q4_1 tensor that gguf.quants dequantizes to its weights."""
    artifact = load_artifact(artifact_dir)
    dense, raw, tensors = dequantized_state_dict(artifact, torch.float64), artifact.tensors(), gguf_tensors(export_dir)
    for layer in range(n_layers):
        for hf, (name, n_head) in LINEARS.items():
            module = f"model.layers.{layer}.{hf}"
            t = tensors[f"blk.{layer}.{name}.weight"]
            assert t.tensor_type == Q4_1
            expected = dense[f"{module}.weight"]
            assert list(t.shape) == [expected.shape[1], expected.shape[0]]  # ggml: input features first
            _, params = unpack_awq(raw[f"{module}.qweight"], raw[f"{module}.qzeros"], raw[f"{module}.scales"])
            zeros, scales = params.zeros, raw[f"{module}.scales"].t()
            if permute and n_head is not None:  # llama.cpp's RoPE row order, applied to the reference
                perm = rope_row_permutation(expected.shape[0], n_head)
                expected, zeros, scales = expected[perm], zeros[perm], scales[perm]
            assert expected.abs().sum() > 0
            assert_min_rounding_only(gguf_dense(t), zeros, scales, params.group_size, expected)
    assert sum(t.tensor_type == Q4_1 for t in tensors.values()) == n_layers * len(LINEARS)


# --- the block mapping, against gguf.quants ------------------------------------------------------


def random_awq(out_features: int, in_features: int, group_size: int, seed: int, scale_range=(1e-4, 1e-1)):
    """Random codes, zeros and fp16 scales spanning `scale_range` (log-uniform)."""
    g = torch.Generator().manual_seed(seed)
    n_groups = in_features // group_size
    q = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (out_features, n_groups), generator=g, dtype=torch.int32)
    low, high = (torch.tensor(v).log() for v in scale_range)
    scales = (low + (high - low) * torch.rand(out_features, n_groups, generator=g)).exp().half()
    return q, zeros, scales


def awq_dequantized(q, zeros, scales, group_size: int) -> torch.Tensor:
    """AWQ's W = (q - z) * s in fp64: exact for 4-bit integers times fp16 scales."""
    s = scales.double().repeat_interleave(group_size, dim=1)
    z = zeros.double().repeat_interleave(group_size, dim=1)
    return (q.double() - z) * s


def test_block_bytes_are_d_m_then_nibbles_low_first():
    """One hand-built block: d, m as little-endian fp16, then byte j = value j | value j + 16 << 4."""
    q = torch.tensor([list(range(16)) + list(range(15, -1, -1))], dtype=torch.int32)
    zeros, scales = torch.tensor([[3]], dtype=torch.int32), torch.tensor([[0.25]], dtype=torch.float16)
    blocks, mins = awq_to_q4_1(q, zeros, scales, 32)
    assert blocks.dtype == np.uint8 and blocks.shape == (1, 20)
    assert blocks[0, :2].view("<f2")[0] == np.float16(0.25) and blocks[0, 2:4].view("<f2")[0] == np.float16(-0.75)
    assert list(blocks[0, 4:]) == [j | ((15 - j) << 4) for j in range(16)]
    assert mins.tolist() == [[-0.75]]
    # 0.25 * q - 0.75 = (q - 3) * 0.25: exactly representable, so no rounding at all.
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(blocks, Q4_1)).double(), awq_dequantized(q, zeros, scales, 32))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gguf_dequantizes_the_blocks_to_awq_weights_but_for_the_min_rounding(group_size):
    q, zeros, scales = random_awq(48, 256, group_size, seed=group_size)
    blocks, _ = awq_to_q4_1(q, zeros, scales, group_size)
    assert blocks.shape == (48, 256 // 32 * 20)
    ours = torch.from_numpy(gguf.quants.dequantize(blocks, Q4_1))
    assert_min_rounding_only(ours, zeros, scales, group_size, awq_dequantized(q, zeros, scales, group_size))
    # A group of g is g / 32 blocks sharing d and m: the same bytes repeated.
    d_m = blocks.reshape(48, 256 // 32, 20)[:, :, :4].reshape(48, -1, group_size // 32, 4)
    assert (d_m == d_m[:, :, :1]).all()


def test_the_bound_holds_for_subnormal_and_large_scales():
    """Scales from fp16's subnormal range (absolute rounding 2**-25) up to 30 (m up to 450)."""
    q, zeros, scales = random_awq(64, 128, 32, seed=7, scale_range=(1e-7, 30.0))
    assert (scales.float() < 2**-14).any() and (scales.float() > 1).any()
    blocks, _ = awq_to_q4_1(q, zeros, scales, 32)
    ours = torch.from_numpy(gguf.quants.dequantize(blocks, Q4_1))
    assert_min_rounding_only(ours, zeros, scales, 32, awq_dequantized(q, zeros, scales, 32))


def test_gguf_quants_reads_back_what_it_quantized_with_our_layout():
    """The layout cross-check the other way: gguf.quants.quantize's own blocks decoded our way."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)).numpy()
    blocks = gguf.quants.quantize(w, Q4_1).reshape(8, 2, 20)
    d = blocks[..., 0:2].copy().view("<f2").astype(np.float32)
    m = blocks[..., 2:4].copy().view("<f2").astype(np.float32)
    q = np.concatenate([blocks[..., 4:] & 0x0F, blocks[..., 4:] >> 4], axis=-1).astype(np.float32)
    assert np.array_equal((d * q + m).reshape(8, 64), gguf.quants.dequantize(blocks.reshape(8, 40), Q4_1))


def test_group_sizes_that_are_not_whole_blocks_are_refused():
    q, zeros, scales = random_awq(8, 64, 16, seed=0)
    with pytest.raises(QuantkitError, match="group size 16 does not split into llama.cpp's Q4_1 blocks of 32.*--group-size 32"):
        awq_to_q4_1(q, zeros, scales, 16)


def test_a_min_beyond_fp16_is_refused():
    q, zeros, scales = random_awq(8, 32, 32, seed=0)
    zeros[0, 0], scales[0, 0] = 15, 60000.0
    with pytest.raises(QuantkitError, match="beyond fp16's 65504"):
        awq_to_q4_1(q, zeros, scales, 32)


# --- llama.cpp's RoPE row order (llama) -----------------------------------------------------------


def rotate_hf(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """HF Llama's RoPE on one head: dimension j is rotated with j + head_dim / 2 (rotate_half)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = angle.cos(), angle.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rotate_llama_cpp(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM on one head: dimensions 2j and 2j + 1 are rotated together."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


@pytest.mark.parametrize("n_head", [N_HEAD, N_HEAD_KV])
def test_permuted_rows_under_llama_cpp_rope_give_hf_rope_outputs(n_head):
    head_dim, hidden = 16, 32
    g = torch.Generator().manual_seed(n_head)
    w, x = torch.randn(n_head * head_dim, hidden, generator=g, dtype=torch.float64), torch.randn(hidden, generator=g, dtype=torch.float64)
    angle = 0.7 * (10000.0 ** (-torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2)))
    perm = rope_row_permutation(w.shape[0], n_head)
    assert sorted(perm.tolist()) == list(range(w.shape[0]))  # a permutation, of whole rows
    hf = rotate_hf((w @ x).reshape(n_head, head_dim), angle)
    ours = rotate_llama_cpp((w[perm] @ x).reshape(n_head, head_dim), angle)
    # Same rotated vectors, in llama.cpp's order: q.k dot products per head are unchanged.
    assert torch.allclose(ours, hf.reshape(-1)[perm].reshape(n_head, head_dim), atol=1e-12)


# --- a Llama export, read back ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a chat template beside its tokenizer."""
    out = tmp_path_factory.mktemp("chat") / "tiny"
    shutil.copytree(tiny_model_dir, out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module", params=[32, 64], ids=["g32", "g64"])
def exported(request, chat_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, GGUF export) of the tiny Llama for group sizes 32 and 64 (a 64-group is two Q4_1 blocks)."""
    base = tmp_path_factory.mktemp(f"g{request.param}")
    artifact = llama_artifact(chat_model_dir, base / "art", request.param)
    return artifact, export_artifact(artifact, base / "gguf", fmt="gguf")


def test_every_q4_1_tensor_dequantizes_to_the_artifacts_weights(exported):
    assert_q4_1_tensors_match(exported[1], exported[0], n_layers=2, permute=True)


def test_other_tensors_are_f32_norms_and_biases_and_f16_embeddings(exported):
    artifact_dir, out = exported
    raw, tensors = load_artifact(artifact_dir).tensors(), gguf_tensors(out)
    assert tensors["token_embd.weight"].tensor_type == F16
    assert torch.equal(gguf_dense(tensors["token_embd.weight"]), raw["model.embed_tokens.weight"].float())
    assert "output.weight" not in tensors  # tied: llama.cpp reads the embeddings as the output head
    pairs = {"output_norm.weight": "model.norm.weight"}
    for layer in range(2):
        pairs[f"blk.{layer}.attn_norm.weight"] = f"model.layers.{layer}.input_layernorm.weight"
        pairs[f"blk.{layer}.ffn_norm.weight"] = f"model.layers.{layer}.post_attention_layernorm.weight"
        for name, hf in [("attn_v", "v_proj"), ("attn_output", "o_proj")]:
            pairs[f"blk.{layer}.{name}.bias"] = f"model.layers.{layer}.self_attn.{hf}.bias"
    for name, hf in pairs.items():
        assert tensors[name].tensor_type == F32, name
        assert torch.equal(torch.from_numpy(tensors[name].data.copy()), raw[hf].float()), name
    for layer in range(2):  # q/k biases follow their rows into llama.cpp's order
        for name, hf, n_head in [("attn_q", "q_proj", N_HEAD), ("attn_k", "k_proj", N_HEAD_KV)]:
            bias = raw[f"model.layers.{layer}.self_attn.{hf}.bias"].float()
            ours = torch.from_numpy(tensors[f"blk.{layer}.{name}.bias"].data.copy())
            assert torch.equal(ours, bias[rope_row_permutation(bias.shape[0], n_head)])
    assert len(tensors) == 1 + 1 + 2 * (2 + 7 + 4)  # embeddings, final norm; per block 2 norms, 7 linears, 4 biases


def test_metadata_describes_the_llama_model(exported, chat_model_dir):
    reader = read_gguf(exported[1])
    config = json.loads((chat_model_dir / "config.json").read_text())
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1
    expected = {
        "llama.block_count": 2, "llama.context_length": 512, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
        "llama.attention.head_count": N_HEAD, "llama.attention.head_count_kv": N_HEAD_KV, "llama.rope.dimension_count": 16,
        "llama.attention.key_length": 16, "llama.attention.value_length": 16, "llama.vocab_size": config["vocab_size"],
    }
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config.get("rope_theta", 10000.0))
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert "llama.rope.scaling.type" not in reader.fields and "llama.attention.sliding_window" not in reader.fields


def test_byte_level_tokenizer_is_the_artifacts(exported, chat_model_dir):
    """Tokens by id, merges in order, token types, special ids and the chat template, as quantkit loads them."""
    reader = read_gguf(exported[1])
    tokenizer = load_tokenizer(chat_model_dir)
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    types, eos = field(reader, "tokenizer.ggml.token_type"), tokenizer.eos_token_id
    assert types[eos] == gguf.TokenType.CONTROL and tokens[eos] == "</s>"
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i != eos)
    merges = json.loads((chat_model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert "tokenizer.ggml.scores" not in reader.fields
    assert field(reader, "tokenizer.ggml.eos_token_id") == eos and "tokenizer.ggml.bos_token_id" not in reader.fields
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # the tiny tokenizer adds nothing
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_export_directory_holds_the_file_and_a_manifest_tied_to_the_source(exported):
    artifact_dir, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_FILE_NAME, EXPORT_MANIFEST_NAME])
    manifest = json.loads((out / EXPORT_MANIFEST_NAME).read_text())
    assert manifest["format"] == "gguf" and manifest["files"] == {GGUF_FILE_NAME: file_sha256(out / GGUF_FILE_NAME)}
    assert (manifest["gguf_architecture"], manifest["gguf_tokenizer"]) == ("llama", "gpt2/gpt-2")
    assert manifest["source"]["manifest_sha256"] == file_sha256(artifact_dir / MANIFEST_NAME)
    q4_1 = manifest["q4_1"]
    group = load_artifact(artifact_dir).quantization["group_size"]
    assert (q4_1["group_size"], q4_1["blocks_per_group"], q4_1["tensors"]) == (group, group // 32, 14)
    assert 0 < q4_1["max_min_rounding_of_bound"] <= 1  # some m rounded, none beyond the bound
    assert (out / GGUF_FILE_NAME).stat().st_mode & 0o777 == 0o644


def test_an_untied_lm_head_becomes_the_f16_output_tensor(tiny_model_dir, tmp_path):
    artifact = llama_artifact(tiny_model_dir, tmp_path / "art", tied=False, tie_word_embeddings=False)
    lm_head = load_artifact(artifact).tensors()["lm_head.weight"]
    reader = read_gguf(export_artifact(artifact, tmp_path / "gguf", fmt="gguf"))
    output = next(t for t in reader.tensors if t.name == "output.weight")
    assert output.tensor_type == F16 and torch.equal(gguf_dense(output), lm_head.float())
    assert "tokenizer.chat_template" not in reader.fields  # this tokenizer has no chat template


# --- a Gemma 3 export, read back ----------------------------------------------------------------


def train_spm_style_tokenizer(lines: list[str]):
    """A Gemma-shaped tokenizer: BPE with byte fallback over '▁'-escaped text, <bos> added in front."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False))
    spec = json.loads(tok.to_str())  # the 256 byte tokens join the vocabulary as ordinary tokens, as in Gemma's
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + i for i, b in enumerate(b for b in range(256) if f"<0x{b:02X}>" not in vocab)})
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                                   additional_special_tokens=["<start_of_turn>"], model_max_length=512)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    """A 3-layer random Gemma 3 (local, global, local layers; linear RoPE scaling on the global one)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from quantkit.calibration import load_calibration_texts

    out = tmp_path_factory.mktemp("tiny-gemma3")
    tokenizer = train_spm_style_tokenizer([d[:300] for d in load_calibration_texts(None)[0][:300]])
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=N_HEAD,
        num_key_value_heads=N_HEAD_KV, head_dim=32, query_pre_attn_scalar=32, sliding_window=8, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}},
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).float().eval()
    with torch.no_grad():  # Gemma norms start at zero (1 + w = 1): randomize them so the shift shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gemma_exported(gemma_dir, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("gemma-g32")
    artifact = make_artifact(awq_tensors(load_model(gemma_dir), "gemma3_text", 32), gemma_dir, base / "art", 32)
    return artifact, export_artifact(artifact, base / "gguf", fmt="gguf")


def test_gemma3_linears_are_q4_1_in_hf_row_order(gemma_exported):
    """llama.cpp's gemma3 rotates halves as HF does: no row permutation."""
    assert_q4_1_tensors_match(gemma_exported[1], gemma_exported[0], n_layers=3, permute=False)


def test_gemma3_norms_are_stored_as_one_plus_w(gemma_exported):
    raw, tensors = load_artifact(gemma_exported[0]).tensors(), gguf_tensors(gemma_exported[1])
    pairs = {"output_norm.weight": "model.norm.weight"}
    for layer in range(3):
        for name, hf in [("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                         ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
                         ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")]:
            pairs[f"blk.{layer}.{name}.weight"] = f"model.layers.{layer}.{hf}.weight"
    for name, hf in pairs.items():
        assert tensors[name].tensor_type == F32, name
        assert torch.equal(torch.from_numpy(tensors[name].data.copy()), raw[hf].float() + 1.0), name
    assert torch.equal(gguf_dense(tensors["token_embd.weight"]), raw["model.embed_tokens.weight"].float())
    assert len(tensors) == 2 + 3 * (6 + 7)  # embeddings (tied), final norm; per block 6 norms, 7 linears


def test_gemma3_metadata_lists_local_layers_and_both_ropes(gemma_exported):
    reader = read_gguf(gemma_exported[1])
    assert field(reader, "general.architecture") == "gemma3"
    expected = {
        "gemma3.block_count": 3, "gemma3.embedding_length": 64, "gemma3.attention.head_count": N_HEAD,
        "gemma3.attention.head_count_kv": N_HEAD_KV, "gemma3.attention.key_length": 32, "gemma3.attention.value_length": 32,
        "gemma3.attention.sliding_window": 8, "gemma3.attention.sliding_window_pattern": [True, False, True],
        "gemma3.rope.freq_base": 1_000_000.0, "gemma3.rope.freq_base_swa": 10_000.0,
        "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 2.0, "gemma3.final_logit_softcapping": 30.0,
    }
    assert {k: field(reader, k) for k in expected} == expected


def spm_tokenize(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenization: '▁' for ' ', then merge the best-scoring adjacent pair
    that is a token (leftmost on ties) until none is; a piece that is no token becomes its bytes."""
    ids = {t: i for i, t in enumerate(tokens)}
    pieces = list(text.replace(" ", "\u2581"))
    while True:
        pairs = [(-scores[ids[a + b]], i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])) if a + b in ids]
        if not pairs:
            break
        i = min(pairs)[1]
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return [j for p in pieces for j in ([ids[p]] if p in ids else [ids[f"<0x{b:02X}>"] for b in p.encode()])]


def test_gemma3_tokenizer_in_sentencepiece_form_tokenizes_as_hf(gemma_exported, gemma_dir):
    """Scores = -rank of the first merge making a token, so llama.cpp's merge order is HF's; bytes are BYTE tokens."""
    reader, tokenizer = read_gguf(gemma_exported[1]), load_tokenizer(gemma_dir)
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("llama", "default")
    tokens, scores, types = (field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    assert tokens == [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    assert "tokenizer.ggml.merges" not in reader.fields and field(reader, "tokenizer.ggml.add_space_prefix") is False
    special = set(tokenizer.all_special_ids)
    for i, (token, kind) in enumerate(zip(tokens, types)):
        expected = gguf.TokenType.CONTROL if i in special else gguf.TokenType.BYTE if re.fullmatch("<0x[0-9A-F]{2}>", token) else gguf.TokenType.NORMAL
        assert kind == expected, (i, token)
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256 and sum(t == gguf.TokenType.CONTROL for t in types) == 5
    specials = {k: field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    assert specials == {"bos": 2, "eos": 1, "unknown": 3, "padding": 0}
    assert field(reader, "tokenizer.ggml.add_bos_token") is True and field(reader, "tokenizer.ggml.add_eos_token") is False
    for text in TEXTS + [load_calibration_text()]:
        assert spm_tokenize(text, tokens, scores) == tokenizer(text, add_special_tokens=False).input_ids, text
    assert any(types[i] == gguf.TokenType.BYTE for i in spm_tokenize(TEXTS[3], tokens, scores))  # the snowman fell back to bytes


# --- refusals -----------------------------------------------------------------------------------


def test_unsupported_group_size_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    """A foreign AWQ checkpoint with group 16 (quantkit itself makes 32, 64 and 128 only)."""
    tensors = awq_tensors(load_model(tiny_model_dir), "llama", 32)
    for module in [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]:
        w = dequantize_awq(*(tensors.pop(f"{module}.{s}") for s in ("qweight", "qzeros", "scales")))
        params = compute_qparams(w, 16)
        tensors.update({f"{module}.{s}": t for s, t in pack_awq(quantize(w, params), params).items()})
    artifact = make_artifact(tensors, tiny_model_dir, tmp_path / "art", 16)
    with pytest.raises(QuantkitError, match="group size 16 does not split into llama.cpp's Q4_1 blocks"):
        export_artifact(artifact, tmp_path / "gguf", fmt="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_architectures_without_a_mapping_are_refused_naming_the_mapped_ones(tiny_model_dir, tmp_path):
    artifact = make_artifact(awq_tensors(load_model(tiny_model_dir), "llama", 32), tiny_model_dir, tmp_path / "art", 32, model_type="qwen2")
    with pytest.raises(QuantkitError, match="maps the architectures gemma3_text, llama, mistral to llama.cpp; this artifact is 'qwen2'.*--format compressed-tensors"):
        export_artifact(artifact, tmp_path / "gguf", fmt="gguf")
    assert not (tmp_path / "gguf").exists()


LLAMA_CONFIG = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "vocab_size": 512}
GEMMA3_CONFIG = {**LLAMA_CONFIG, "model_type": "gemma3_text", "head_dim": 32, "query_pre_attn_scalar": 32,
                 "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}


def test_a_mistral_without_a_window_is_llama():
    model = GGUFModel.from_config({**LLAMA_CONFIG, "model_type": "mistral", "sliding_window": None})
    assert model.arch_name == "llama" and model.arch.permute_qk and model.metadata["key_length"] == 16


@pytest.mark.parametrize("config,match", [
    ({**LLAMA_CONFIG, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3' is not written"),
    ({**LLAMA_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "this model's config is outside what quantkit runs .*'yarn'"),
    ({**LLAMA_CONFIG, "hidden_act": "gelu"}, "uses SiLU; this model's hidden_act is 'gelu'"),
    ({**LLAMA_CONFIG, "model_type": "mistral", "sliding_window": 8}, "no sliding-window attention"),
    ({**GEMMA3_CONFIG, "query_pre_attn_scalar": 24}, "scales this model's attention by 32 \\*\\* -0.5; its query_pre_attn_scalar is 24"),
    ({**GEMMA3_CONFIG, "rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                           "full_attention": {"rope_type": "default"}}}, "no RoPE scaling to Gemma 3's sliding-window layers"),
], ids=["llama3-rope", "yarn-rope", "gelu", "mistral-window", "gemma-attention-scale", "gemma-local-rope-scaling"])
def test_what_llama_cpp_would_compute_differently_is_refused(config, match):
    with pytest.raises(QuantkitError, match=f"GGUF export: .*{match}.*--format compressed-tensors"):
        GGUFModel.from_config(config)


def test_tokenizers_are_named_only_when_llama_cpp_splits_the_same_way():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bpe = {"type": "BPE", "merges": []}
    assert tokenizer_kind({"model": bpe, "normalizer": None, "pre_tokenizer": byte_level}) == ("gpt2", "gpt-2")
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert tokenizer_kind({"model": bpe, "normalizer": None, "pre_tokenizer": digits}) == ("gpt2", "smollm")
    escape = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    assert tokenizer_kind({"model": {**bpe, "byte_fallback": True}, "normalizer": escape, "pre_tokenizer": None}) == ("llama", "default")
    prefixed = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, escape]}  # Llama 2's: a prefix space
    metaspace = {"type": "Metaspace", "replacement": "\u2581"}
    for refused in [{"model": bpe, "normalizer": None, "pre_tokenizer": metaspace},
                    {"model": {**bpe, "byte_fallback": True}, "normalizer": prefixed, "pre_tokenizer": None},
                    {"model": {**bpe, "byte_fallback": True}, "normalizer": None, "pre_tokenizer": byte_level},
                    {"model": {"type": "Unigram"}, "normalizer": None, "pre_tokenizer": metaspace}]:
        with pytest.raises(QuantkitError, match="cannot name a llama.cpp tokenizer that splits text as this one does"):
            tokenizer_kind(refused)


# --- the directory, the CLI ---------------------------------------------------------------------


def test_existing_output_needs_force_and_force_replaces_it(exported, tmp_path):
    artifact_dir, _ = exported
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(QuantkitError, match="already exists; pass --force"):
        export_artifact(artifact_dir, out, fmt="gguf")
    assert (out / "stale.txt").exists()
    export_artifact(artifact_dir, out, fmt="gguf", force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_FILE_NAME, EXPORT_MANIFEST_NAME])
    assert [p.name for p in tmp_path.iterdir()] == ["gguf"]  # no temp or backup left


def test_cli_exports_gguf_and_reports_refusals_in_one_line(exported, tiny_model_dir, tmp_path):
    artifact_dir, reference = exported
    result = CliRunner().invoke(main, ["export", str(artifact_dir), "-o", str(tmp_path / "out"), "--format", "gguf"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {tmp_path / 'out'}"
    assert file_sha256(tmp_path / "out" / GGUF_FILE_NAME) == file_sha256(reference / GGUF_FILE_NAME)  # deterministic
    qwen = make_artifact(awq_tensors(load_model(tiny_model_dir), "llama", 32), tiny_model_dir, tmp_path / "qwen", 32, model_type="qwen2")
    result = CliRunner().invoke(main, ["export", str(qwen), "-o", str(tmp_path / "x"), "--format", "gguf"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "this artifact is 'qwen2'" in result.output and not (tmp_path / "x").exists()


def test_unknown_format_lists_gguf_among_the_supported():
    assert SUPPORTED_FORMATS == ("compressed-tensors", "gguf")
    with pytest.raises(QuantkitError, match="unknown export format 'onnx'; supported formats: compressed-tensors, gguf"):
        export_artifact("unused", "unused-out", fmt="onnx")
