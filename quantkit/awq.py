"""Activation-aware weight quantization (AWQ), block by block through the decoder.

For every block: run the calibration set through it in full precision, collecting each
linear's mean input magnitude over all calibration tokens (cheap) and the inputs of a
smaller search subset (the grid-search loss is the expensive part); search one scale per
input channel for every scaling group; fold the scales into the preceding norm or linear;
search per-group clipping; quantize (to nearest, or with `rounding: gptq` in GPTQ's
error-compensating order on the same grid); then run the *quantized* block to produce the next
block's inputs, so later blocks calibrate against the errors of earlier ones.

Forward passes run in `compute_dtype` (bf16 by default: its matmuls are 2.2x faster than fp32
at 256 rows on this CPU, BENCHMARKS.md, and its rounding is two orders of magnitude below int4 error), while scales, clipping and
codes are computed from fp32 master weights that the search itself never mutates.

All of it runs on one `device` (cpu or cuda): the model stays on the CPU, and each block is
moved to the device for its turn (`block_on`) with its calibration inputs, which stay there from
block to block; what a finished block hands on (`BlockDone`) is back on the CPU, so the artifact
is written from CPU tensors of the same dtypes whichever device computed them. Dtypes are the
same on every device: only the order of floating-point sums differs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import QuantkitError
from .kernels.backend import resolve_device
from .models import ArchAdapter, ScalingGroup
from .quantizer import (
    QuantParams,
    check_group_size,
    compute_qparams,
    dequantize,
    fake_quantize,
    gptq_quantize,
    quantize,
    relative_error,
)

# The values each choice of AWQSettings may take (the recipe schema and the pipeline's checks read these).
METHODS = ("awq", "rtn")
ROUNDINGS = ("nearest", "gptq")
CLIP_STYLES = ("symmetric", "range")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class AWQSettings:
    method: str = "awq"  # "awq" or "rtn" (round-to-nearest baseline, same packing)
    group_size: int = 64
    bits: int = 4
    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    duo_scaling: bool = False  # scale = x^alpha / w^(1-alpha) (AutoAWQ's 'duo') instead of x^alpha
    clip: bool = True
    max_shrink: float = 0.5  # clipping search shrinks a group's range by at most this fraction
    clip_style: str = "symmetric"  # "symmetric" [-m, m] (AutoAWQ) or "range" (shrink [min, max])
    clip_tokens: int = 512  # tokens (strided subsample) that score the clipping candidates
    search_samples: int = 16  # calibration samples whose outputs form the scale-search loss
    # Leading tokens of each sample kept out of statistics and losses. The first position is an
    # attention sink whose activations reach ~100x the others' and dominate every MSE; leaving
    # it out was measured to hurt badly (BENCHMARKS.md), so all tokens count by default.
    sink_tokens: int = 0
    batch_samples: int = 8  # samples per forward chunk (bounds activation memory)
    sequential: bool = False  # search later groups on outputs of the block's quantized earlier linears
    compute_dtype: str = "bfloat16"
    # "nearest" (AWQ's) or "gptq": the same grid, each column's rounding error pushed onto the
    # columns not yet rounded so the layer's output on the calibration inputs stays closest.
    rounding: str = "nearest"
    gptq_damp: float = 0.01  # added to the Hessian's diagonal, as a fraction of its mean
    gptq_act_order: bool = True  # round the columns of the largest inputs first (GPTQ's act-order)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)


@dataclass
class QuantizedLinear:
    """One quantized linear: integer codes and group params in nn.Linear layout [out, in]."""

    q: torch.Tensor  # uint8 codes
    params: QuantParams
    bias: torch.Tensor | None
    weight_rel_err: float  # ||W_q - W||^2 / ||W||^2 in the original (unscaled) weight space
    output_rel_err: float | None = None  # same, of the layer's output on calibration tokens


@dataclass
class GroupSearch:
    """Outcome of one scaling group's grid search (kept for reports and tests)."""

    group: ScalingGroup
    alpha: float
    scales: torch.Tensor
    losses: list[float]


@dataclass
class QuantizeResult:
    linears: dict[str, QuantizedLinear] = field(default_factory=dict)
    searches: dict[str, list[GroupSearch]] = field(default_factory=dict)  # block prefix -> searches
    block_seconds: list[float] = field(default_factory=list)


ProgressFn = Callable[[int, int, float], None]  # (blocks done, blocks total, seconds of last block)


class _StopForward(Exception):
    pass


BlockFn = Callable[[int, nn.Module], None]


@dataclass
class BlockDone:
    """What one finished block hands to whoever stores it (memory or a partial artifact on disk).

    Every tensor in it is on the CPU, whatever device quantized the block.
    """

    index: int
    prefix: str
    block: nn.Module  # holds the folded scales and the dequantized weights
    linears: dict[str, QuantizedLinear]  # names relative to the block
    searches: list[GroupSearch]
    hidden: torch.Tensor | None  # the next block's inputs (None for RTN, which needs none)
    seconds: float


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    adapter: ArchAdapter,
    settings: AWQSettings,
    calib_ids: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
    device: str = "cpu",
) -> QuantizeResult:
    """Quantize every linear of every block in place (model keeps the dequantized weights).

    Returns the codes and params to pack. With method 'awq' the model's norms and linears
    also carry the folded scales, which the artifact must store with the codes. The model
    stays on the CPU; `device` ("cpu", "cuda" or "auto") is where each block is quantized.
    """
    run_on = torch.device(resolve_device(device))
    result = QuantizeResult()

    def keep(done: BlockDone) -> None:
        result.linears.update({done.prefix + name: ql for name, ql in done.linears.items()})
        if done.searches:
            result.searches[done.prefix] = done.searches
        result.block_seconds.append(done.seconds)
        if progress:
            progress(done.index + 1, len(adapter.blocks(model)), done.seconds)

    hidden, block_kwargs = None, None
    if settings.method == "awq":
        if calib_ids is None:
            raise ValueError("AWQ needs calibration token ids")
        hidden, block_kwargs = capture_block_inputs(model, adapter.blocks(model), calib_ids)
    quantize_blocks(adapter.blocks(model), adapter, settings, hidden, block_kwargs, on_done=keep, device=run_on)
    return result


@torch.no_grad()
def quantize_blocks(
    blocks: nn.ModuleList,
    adapter: ArchAdapter,
    settings: AWQSettings,
    hidden: torch.Tensor | None,
    block_kwargs: list[dict] | None,
    on_done: Callable[[BlockDone], None],
    start: int = 0,
    load_block: BlockFn | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """The generic loop: blocks `start`.. in order, each loaded (if `load_block`), quantized, handed on.

    `hidden` holds the inputs of block `start` (fp32); it is moved to `device` once (a no-op on
    the CPU: then the caller's tensor itself is updated) and updated there block after block. A
    streaming caller materializes each block (on the CPU) in `load_block` and frees it in
    `on_done`; in between the block is on `device`, and back on the CPU when `on_done` sees it.
    The same moves run on every device, so a CPU run exercises the streaming path too.
    `device` is already resolved ("cpu" or "cuda", kernels/backend.py's resolve_device), not "auto".
    """
    device = torch.device(device)
    check_group_sizes(blocks, adapter, settings.group_size)
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r}")
    check_rounding(settings)
    if settings.method == "awq" and (hidden is None or block_kwargs is None):
        raise ValueError("AWQ needs the first block's calibration inputs and every block's kwargs")
    if hidden is not None:
        hidden = hidden.to(device)
    for i in range(start, len(blocks)):
        block = blocks[i]
        if load_block:
            load_block(i, block)
        begin = time.perf_counter()  # the moves count: on a GPU they are part of a block's cost
        with block_on(block, device):
            if settings.method == "rtn":
                linears = {name: _finalize_linear(block.get_submodule(name), settings, block.get_submodule(name).weight.data.clone())
                           for name in adapter.quantized_linears(block)}
                searches: list[GroupSearch] = []
            else:
                kwargs = _cast_floats(block_kwargs[i], settings.dtype, device)
                storage = next(block.parameters()).dtype
                block.float()  # fp32 masters for this block only: the rest of the model stays as stored
                linears, searches = quantize_block(block, adapter, hidden, kwargs, settings)
                block.to(storage)  # what the artifact stores (its norms are fp16) is what the next block sees
                _propagate(block, adapter, hidden, kwargs, settings)
            linears = {name: _linear_to_cpu(ql) for name, ql in linears.items()}
            searches = [dataclasses.replace(search, scales=search.scales.cpu()) for search in searches]
            leaving = None if hidden is None else hidden.cpu()  # the copy back waits for the device's work: the time is honest
        on_done(BlockDone(i, adapter.block_prefix(i), block, linears, searches, leaving, time.perf_counter() - begin))


@contextlib.contextmanager
def block_on(block: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """`block` moved to `device` while it is quantized, then back on the CPU (also after an error).

    The rest of the model never leaves the CPU, so device memory holds one block (plus its
    working copies) and the calibration activations, whatever the depth. On the CPU both moves
    are no-ops: the tensors are not copied.
    """
    block.to(device)
    try:
        yield block
    finally:
        block.to("cpu")


def _linear_to_cpu(ql: QuantizedLinear) -> QuantizedLinear:
    """The codes, group params and bias on the CPU, in their dtypes: what the packer reads."""
    params = dataclasses.replace(ql.params, scales=ql.params.scales.cpu(), zeros=ql.params.zeros.cpu())
    return dataclasses.replace(ql, q=ql.q.cpu(), params=params, bias=None if ql.bias is None else ql.bias.cpu())


def check_rounding(settings: AWQSettings) -> None:
    """GPTQ rounding needs the calibration inputs that only the AWQ pass collects."""
    if settings.rounding not in ROUNDINGS:
        raise QuantkitError(f"rounding {settings.rounding!r} is not known; use one of {list(ROUNDINGS)}.")
    if settings.rounding == "gptq" and settings.method != "awq":
        raise QuantkitError("rounding 'gptq' needs calibration inputs: use it with method 'awq' (rtn rounds to nearest).")


def check_group_sizes(blocks: nn.ModuleList, adapter: ArchAdapter, group_size: int) -> None:
    """Every quantized linear's input features must split into whole groups."""
    for i, block in enumerate(blocks):
        for name in adapter.quantized_linears(block):
            check_group_size(block.get_submodule(name).in_features, group_size, adapter.block_prefix(i) + name)


# --- capturing and running blocks -------------------------------------------------------


class _KwargsRecorder(nn.Module):
    """Stands in for a decoder block during capture: records what the model passes it.

    Arguments are recorded by name (positional ones bound through the block's signature), as
    `ArchAdapter.run_block` passes them back. Attributes the decoder loop reads from its layers
    (a layer's attention type, say) come from the block it stands in for.
    """

    def __init__(self, block: nn.Module, record: Callable[[torch.Tensor, dict], None], stop: bool):
        super().__init__()
        self.record, self.stop = record, stop
        self.__dict__["_block"] = block  # not a submodule: the block's (meta) tensors stay out of the pass

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_block" not in self.__dict__:
                raise
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        hidden_states, kwargs = _by_name(self.__dict__["_block"], args, kwargs)
        self.record(hidden_states, kwargs)
        if self.stop:
            raise _StopForward
        return hidden_states


def _by_name(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The hidden states (the first argument) and every other argument of a call to `block`, by name."""
    signature = inspect.signature(block.forward)
    first = next(iter(signature.parameters.values()), None)
    if first is None or first.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        rest = dict(kwargs)  # an opaque (*args, **kwargs) signature: only keywords have names
        if len(args) == 1 or (not args and "hidden_states" in rest):
            return (args[0] if args else rest.pop("hidden_states")), rest
        raise TypeError(f"{type(block).__name__}.forward does not name its parameters; pass all but the hidden states by keyword")
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{type(block).__name__} was called with arguments its forward does not take ({e})") from None
    arguments = dict(bound.arguments)
    hidden_states = arguments.pop(first.name)
    named: dict = {}
    for name, value in arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(block).__name__} takes *{name}, which cannot be passed back by name")
        else:
            named[name] = value
    return hidden_states, named


def _run_with_recorders(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, record: Callable[[int, torch.Tensor, dict], None], upto: int) -> None:
    """Run the model on `ids` with blocks 0..upto replaced by recorders (the last one stops the pass).

    The real blocks never run, so this works on a model whose blocks are not loaded yet (meta).
    """
    originals = [blocks[i] for i in range(upto + 1)]
    for i in range(upto + 1):
        blocks[i] = _KwargsRecorder(originals[i], lambda h, kw, i=i: record(i, h, kw), stop=i == upto)
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering the first block for every sample (fp32), and each block's kwargs.

    Every block gets its own kwargs (positions, rotary embeddings, masks): models that mix
    sliding-window and global layers pass each kind a different mask and rotary table. They are
    captured from a one-sample batch so that every tensor in them broadcasts over any batch size.
    """
    kwargs_per_block: list[dict] = [{} for _ in blocks]
    _run_with_recorders(model, blocks, calib_ids[:1], lambda i, _h, kw: kwargs_per_block.__setitem__(i, kw), upto=len(blocks) - 1)
    chunks: list[torch.Tensor] = []
    for start in range(0, len(calib_ids), batch):
        _run_with_recorders(model, blocks, calib_ids[start : start + batch], lambda _i, h, _kw: chunks.append(h.float()), upto=0)
    return torch.cat(chunks), kwargs_per_block


def _cast_floats(obj, dtype: torch.dtype, device: torch.device | str | None = None):
    """`obj` (a block's kwargs: tensors in tuples, lists and dicts) with float tensors in `dtype`,
    and every tensor on `device` if one is given (masks and positions too)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device) if device is not None else obj
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(o, dtype, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype, device) for k, v in obj.items()}
    return obj


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _propagate(block: nn.Module, adapter: ArchAdapter, hidden: torch.Tensor, block_kwargs: dict, settings: AWQSettings) -> None:
    """Replace `hidden` in place by the (now quantized) block's outputs."""
    working = copy.deepcopy(block).to(settings.dtype)
    with torch.no_grad():
        for sl in _chunks(len(hidden), settings.batch_samples):
            hidden[sl] = adapter.run_block(working, hidden[sl].to(settings.dtype), block_kwargs).float()


@dataclass
class BlockFeatures:
    """What one full-precision pass over the calibration set records for each linear."""

    mean_abs: dict[str, torch.Tensor]  # mean |x| per input channel over all tokens
    inputs: dict[str, torch.Tensor]  # inputs of the search samples [S, T, in]
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)  # sum of x x^T over all tokens (GPTQ rounding)


def collect_features(working: nn.Module, adapter: ArchAdapter, names: list[str], hidden: torch.Tensor, block_kwargs: dict, settings: AWQSettings) -> BlockFeatures:
    device = hidden.device  # the block and its inputs are on one device; the statistics accumulate there
    sums = {name: torch.zeros(working.get_submodule(name).in_features, device=device) for name in names}
    with_hessians = settings.rounding == "gptq"
    hessians = {name: torch.zeros(len(sums[name]), len(sums[name]), device=device) for name in names} if with_hessians else {}
    search: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    counted: dict[str, int] = {name: 0 for name in names}
    state = {"in_search": False}
    # q/k/v receive the same tensor: reduce it once. The memo holds x so its id stays unique.
    memo: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}  # x, sum |x|, x^T x

    def make_hook(name: str):
        def hook(_module, args, _output):
            x = args[0]
            if id(x) not in memo:
                stats_part = x[:, settings.sink_tokens :].float().reshape(-1, x.shape[-1])
                gram = stats_part.t() @ stats_part if with_hessians else None
                memo[id(x)] = (x, stats_part.abs().sum(0), gram)
            sums[name] += memo[id(x)][1]
            if with_hessians:
                hessians[name] += memo[id(x)][2]
            counted[name] += x.shape[0] * max(0, x.shape[1] - settings.sink_tokens)
            if state["in_search"]:
                search[name].append(x.detach())

        return hook

    handles = [working.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    n_search = min(settings.search_samples, len(hidden))
    # The first `n_search` samples are the search subset: their linear inputs are kept too.
    passes = [(sl, True) for sl in _chunks(n_search, settings.batch_samples)]
    passes += [(slice(sl.start + n_search, sl.stop + n_search), False) for sl in _chunks(len(hidden) - n_search, settings.batch_samples)]
    try:
        with torch.no_grad():
            for sl, keep in passes:
                memo.clear()
                state["in_search"] = keep
                adapter.run_block(working, hidden[sl].to(settings.dtype), block_kwargs)
    finally:
        for h in handles:
            h.remove()
    shared: dict[tuple[int, ...], torch.Tensor] = {}
    inputs = {}
    for name, chunks in search.items():
        key = tuple(id(c) for c in chunks)
        if key not in shared:
            shared[key] = torch.cat(chunks)
        inputs[name] = shared[key]
    return BlockFeatures(mean_abs={n: sums[n] / max(counted[n], 1) for n in names}, inputs=inputs, hessians=hessians)


# --- the search ---------------------------------------------------------------------------


def awq_scales(x_mean_abs: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Per-input-channel scale x^alpha (or x^alpha / w^(1 - alpha)), normalized around 1."""
    if w_mean is None:
        s = x_mean_abs.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean_abs.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalized by its group's max: the 'duo' weight statistic."""
    w = torch.cat(weights, dim=0).float()
    g = w.abs().reshape(w.shape[0], -1, group_size)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return g.reshape(w.shape).mean(0)


def _set_weight(module: nn.Module, name: str, weight: torch.Tensor) -> None:
    target = module.get_submodule(name).weight
    target.data.copy_(weight.to(target.dtype))


def search_group_scales(
    group: ScalingGroup,
    master: nn.Module,
    working: nn.Module,
    adapter: ArchAdapter,
    features: BlockFeatures,
    block_kwargs: dict,
    settings: AWQSettings,
) -> GroupSearch:
    """Grid-search alpha for one group; the loss is the inspected module's output MSE.

    Every candidate is built from the fp32 master weights, which are only read: the working
    (compute-dtype) copy is overwritten per candidate and restored from the masters at the end.
    """
    x = features.inputs[group.linears[0]]
    x_mean = features.mean_abs[group.linears[0]]
    originals = {name: master.get_submodule(name).weight.data for name in group.linears}
    w_mean = weight_mean_magnitude(list(originals.values()), settings.group_size) if settings.duo_scaling else None
    inspected = working.get_submodule(group.inspect)
    kwargs = block_kwargs if group.inspect_takes_block_kwargs else {}
    slices = list(_chunks(len(x), settings.batch_samples))

    with torch.no_grad():
        skip = settings.sink_tokens
        reference = [adapter.run_inspected(inspected, x[sl], kwargs)[:, skip:].float() for sl in slices]
        best: tuple[float, float, torch.Tensor] | None = None
        losses = []
        for step in range(settings.n_grid):
            alpha = step / settings.n_grid
            scales = awq_scales(x_mean, alpha, w_mean)
            for name, w in originals.items():
                _set_weight(working, name, fake_quantize(w * scales, settings.group_size, settings.bits) / scales)
            sq_err, count = 0.0, 0
            for sl, ref in zip(slices, reference):
                out = adapter.run_inspected(inspected, x[sl], kwargs)[:, skip:]
                sq_err += float((out.float() - ref).pow(2).sum())
                count += ref.numel()
            loss = sq_err / count
            losses.append(loss)
            if best is None or loss < best[0]:
                best = (loss, alpha, scales)
        for name, w in originals.items():
            _set_weight(working, name, w)
    return GroupSearch(group=group, alpha=best[1], scales=best[2], losses=losses)


def search_clip(w: torch.Tensor, x: torch.Tensor, settings: AWQSettings, rows_per_batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group clipping bounds (low, high), each [out, n_groups], minimizing group-wise output error.

    Candidates shrink the range by 1 - i / n_grid for shrinks up to max_shrink: 'symmetric'
    clips to [-m, m] with m = max|w| (AutoAWQ's), 'range' shrinks both ends of [min, max]
    (which suits an asymmetric grid: the symmetric bound only ever cuts the longer side).
    Each candidate is scored by the MSE of the group's partial dot products with x [tokens, in].
    """
    gs = settings.group_size
    out_features, in_features = w.shape
    n_groups = in_features // gs
    xg = x.float().reshape(-1, n_groups, gs).permute(1, 2, 0)  # [G, gs, T]
    best_low = torch.empty(n_groups, out_features, device=w.device)
    best_high = torch.empty(n_groups, out_features, device=w.device)
    steps = int(settings.max_shrink * settings.n_grid)
    for start in range(0, out_features, rows_per_batch):
        rows = slice(start, start + rows_per_batch)
        wg = w[rows].float().reshape(-1, n_groups, gs).permute(1, 0, 2)  # [G, o, gs]
        reference = torch.bmm(wg, xg)
        if settings.clip_style == "range":
            low0, high0 = wg.amin(dim=-1, keepdim=True).clamp(max=0), wg.amax(dim=-1, keepdim=True).clamp(min=0)
        else:
            high0 = wg.abs().amax(dim=-1, keepdim=True)
            low0 = -high0
        low, high = low0.clone(), high0.clone()
        min_err = torch.full(high0.shape, float("inf"), device=w.device)
        for i in range(steps):
            shrink = 1 - i / settings.n_grid
            clipped = torch.maximum(torch.minimum(wg, high0 * shrink), low0 * shrink)
            q = fake_quantize(clipped.reshape(-1, gs), gs, settings.bits).reshape(clipped.shape)
            err = (torch.bmm(q, xg) - reference).pow(2).mean(dim=-1, keepdim=True)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            low = torch.where(better, low0 * shrink, low)
            high = torch.where(better, high0 * shrink, high)
        best_low[:, rows] = low.squeeze(-1)
        best_high[:, rows] = high.squeeze(-1)
    return best_low.t().contiguous(), best_high.t().contiguous()


def apply_clip(w: torch.Tensor, low: torch.Tensor, high: torch.Tensor, group_size: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, group_size)
    return torch.maximum(torch.minimum(g, high[..., None].to(w.dtype)), low[..., None].to(w.dtype)).reshape(w.shape)


def _strided_tokens(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, len(flat) // n_tokens)
    return flat[::step][:n_tokens]


# --- one block --------------------------------------------------------------------------------


def quantize_block(
    block: nn.Module, adapter: ArchAdapter, hidden: torch.Tensor, block_kwargs: dict, settings: AWQSettings
) -> tuple[dict[str, QuantizedLinear], list[GroupSearch]]:
    """Search, fold, clip and quantize one block in place; returns its quantized linears.

    With `settings.sequential`, each linear is quantized as soon as no later scaling group
    still has to fold into it, and the features are collected again before the next group's
    search, so that (for Llama) the MLP's scales are searched on the outputs of the already
    quantized attention. Otherwise every search sees the full-precision block (AutoAWQ's order).
    """
    names = adapter.quantized_linears(block)
    order = {name: i for i, name in enumerate(names)}
    groups = adapter.scaling_groups(block)
    working = copy.deepcopy(block).to(settings.dtype)
    features = collect_features(working, adapter, names, hidden, block_kwargs, settings)
    searches: list[GroupSearch] = []
    input_scales: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedLinear] = {}
    for index, group in enumerate(groups):
        search = search_group_scales(group, block, working, adapter, features, block_kwargs, settings)
        searches.append(search)
        with torch.no_grad():
            adapter.fold_into_prev(block.get_submodule(group.prev), search.scales)
            for name in group.linears:
                block.get_submodule(name).weight.data.mul_(search.scales.view(1, -1))
                input_scales[name] = search.scales
                # Inputs of the scaled linears are now divided by the scales.
                features.inputs[name] = features.inputs[name] / search.scales.to(features.inputs[name].dtype)
                if name in features.hessians:  # x / s: H becomes H / (s s^T)
                    features.hessians[name] = features.hessians[name] / torch.outer(search.scales, search.scales)
        later = groups[index + 1 :]
        if not settings.sequential or not later:
            continue
        still_folded_into = {g.prev for g in later}
        later_linears = {n for g in later for n in g.linears}
        ready = [
            n for n in names
            if n not in quantized and n not in still_folded_into and n not in later_linears
            and order[n] < order[later[0].linears[0]]
        ]
        for name in ready:
            quantized[name] = _clip_and_finalize(block, adapter, name, features, input_scales.get(name), settings)
        working = copy.deepcopy(block).to(settings.dtype)
        pending = [n for n in names if n not in quantized]
        features = collect_features(working, adapter, pending, hidden, block_kwargs, settings)

    for name in names:
        if name not in quantized:
            quantized[name] = _clip_and_finalize(block, adapter, name, features, input_scales.get(name), settings)
    return {name: quantized[name] for name in names}, searches


def _clip_and_finalize(
    block: nn.Module, adapter: ArchAdapter, name: str, features: BlockFeatures, input_scales: torch.Tensor | None, settings: AWQSettings
) -> QuantizedLinear:
    linear = block.get_submodule(name)
    tokens = _strided_tokens(features.inputs[name][:, settings.sink_tokens :], settings.clip_tokens)
    unclipped = linear.weight.data.clone()
    if settings.clip and name not in adapter.no_clip:
        with torch.no_grad():
            low, high = search_clip(linear.weight.data, tokens, settings)
            linear.weight.data.copy_(apply_clip(linear.weight.data, low, high, settings.group_size))
    return _finalize_linear(linear, settings, unclipped, input_scales, tokens, features.hessians.get(name))


def _finalize_linear(
    linear: nn.Linear,
    settings: AWQSettings,
    reference: torch.Tensor,
    input_scales: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedLinear:
    """Quantize a linear's (scaled, clipped) weight, install its dequantized value, measure errors.

    `reference` is the weight before clipping; errors are measured against it, in the original
    weight space (input scales undone, since the preceding layer divides them out again).
    With a `hessian` the codes are GPTQ-rounded on the same grid, else rounded to nearest.
    """
    params = compute_qparams(linear.weight.data.float(), settings.group_size, settings.bits)
    if hessian is not None:
        q = gptq_quantize(linear.weight.data.float(), hessian, params, damp=settings.gptq_damp, act_order=settings.gptq_act_order)
    else:
        q = quantize(linear.weight.data.float(), params)
    w_q = dequantize(q, params)
    reference = reference.float()
    unscale = input_scales.view(1, -1) if input_scales is not None else 1.0
    output_err = None
    if tokens is not None:
        t = tokens.float()
        output_err = relative_error(t @ w_q.t(), t @ reference.t())
    linear.weight.data.copy_(w_q.to(linear.weight.dtype))
    return QuantizedLinear(
        q=q.to(torch.uint8),  # 1 byte a code until packing: int32 would hold 4x the memory
        params=params,
        bias=None if linear.bias is None else linear.bias.data.clone(),
        weight_rel_err=relative_error(w_q / unscale, reference / unscale),
        output_rel_err=output_err,
    )
