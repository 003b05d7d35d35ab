"""Triton W4A16 GEMM that reads the AWQ 'GEMM' layout (quantkit/pack.py) directly.

y[M, N] = x[M, K] @ W.T with W.T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n], where
qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales fp16 [K/g, N].

Tiling. Program (pid_n, pid_m, pid_k) owns a BLOCK_M x BLOCK_N output tile and walks a slice
of K in BLOCK_K steps. Per step it loads x [BLOCK_M, BLOCK_K], the packed words
[BLOCK_K, BLOCK_N/8] (each word is read once), one zero-point row of BLOCK_N/8 words and one
scale row of BLOCK_N, unpacks the nibbles in registers, dequantizes in the activation dtype
(fp16/bf16, so tl.dot gets native MMA operands) and accumulates in fp32. BLOCK_K is
min(config BLOCK_K, g); both are powers of two, so BLOCK_K divides g (32, 64 or 128): a K-tile
never straddles a group and needs exactly one scale/zero row (k0 // g).

Two configurations, chosen by M (SMALL_M_MAX = 16):
* small M (decode, M <= 16): BLOCK_M = 16 (the tl.dot minimum) covers every row in one tile,
  so the weights are read once. With a single M tile the grid would only have N/BLOCK_N
  programs, far too few to saturate a GPU's memory bandwidth, so K is split: split_k programs
  each reduce a contiguous run of K-tiles.
* large M (prefill, M > 16): 64 x 128 tiles reuse each dequantized weight tile across 64 rows;
  M x N tiles already fill the GPU, so no split-K (split_k = 1, unless asked for).

Split-K combine: every split writes its fp32 partial tile to its own slice of a
[split_k, M, N] workspace and torch sums the slices (vLLM's AWQ Triton kernel does the same).
Unlike tl.atomic_add into a zeroed buffer, this is deterministic (fixed summation order), needs
no zero-fill and behaves identically in the interpreter and on a GPU. With split_k == 1 the
kernel stores straight into the output in x.dtype.

Interpreter. Triton's interpreter keeps bf16 as raw uint16 and applies integer arithmetic to
it, and its fp32 -> bf16 cast truncates instead of rounding to nearest even. So under
TRITON_INTERPRET=1 the bf16 path (constexpr EMULATE_BF16) works in fp32 on values rounded to
bf16 by hand, at exactly the points where the GPU rounds; fp16 and every GPU build use the
native path.

Nibble order. Word j of a row holds columns 8j..8j+7; the nibble at bits 4i..4i+3 holds column
8j + AWQ_ORDER[i], AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7). Unpacking needs the inverse map,
column c -> slot i, which is i = (c % 2) * 4 + c // 2 (even columns in slots 0-3, odd in 4-7);
the shift is 4 * i. The check below ties that formula to pack.AWQ_ORDER.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantkit.pack import AWQ_ORDER, PACK_FACTOR

if tuple(AWQ_ORDER.index(c) for c in range(PACK_FACTOR)) != tuple((c % 2) * 4 + c // 2 for c in range(PACK_FACTOR)):
    raise ImportError("kernels/triton_gemm.py: nibble shift formula does not invert quantkit.pack.AWQ_ORDER")

SUPPORTED_GROUP_SIZES = (32, 64, 128)
SMALL_M_MAX = 16  # M <= this uses the split-K decode configuration
_MAX_SPLIT_K = 8  # more splits only add workspace traffic for the few K-tiles typical layers have


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # upper bound; the launch uses min(block_k, group_size)
    num_warps: int
    num_stages: int


# Untuned starting points (no GPU was available); ptxas for sm_80 reports no spills and
# ~120 (small) / ~170 (large) registers per thread.
SMALL_M_CONFIG = GemmConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)
LARGE_M_CONFIG = GemmConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


@triton.jit
def _round_to_bf16(v):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32; the interpreter's own fp32->bf16
    cast truncates. Add half an ulp of bf16 (+1 if the kept lsb is odd), clear the low 16 bits."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _awq_gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, c_ptr,
    M, N, K, tiles_per_split,
    stride_xm, stride_xk, stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn,
    stride_cs, stride_cm, stride_cn,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    WORDS_N: tl.constexpr = BLOCK_N // 8

    # int64 rows: M * N of a large prefill through an LM head can pass 2**31 elements.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * WORDS_N + tl.arange(0, WORDS_N)  # packed word columns of this tile
    offs_kk = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_w = offs_w < N // 8  # N is a multiple of 8, so word and column masks agree
    # Shift of column c within its word: 4 * (inverse AWQ order), see the module docstring.
    col = tl.arange(0, 8)
    shifts = ((col % 2) * 4 + col // 2) * 4

    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    tile_start = pid_k * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_k_tiles)
    for tile in range(tile_start, tile_end):
        offs_k = tile * BLOCK_K + offs_kk
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        packed = tl.load(qw_ptr + offs_k[:, None] * stride_qwk + offs_w[None, :] * stride_qwn,
                         mask=mask_k[:, None] & mask_w[None, :], other=0)
        # [BLOCK_K, WORDS_N, 8] -> [BLOCK_K, BLOCK_N]: row-major reshape puts column 8j + c at
        # position 8j + c. The arithmetic shift smears the sign bit; & 0xF drops it.
        q = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))

        # BLOCK_K divides GROUP_SIZE, so the whole tile shares one scale/zero row.
        group = (tile * BLOCK_K) // GROUP_SIZE
        zwords = tl.load(qz_ptr + group * stride_qzg + offs_w * stride_qzn, mask=mask_w, other=0)
        z = tl.reshape((zwords[:, None] >> shifts[None, :]) & 0xF, (BLOCK_N,))
        s = tl.load(s_ptr + group * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)

        if EMULATE_BF16:
            # Interpreter only: fp32 math on bf16-exact values, rounded where the GPU rounds, is
            # bit-identical for the dequant and differs from a bf16 MMA only in summation order.
            s32 = _round_to_bf16(s.to(tl.float32))
            w32 = _round_to_bf16((q - z[None, :]).to(tl.float32) * s32[None, :])
            acc = tl.dot(x.to(tl.float32), w32, acc, input_precision="ieee")
        else:
            # (q - z) is an exact small integer; the scale multiply runs in the activation dtype.
            w = (q - z[None, :]).to(dtype) * s.to(dtype)[None, :]
            acc = tl.dot(x, w, acc)

    if EMULATE_BF16 and c_ptr.dtype.element_ty == tl.bfloat16:  # not for fp32 split-K partials
        acc = _round_to_bf16(acc)  # so the (truncating) interpreter cast below is exact
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _awq_dequantize_kernel(
    qw_ptr, qz_ptr, s_ptr, w_ptr, N, K,
    stride_qwk, stride_qwn, stride_qzg, stride_qzn, stride_sg, stride_sn, stride_wk, stride_wn,
    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """W.T [K, N] = (q - z) * s, the values the GEMM's tiles compute (same casts, same rounding)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    WORDS_N: tl.constexpr = BLOCK_N // 8
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_n * WORDS_N + tl.arange(0, WORDS_N)
    mask_k, mask_n, mask_w = offs_k < K, offs_n < N, offs_w < N // 8
    col = tl.arange(0, 8)
    shifts = ((col % 2) * 4 + col // 2) * 4
    packed = tl.load(qw_ptr + offs_k[:, None] * stride_qwk + offs_w[None, :] * stride_qwn, mask=mask_k[:, None] & mask_w[None, :], other=0)
    q = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
    group = offs_k // GROUP_SIZE  # per row: a tile may span groups
    zwords = tl.load(qz_ptr + group[:, None] * stride_qzg + offs_w[None, :] * stride_qzn, mask=mask_k[:, None] & mask_w[None, :], other=0)
    z = tl.reshape((zwords[:, :, None] >> shifts[None, None, :]) & 0xF, (BLOCK_K, BLOCK_N))
    s = tl.load(s_ptr + group[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    dtype = w_ptr.dtype.element_ty
    if EMULATE_BF16:  # interpreter: fp32 on bf16-exact values, rounded where the GPU rounds (see the GEMM)
        w = _round_to_bf16((q - z).to(tl.float32) * _round_to_bf16(s.to(tl.float32)))
    else:
        w = (q - z).to(dtype) * s.to(dtype)
    tl.store(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, w.to(dtype), mask=mask_k[:, None] & mask_n[None, :])


# Built by the interpreter (TRITON_INTERPRET=1 before triton was imported)? Then bf16 needs
# the emulated path; a compiled GPU kernel never takes it.
_INTERPRETED = type(_awq_gemm_kernel).__name__ == "InterpretedFunction"


def _workspace(split_k: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    """fp32 split-K partials; every element is written by the kernel (a seam for tests)."""
    return torch.empty((split_k, m, n), dtype=torch.float32, device=device)


def _check_inputs(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> int:
    """Validate shapes/dtypes/devices against the AWQ GEMM layout; return the group size."""
    if x.dim() != 2:
        raise ValueError(f"w4a16_gemm expects a 2-D x [M, K]; got shape {tuple(x.shape)} (flatten leading dims first)")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    for name, t, dtype in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32), ("scales", scales, torch.float16)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    k, (n_groups, n) = x.shape[1], scales.shape
    if n % 8 or n == 0:
        raise ValueError(f"out_features N = {n} (scales.shape[1]) must be a positive multiple of 8")
    if qweight.shape != (k, n // 8):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} does not match x K = {k} and N = {n}: expected {(k, n // 8)}")
    if n_groups == 0 or k % n_groups:
        raise ValueError(f"scales has {n_groups} group rows, which does not divide K = {k}")
    group_size = k // n_groups
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group size K / scales.shape[0] = {k} / {n_groups} = {group_size} is not one of {SUPPORTED_GROUP_SIZES}")
    if qzeros.shape != (n_groups, n // 8):
        raise ValueError(f"qzeros shape {tuple(qzeros.shape)} does not match scales: expected {(n_groups, n // 8)}")
    return group_size


def _default_split_k(x: torch.Tensor, grid_mn: int, num_k_tiles: int) -> int:
    """Enough splits to give every SM (or ~128 on CPU/unknown) about one program."""
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 128
    return max(1, min(_MAX_SPLIT_K, num_k_tiles, triton.cdiv(sms, grid_mn)))


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    *,
    split_k: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (fp16/bf16) @ AWQ-packed weight -> [M, N] in x.dtype.

    split_k: None picks a default (split-K only for M <= SMALL_M_MAX); an explicit value is
    honoured for either configuration, clamped to the number of K-tiles. out: optional
    [M, N] tensor of x.dtype on x.device to write into.
    """
    group_size = _check_inputs(x, qweight, qzeros, scales)
    m, k = x.shape
    n = scales.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a {(m, n)} {x.dtype} tensor on {x.device}; got {tuple(out.shape)} {out.dtype} on {out.device}")
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if m == 0:
        return out

    cfg = SMALL_M_CONFIG if m <= SMALL_M_MAX else LARGE_M_CONFIG
    block_k = min(cfg.block_k, group_size)
    num_k_tiles = triton.cdiv(k, block_k)
    grid_mn = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    if split_k is None:
        split_k = _default_split_k(x, grid_mn, num_k_tiles) if m <= SMALL_M_MAX else 1
    # Whole K-tiles per split; recompute the count so no split is empty.
    tiles_per_split = triton.cdiv(num_k_tiles, min(split_k, num_k_tiles))
    split_k = triton.cdiv(num_k_tiles, tiles_per_split)

    target = out if split_k == 1 else _workspace(split_k, m, n, x.device)
    stride_cs, stride_cm, stride_cn = (0, *out.stride()) if split_k == 1 else target.stride()
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split_k)
    _awq_gemm_kernel[grid](
        x, qweight, qzeros, scales, target,
        m, n, k, tiles_per_split,
        *x.stride(), *qweight.stride(), *qzeros.stride(), *scales.stride(),
        stride_cs, stride_cm, stride_cn,
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        EMULATE_BF16=_INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split_k > 1:
        out.copy_(target.sum(dim=0))  # fixed order: deterministic
    return out


DEQUANTIZE_BLOCK_K, DEQUANTIZE_BLOCK_N = 32, 128


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The AWQ-packed weight as W.T [K, N] in dtype (fp16/bf16): what x @ W.T multiplies, for the
    dequantize + dense matmul path of large batches (cuBLAS reuses the weight across many rows)."""
    x = torch.empty(0, qweight.shape[0], dtype=dtype, device=qweight.device)  # only to share the GEMM's checks
    group_size = _check_inputs(x, qweight, qzeros, scales)
    k, n = qweight.shape[0], scales.shape[1]
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(k, DEQUANTIZE_BLOCK_K), triton.cdiv(n, DEQUANTIZE_BLOCK_N))
    _awq_dequantize_kernel[grid](
        qweight, qzeros, scales, w, n, k, *qweight.stride(), *qzeros.stride(), *scales.stride(), *w.stride(),
        GROUP_SIZE=group_size, BLOCK_K=DEQUANTIZE_BLOCK_K, BLOCK_N=DEQUANTIZE_BLOCK_N,
        EMULATE_BF16=_INTERPRETED and dtype == torch.bfloat16,
    )
    return w
