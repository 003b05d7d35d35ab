"""AWQ's search, folding and quantization, on tiny random blocks and on a real SmolLM2 block."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.awq import (
    AWQSettings,
    _cast_floats,
    awq_scales,
    capture_block_inputs,
    collect_features,
    quantize_block,
    quantize_model,
    apply_clip,
    search_clip,
    search_group_scales,
)
from quantkit.errors import QuantkitError
from quantkit.models import get_adapter
from quantkit.quantizer import dequantize, fake_quantize

ADAPTER = get_adapter("llama")


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir):
    from quantkit.sources import load_model

    return load_model(smollm2_dir, torch.float32)


@pytest.fixture(scope="module")
def calibration_ids(smollm2_dir):
    from quantkit.calibration import build_calibration_set, load_calibration_texts
    from quantkit.sources import load_tokenizer

    texts, _ = load_calibration_texts(None)
    return build_calibration_set(texts, load_tokenizer(smollm2_dir), n_samples=16, seqlen=256, seed=0)
FP32 = AWQSettings(compute_dtype="float32", search_samples=4, batch_samples=4)


def tiny_llama(seed: int = 0, heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def block_inputs(model, n: int = 8, seqlen: int = 32, settings: AWQSettings = FP32):
    ids = torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(1))
    hidden, kwargs = capture_block_inputs(model, ADAPTER.blocks(model), ids)
    return hidden, _cast_floats(kwargs[0], settings.dtype)


def test_scales_are_normalized_and_alpha_zero_is_identity():
    x = torch.tensor([0.1, 1.0, 10.0])
    assert torch.equal(awq_scales(x, 0.0), torch.ones(3))
    s = awq_scales(x, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0)
    assert s[2] > s[1] > s[0]  # channels with larger activations get larger scales


def test_every_search_step_starts_from_the_original_weights():
    # The AutoAWQ-on-CPU trap: a "backup" that aliases the searched weights silently corrupts
    # every later candidate. Here the masters must be untouched and each loss reproducible.
    model = tiny_llama()
    block = ADAPTER.blocks(model)[0]
    hidden, kwargs = block_inputs(model)
    working = copy.deepcopy(block)
    names = ADAPTER.quantized_linears(block)
    features = collect_features(working, ADAPTER, names, hidden, kwargs, FP32)
    group = next(g for g in ADAPTER.scaling_groups(block) if g.inspect == "mlp")
    before = {name: p.clone() for name, p in block.state_dict().items()}

    first = search_group_scales(group, block, working, ADAPTER, features, kwargs, FP32)
    second = search_group_scales(group, block, working, ADAPTER, features, kwargs, FP32)

    for name, p in block.state_dict().items():
        assert torch.equal(p, before[name]), f"search mutated master weight {name}"
        assert torch.equal(working.state_dict()[name], before[name]), f"working copy not restored: {name}"
    assert first.losses == second.losses
    assert len(first.losses) == FP32.n_grid
    # alpha = 0 means scales of 1: its loss is exactly round-to-nearest on the original weights.
    x = features.inputs["mlp.gate_proj"]
    rtn_mlp = copy.deepcopy(block.mlp)
    for name in ("gate_proj", "up_proj"):
        layer = rtn_mlp.get_submodule(name)
        layer.weight.data = fake_quantize(layer.weight.data, FP32.group_size)
    with torch.no_grad():
        expected = (rtn_mlp(x) - block.mlp(x)).pow(2).mean().item()
    assert first.losses[0] == pytest.approx(expected, rel=1e-5)
    assert min(first.losses) <= first.losses[0]


def test_folding_keeps_the_full_precision_function():
    # Scales divided out of the norm and multiplied into the linears cancel exactly in fp32.
    model = tiny_llama()
    block = ADAPTER.blocks(model)[0]
    hidden, kwargs = block_inputs(model)
    group = next(g for g in ADAPTER.scaling_groups(block) if g.inspect == "mlp")
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        before = block.mlp(block.post_attention_layernorm(x))
        scales = torch.rand(128) + 0.5
        ADAPTER.fold_into_prev(block.get_submodule(group.prev), scales)
        for name in group.linears:
            block.get_submodule(name).weight.data.mul_(scales)
        after = block.mlp(block.post_attention_layernorm(x))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_value_to_output_group_only_when_shapes_match():
    with_gqa = ADAPTER.scaling_groups(ADAPTER.blocks(tiny_llama(heads=4, kv_heads=2))[0])
    without_gqa = ADAPTER.scaling_groups(ADAPTER.blocks(tiny_llama(heads=4, kv_heads=4))[0])
    assert "self_attn.o_proj" not in [g.inspect for g in with_gqa]
    assert "self_attn.o_proj" in [g.inspect for g in without_gqa]


@pytest.mark.parametrize("sequential", [False, True])
def test_awq_beats_rtn_on_a_tiny_model_end_to_end(sequential):
    reference = tiny_llama()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
    errors = {}
    for method in ("rtn", "awq"):
        model = copy.deepcopy(reference)
        settings = AWQSettings(method=method, compute_dtype="float32", search_samples=8, sequential=sequential)
        result = quantize_model(model, ADAPTER, settings, ids)
        assert len(result.linears) == 2 * 7
        with torch.no_grad():
            errors[method] = (model(ids).logits - expected).pow(2).mean().item()
    assert errors["awq"] < errors["rtn"]


def test_awq_lowers_a_real_block_output_error_against_rtn(smollm2_model, calibration_ids):
    """On SmolLM2's block 2, with real calibration text, held-out output MSE: AWQ < RTN."""
    model = smollm2_model
    blocks = ADAPTER.blocks(model)
    settings = AWQSettings(search_samples=8, batch_samples=4)
    calib, held_out = calibration_ids[:12], calibration_ids[12:]
    hidden, kwargs = capture_block_inputs(model, blocks, torch.cat([calib, held_out]))
    kwargs = _cast_floats(kwargs[0], torch.float32)  # every Llama block gets the same kwargs
    with torch.no_grad():
        for block in blocks[:2]:
            hidden = ADAPTER.run_block(block, hidden, kwargs)
    target = blocks[2]
    x_calib, x_held = hidden[: len(calib)], hidden[len(calib) :]
    with torch.no_grad():
        expected = ADAPTER.run_block(target, x_held, kwargs)

    rtn = copy.deepcopy(target)
    for name in ADAPTER.quantized_linears(rtn):
        layer = rtn.get_submodule(name)
        layer.weight.data = fake_quantize(layer.weight.data, settings.group_size)
    awq = copy.deepcopy(target)
    quantize_block(awq, ADAPTER, x_calib.clone(), _cast_floats(kwargs, settings.dtype), settings)
    with torch.no_grad():
        rtn_err = (ADAPTER.run_block(rtn, x_held, kwargs) - expected).pow(2).mean().item()
        awq_err = (ADAPTER.run_block(awq, x_held, kwargs) - expected).pow(2).mean().item()
    assert awq_err < rtn_err, (awq_err, rtn_err)


def test_gptq_rounding_lowers_a_real_block_output_error_against_nearest(smollm2_dir, smollm2_model):
    """SmolLM2's block 2 quantized by AWQ twice, rounding to nearest and GPTQ-rounding: held-out output MSE drops.

    GPTQ needs well over `in_features` calibration tokens (down_proj takes 1,536 inputs): with
    fewer its Hessian is rank-deficient and the rounding overfits, so this uses 32 x 512 tokens.
    """
    from quantkit.calibration import build_calibration_set, load_calibration_texts
    from quantkit.sources import load_tokenizer

    texts, _ = load_calibration_texts(None)
    ids = build_calibration_set(texts, load_tokenizer(smollm2_dir), n_samples=40, seqlen=512, seed=0)
    blocks = ADAPTER.blocks(smollm2_model)
    n_calib = 32
    hidden, kwargs = capture_block_inputs(smollm2_model, blocks, ids)
    kwargs = _cast_floats(kwargs[0], torch.float32)
    with torch.no_grad():
        for block in blocks[:2]:
            hidden = ADAPTER.run_block(block, hidden, kwargs)
        expected = ADAPTER.run_block(blocks[2], hidden[n_calib:], kwargs)
    errors = {}
    for rounding in ("nearest", "gptq"):
        settings = AWQSettings(search_samples=8, batch_samples=4, rounding=rounding)
        block = copy.deepcopy(blocks[2])
        quantized, _ = quantize_block(block, ADAPTER, hidden[:n_calib].clone(), _cast_floats(kwargs, settings.dtype), settings)
        assert all(ql.q.max() <= 15 for ql in quantized.values())
        with torch.no_grad():
            errors[rounding] = (ADAPTER.run_block(block, hidden[n_calib:], kwargs) - expected).pow(2).mean().item()
    assert errors["gptq"] < 0.9 * errors["nearest"], errors


def test_gptq_rounding_is_refused_without_calibration():
    model = tiny_llama()
    with pytest.raises(QuantkitError, match="method 'awq'"):
        quantize_model(model, ADAPTER, AWQSettings(method="rtn", rounding="gptq"))
    with pytest.raises(QuantkitError, match="rounding 'stochastic' is not known"):
        quantize_model(model, ADAPTER, AWQSettings(rounding="stochastic"), torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("style", ["symmetric", "range"])
def test_clip_search_never_increases_the_output_error_it_scores(style):
    torch.manual_seed(4)
    w = torch.randn(32, 128)
    w[:, 5] *= 8  # an outlier column: clipping it should pay off somewhere
    x = torch.randn(256, 128)
    settings = AWQSettings(group_size=32, clip_style=style)
    low, high = search_clip(w, x, settings)
    assert low.shape == high.shape == (32, 4)
    assert (low <= 0).all() and (high >= 0).all()
    clipped = apply_clip(w, low, high, 32)

    def group_errors(weight):
        q = fake_quantize(weight, 32)
        diff = (q - w).view(32, 4, 32)
        return torch.einsum("ogk,tgk->ogt", diff, x.view(256, 4, 32)).pow(2).mean(-1)

    assert (group_errors(clipped) <= group_errors(w) * (1 + 1e-5)).all()
    assert (group_errors(clipped) < group_errors(w)).any()


def test_the_model_keeps_its_storage_dtype_and_only_the_codes_are_kept():
    model = tiny_llama().half()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(6))
    result = quantize_model(model, ADAPTER, AWQSettings(search_samples=2), ids)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    ql = result.linears["model.layers.0.mlp.down_proj"]
    assert ql.q.dtype == torch.uint8 and ql.q.shape == (128, 256)
    # The model holds exactly what the codes dequantize to (rounded to its storage dtype).
    expected = dequantize(ql.q, ql.params).half()
    assert torch.equal(ADAPTER.blocks(model)[0].mlp.down_proj.weight, expected)
