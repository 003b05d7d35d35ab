"""Shared fixtures: a tiny random Llama built offline in seconds, and the embedded SmolLM2."""

from __future__ import annotations

import os

# Before torch loads OpenMP: passive waits (see quantkit/cli.py), and never reach for the hub.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# QUANTKIT_TEST_DEVICE=cuda runs the Triton kernel, runner and engine tests on the GPU against the
# same float64 references (see kernels_on_test_device); the default, cpu, runs the Triton kernels in
# Triton's interpreter on CPU tensors (set before triton is imported).
TEST_DEVICE = os.environ.get("QUANTKIT_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"QUANTKIT_TEST_DEVICE={TEST_DEVICE}: choose cpu (the default) or cuda")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 512


def _on_device(kernel, device: str):
    """kernel run with its CPU tensor arguments moved to `device`: results come back, and
    arguments it wrote in place (outputs, caches) are copied back, so a test stays as written."""

    def call(*args, **kwargs):
        moved = {}

        def to_device(value):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                moved[id(value)] = (value, value.to(device))
                return moved[id(value)][1]
            return value

        result = kernel(*map(to_device, args), **{k: to_device(v) for k, v in kwargs.items()})
        for original, on_device in moved.values():
            original.copy_(on_device)
        for original, on_device in moved.values():  # a kernel that returns its `out` returns the caller's tensor
            if result is on_device:
                return original
        return result.cpu() if isinstance(result, torch.Tensor) else result

    return call


@pytest.fixture(scope="session")
def test_device() -> str:
    """Where runner and engine tests put the model: QUANTKIT_TEST_DEVICE (cpu by default)."""
    return TEST_DEVICE


@pytest.fixture(autouse=True)
def kernels_on_test_device(request, monkeypatch):
    """With QUANTKIT_TEST_DEVICE=cuda, the kernels a test module lists in KERNELS_UNDER_TEST
    (names it imported) run on the GPU; its inputs and float64 references stay on the CPU."""
    names = getattr(request.module, "KERNELS_UNDER_TEST", ())
    if TEST_DEVICE == "cpu" or not names:
        return
    for name in names:
        monkeypatch.setattr(request.module, name, _on_device(getattr(request.module, name), TEST_DEVICE))


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `directory`: for comparing outputs in tests
    (quantkit itself reads only the files a manifest or index lists)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens from a transformers model, recomputing the whole prefix each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """An ASGI app under a real uvicorn server on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    from quantkit.bench.run import free_loopback_port

    port = free_loopback_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
TINY_EOS = "</s>"


def _train_tiny_tokenizer(lines: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every string is encodable, so tests never hit an unknown token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[TINY_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_EOS, model_max_length=512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (GQA 4/2 heads, tied embeddings) with a 512-token BPE, fp32 safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.calibration import load_calibration_texts

    out = tmp_path_factory.mktemp("tiny-llama")
    docs, _ = load_calibration_texts(None)
    tokenizer = _train_tiny_tokenizer(docs[:500])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out)  # transformers writes safetensors
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct; converted once into the user cache, then reused."""
    from quantkit.sources import resolve_model

    return resolve_model("smollm2-135m")
