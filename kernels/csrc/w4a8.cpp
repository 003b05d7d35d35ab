// W4A8: y = x @ W for AWQ int4 weights W[k][n] = (q - z) * s and activations quantized per row to
// int8, on AVX-512 VNNI integer dot products (torch.ops.quantkit_cpu.w4a8_pack, w4a8_linear).
//
// Why: on a CPU without AVX-512 BF16 a batched step has no bf16 dot product; it dequantizes the
// int4 weight and runs an fp32 matmul (32 multiply-adds per cycle and core at best, plus the
// dequantization on every call). vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and sums
// them four at a time into 16 int32 lanes: 64 multiply-adds per instruction, one per cycle, on the
// int4 codes as they are (0..15 are unsigned bytes after one mask), so nothing is dequantized.
//
// The arithmetic, per row m of x and output column n:
//   1. x[m, :] -> xq[m, :] = round(x * (127 / amax)) (int8, |xq| <= 127; amax = max |x[m, :]|) and
//      scale_m = amax / 127, in fp32 (round half to even; kernels/w4a8.py's reference repeats it).
//   2. per group of g inputs: acc = sum_k q[k, n] * xq[m, k] - z[n] * sum_k xq[m, k], exact in int32
//      (|acc| <= 15 * 127 * 256 < 2^19); the activation sums are formed once per row.
//   3. y[m, n] = scale_m * sum_g s[g, n] * acc_g, the group sum in fp32 (fma per group), rounded
//      once to x's dtype. So only the fp32 group scaling is inexact.
// Rows whose 127 / amax is not finite (amax = 0, or below ~3.7e-37) compute as zeros. A row holding
// NaN or inf gives a row of NaN (its scale is set to NaN, its codes to 0), as a dense matmul mostly
// would, and leaves the other rows alone.
//
// Packed codes (w4a8_pack): uint8 [N / 32 (rounded up), K / 8, 2, 64]. For output columns
// 32b .. 32b + 31 (two chunks of 16) and inputs 8p .. 8p + 7, byte 4j + i of chunk c holds, for
// column 32b + 16c + j, the code of input 8p + i in its low nibble and of 8p + 4 + i in its high
// nibble: masked (or shifted and masked), each 64-byte line is exactly vpdpbusd's unsigned operand
// for four consecutive inputs, lane j being column 16c + j. Columns past N hold code 0, and their
// scales and zero points are padded with 0 too: they compute exact zeros and are never written.
// 4 bits per code, like the AWQ checkpoint: the weight stays as small as the int4 kernel's.
//
// Work split: OpenMP threads take blocks of 32 columns, so each streams its slice of the weight
// from memory once for all rows; rows go in chunks of W4A8_ROW_CHUNK whose fp32 sums stay in L1,
// and within a chunk in register tiles of up to 6 rows (12 int32 accumulators).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace quantkit_cpu {
namespace {

constexpr int64_t W4A8_COLS = 32;  // output columns per block: 2 chunks of 16 int32 lanes (32, not 64: 576 columns split evenly over 2 threads)
constexpr int64_t W4A8_CHUNKS = 2;
constexpr int64_t W4A8_LINE = 64;        // bytes of one (input octet, chunk): 16 lanes x 4 inputs, two codes a byte
// Rows per register tile: 6 rows x 2 chunks = 12 int32 accumulators, and one broadcast load per two
// vpdpbusd. 12 rows (24 accumulators) would load less per instruction on paper, but GCC spilled
// them to the stack and ran at half the speed (160-180 against 290-350 GOP/s on one Ice Lake core;
// vpdpbusd's peak, 64 multiply-adds a cycle, is ~360 GOP/s at the nominal 2.8 GHz).
constexpr int64_t W4A8_TILE_ROWS = 6;
constexpr int64_t W4A8_ROW_CHUNK = 96;   // rows whose fp32 sums (12 KB) stay in L1 while a block's groups pass; a multiple of 6
constexpr int64_t W4A8_MAX_GROUP = 256;  // |sum of a group's xq| <= 127 * 256 fits the int16 operand of the zero-point term

// codes int32 [K, N] (0..15) -> the packed layout above.
at::Tensor w4a8_pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kInt, "w4a8_pack: codes must be int32 [K, N], got ", codes.scalar_type(), " ",
              codes.sizes());
  const int64_t K = codes.size(0), N = codes.size(1), blocks = (N + W4A8_COLS - 1) / W4A8_COLS;
  TORCH_CHECK(K % 8 == 0, "w4a8_pack: K must be a multiple of 8 (got ", K, ")");
  const auto c = codes.contiguous();
  TORCH_CHECK(c.numel() == 0 || (c.min().item<int32_t>() >= 0 && c.max().item<int32_t>() <= 15), "w4a8_pack: codes must lie in 0..15");
  auto out = at::empty({blocks, K / 8, W4A8_CHUNKS, W4A8_LINE}, at::kByte);
  const int32_t* src = c.data_ptr<int32_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t p = 0; p < K / 8; ++p)
        for (int64_t ch = 0; ch < W4A8_CHUNKS; ++ch) {
          uint8_t* line = dst + ((b * (K / 8) + p) * W4A8_CHUNKS + ch) * W4A8_LINE;
          for (int64_t j = 0; j < 16; ++j) {
            const int64_t col = b * W4A8_COLS + ch * 16 + j;
            for (int64_t i = 0; i < 4; ++i) {
              const uint32_t low = col < N ? uint32_t(src[(8 * p + i) * N + col]) : 0, high = col < N ? uint32_t(src[(8 * p + 4 + i) * N + col]) : 0;
              line[4 * j + i] = uint8_t(low | (high << 4));
            }
          }
        }
  });
  return out;
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool W4A8_KERNEL = true;

// Step 1 for rows m0 .. m1 of x [M, K]: int8 codes [M, K], per-group sums of the codes, the row's scale.
template <typename T>
void quantize_rows(const T* x, int64_t K, int64_t g, int64_t m0, int64_t m1, int8_t* xq, int32_t* sums, float* scale) {
  const int64_t groups = K / g;
  for (int64_t m = m0; m < m1; ++m) {
    const T* row = x + m * K;
    int8_t* q = xq + m * K;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;  // NaN or +-inf somewhere (max would drop a NaN)
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_abs_ps(load16(row + k));
      bad |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(FLT_MAX), _CMP_NLE_UQ);
      vmax = _mm512_max_ps(vmax, v);
    }
    const float amax = _mm512_reduce_max_ps(vmax), inv = 127.f / amax;
    if (bad || !std::isfinite(inv)) {  // NaN row, or a zero (or vanishingly small) row: codes 0
      std::memset(q, 0, K);
      std::fill(sums + m * groups, sums + (m + 1) * groups, 0);
      scale[m] = bad ? std::numeric_limits<float>::quiet_NaN() : 0.f;
      continue;
    }
    scale[m] = amax / 127.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t gi = 0; gi < groups; ++gi) {
      __m512i vsum = _mm512_setzero_si512();
      for (int64_t k = gi * g; k < (gi + 1) * g; k += 16) {
        // cvtps rounds half to even (the default MXCSR mode); |x * inv| <= 127 * (1 + 2^-23)^2
        // rounds to at most 127, so the saturating narrowing never clips.
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row + k), vinv));
        vsum = _mm512_add_epi32(vsum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
      }
      sums[m * groups + gi] = _mm512_reduce_add_epi32(vsum);
    }
  }
}

// R rows of xq against one group of one block: steps 2 and 3's group term, acc[r] += s * (q . xq - z * sum xq).
// xq: the tile's first row of int8 codes from this group's first input, as 32-bit words of 4 inputs
// (vpdpbusd's broadcast operand), row_words (K / 4) words from one row to the next.
template <int R>
inline void w4a8_tile(const uint8_t* lines, int64_t octets, const int32_t* xq, int64_t row_words, const int32_t* sums, int64_t groups,
                      const __m512i* z, const __m512* s, float* acc) {
  __m512i dot[R][W4A8_CHUNKS];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < W4A8_CHUNKS; ++c) dot[r][c] = _mm512_setzero_si512();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t p = 0; p < octets; ++p) {
    const __m512i raw0 = _mm512_loadu_si512(lines + (2 * p) * W4A8_LINE), raw1 = _mm512_loadu_si512(lines + (2 * p + 1) * W4A8_LINE);
    const __m512i lo0 = _mm512_and_si512(raw0, nibble), lo1 = _mm512_and_si512(raw1, nibble);  // inputs 8p .. 8p + 3
    for (int r = 0; r < R; ++r) {
      const __m512i xs = _mm512_set1_epi32(xq[r * row_words + 2 * p]);
      dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], lo0, xs);
      dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], lo1, xs);
    }
    const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(raw0, 4), nibble), hi1 = _mm512_and_si512(_mm512_srli_epi16(raw1, 4), nibble);  // 8p + 4 .. 8p + 7
    for (int r = 0; r < R; ++r) {
      const __m512i xs = _mm512_set1_epi32(xq[r * row_words + 2 * p + 1]);
      dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], hi0, xs);
      dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], hi1, xs);
    }
  }
  for (int r = 0; r < R; ++r) {
    // - z * sum xq in one vpdpwssd: z (int16 in each lane's low half, 0 above) times -sum (int16):
    // exact, and one instruction where vpmulld takes two.
    const __m512i neg_sum = _mm512_set1_epi32(int32_t(uint16_t(int16_t(-sums[r * groups]))));
    for (int c = 0; c < W4A8_CHUNKS; ++c) {
      const __m512i exact = _mm512_dpwssd_epi32(dot[r][c], z[c], neg_sum);
      float* y = acc + r * W4A8_COLS + c * 16;
      _mm512_storeu_ps(y, _mm512_fmadd_ps(s[c], _mm512_cvtepi32_ps(exact), _mm512_loadu_ps(y)));
    }
  }
}

// fp32 -> bf16 rounding to nearest even, NaN to the quiet NaN 0x7FC0: c10::BFloat16's rounding, on
// 16 lanes with integer ops (no AVX-512 BF16 needed).
inline void store_bf16(c10::BFloat16* dst, __m512 v, __mmask16 mask) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm512_mask_cvtepi32_storeu_epi16(dst, mask, rounded);
}

inline void store_row(float* dst, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(dst, mask, v); }
inline void store_row(c10::BFloat16* dst, __m512 v, __mmask16 mask) { store_bf16(dst, v, mask); }

template <typename T>
void w4a8_linear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t g,
                      at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), groups = K / g, blocks = packed.size(0), n_pad = scales.size(1);
  if (M == 0 || N == 0) return;
  const T* xp = x.data_ptr<T>();
  // int32 storage: the tiles read the int8 codes four at a time as aligned 32-bit words. Row-major:
  // transposed to [K / 4, M], every 4-byte store went to its own cache line and quantizing 256 rows
  // cost 2.5x as much.
  const int64_t row_words = K / 4;
  std::vector<int32_t> xq_words(M * row_words);
  std::vector<int32_t> sums(M * groups);
  std::vector<float> row_scale(M);
  // On threads only from 64K entries on: with OMP_WAIT_POLICY=PASSIVE each parallel region wakes the
  // pool (tens of microseconds), which at a few rows cost more than the quantization itself.
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
    quantize_rows(xp, K, g, m0, m1, reinterpret_cast<int8_t*>(xq_words.data()), sums.data(), row_scale.data());
  });

  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  T* yp = out.data_ptr<T>();
  const int64_t octets = g / 8;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float acc[W4A8_ROW_CHUNK * W4A8_COLS];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* block = wp + b * (K / 8) * W4A8_CHUNKS * W4A8_LINE;
      const int64_t width = std::min(W4A8_COLS, N - b * W4A8_COLS);
      for (int64_t m0 = 0; m0 < M; m0 += W4A8_ROW_CHUNK) {
        const int64_t rows = std::min(W4A8_ROW_CHUNK, M - m0);
        std::fill(acc, acc + rows * W4A8_COLS, 0.f);
        for (int64_t gi = 0; gi < groups; ++gi) {
          __m512 s[W4A8_CHUNKS];
          __m512i z[W4A8_CHUNKS];
          for (int c = 0; c < W4A8_CHUNKS; ++c) {
            const int64_t at = gi * n_pad + b * W4A8_COLS + c * 16;
            s[c] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + at)));
            z[c] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + at)));
          }
          const uint8_t* lines = block + gi * octets * W4A8_CHUNKS * W4A8_LINE;
          const int32_t* xg = xq_words.data() + m0 * row_words + gi * (g / 4);
          const int32_t* sg = sums.data() + m0 * groups + gi;
          int64_t r = 0;
          for (; r + W4A8_TILE_ROWS <= rows; r += W4A8_TILE_ROWS)
            w4a8_tile<W4A8_TILE_ROWS>(lines, octets, xg + r * row_words, row_words, sg + r * groups, groups, z, s, acc + r * W4A8_COLS);
          const int32_t* xr = xg + r * row_words;
          const int32_t* sr = sg + r * groups;
          float* ar = acc + r * W4A8_COLS;
          switch (rows - r) {
            case 5: w4a8_tile<5>(lines, octets, xr, row_words, sr, groups, z, s, ar); break;
            case 4: w4a8_tile<4>(lines, octets, xr, row_words, sr, groups, z, s, ar); break;
            case 3: w4a8_tile<3>(lines, octets, xr, row_words, sr, groups, z, s, ar); break;
            case 2: w4a8_tile<2>(lines, octets, xr, row_words, sr, groups, z, s, ar); break;
            case 1: w4a8_tile<1>(lines, octets, xr, row_words, sr, groups, z, s, ar); break;
            default: break;
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const __m512 sm = _mm512_set1_ps(row_scale[m0 + r]);
          for (int c = 0; c < W4A8_CHUNKS; ++c) {
            const int64_t lanes = std::max<int64_t>(0, std::min<int64_t>(16, width - c * 16));
            if (lanes == 0) break;
            const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(acc + r * W4A8_COLS + c * 16), sm);
            store_row(yp + (m0 + r) * N + b * W4A8_COLS + c * 16, v, __mmask16((1u << lanes) - 1));
          }
        }
      }
    }
  });
}
#else
constexpr bool W4A8_KERNEL = false;
#endif

void w4a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size,
                 at::Tensor& out) {
  TORCH_CHECK(W4A8_KERNEL, "w4a8_linear needs AVX-512 BW and VNNI; this build has none (use the dequantize + matmul path)");
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.is_contiguous() && x.dim() == 2,
              "w4a8_linear: x must be contiguous bf16 or fp32 [M, K], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0),
              "w4a8_linear: out must be contiguous [M, N] in x's dtype (", x.scalar_type(), ", M = ", x.size(0), "), got ", out.scalar_type(), " ",
              out.sizes());
  const int64_t K = x.size(1), N = out.size(1), g = group_size;
  TORCH_CHECK(g >= 16 && g % 16 == 0 && g <= W4A8_MAX_GROUP && K % g == 0,
              "w4a8_linear: the group size must be a multiple of 16, at most 256, dividing K (K = ", K, ", group size ", g, ")");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 4 && packed.size(1) * 8 == K &&
                  packed.size(2) == W4A8_CHUNKS && packed.size(3) == W4A8_LINE,
              "w4a8_linear: packed codes must be w4a8_pack's uint8 [N / 32, K / 8, 2, 64] for K = ", K, ", got ", packed.scalar_type(), " ",
              packed.sizes());
  const int64_t n_pad = packed.size(0) * W4A8_COLS;
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kByte && scales.is_contiguous() && zeros.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == K / g && scales.size(1) == n_pad && zeros.sizes() == scales.sizes(),
              "w4a8_linear: scales (fp16) and zeros (uint8) must be [K / g, N padded to 32] = [", K / g, ", ", n_pad, "], got ",
              scales.scalar_type(), " ", scales.sizes(), " and ", zeros.scalar_type(), " ", zeros.sizes());
  TORCH_CHECK(N <= n_pad && N > n_pad - W4A8_COLS, "w4a8_linear: out has ", N, " columns but the packed weight has ", n_pad,
              " (padded to 32)");
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  if (x.scalar_type() == at::kFloat) return w4a8_linear_impl<float>(x, packed, scales, zeros, g, out);
  return w4a8_linear_impl<c10::BFloat16>(x, packed, scales, zeros, g, out);
#endif
}

}  // namespace
}  // namespace quantkit_cpu

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) {
  m.impl("w4a8_pack", quantkit_cpu::w4a8_pack);
  m.impl("w4a8_linear", quantkit_cpu::w4a8_linear);
}
