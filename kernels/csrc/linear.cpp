// Linear layers: the int4 GEMM for AWQ weights, and a bf16 and an int8 GEMV for a few rows (the
// int8 one for an output head), registered as torch.ops.quantkit_cpu.*. All need AVX-512 BF16;
// without it they refuse with a message.
//
// int4_linear: y = x @ W for bf16 x and an AWQ int4 weight W[k][n] = (q - z) * s, with AVX-512
// BF16 dot products (vdpbf16ps: two bf16 products per fp32 lane). The codes q (0..15) become bf16
// exactly through a 16-entry table, so per group of g rows of k the kernel sums x . q in fp32 and
// adds s * (x . q) - s * z * sum(x): the weight is never rounded, only the output. Each group's
// codes are converted once into a small L1 buffer and reused by every row of x, which is what
// makes batched decode cheaper per row than PyTorch's fused int4 op (it re-reads per row).
// int4_dequantize writes the weight out once (bf16 or fp32) for long prefills, where a dense
// oneDNN matmul beats any int4 kernel.
//
// Packed codes (int4_pack): uint8 [N / 64, K / 4, 4, 32]. For output columns 64b .. 64b + 63
// (four chunks of 16) and rows 4t .. 4t + 3 of k, byte j of chunk c holds, for column
// 64b + 16c + j / 2, the code of row 4t + (j & 1) in its low nibble and of row 4t + 2 + (j & 1) in
// its high nibble: widened to 16 bits, the low nibbles are exactly vdpbf16ps's operand for the
// row pair (4t, 4t + 1), the high nibbles for (4t + 2, 4t + 3).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace quantkit_cpu {
namespace {

// ------------------------------------------------------------------------------------ int4

constexpr int64_t COLS = 64;  // output columns per block: 4 chunks of 16 fp32 lanes
constexpr int64_t CHUNKS = 4;
constexpr int64_t MAX_GROUP = 256;  // the largest group size (the widened codes of one group live on the stack)

// codes int32 [K, N] (0..15) -> the packed layout above; columns past N are padded with code 0
// (their zero points and scales are padded too, so they compute exact zeros and are not written).
at::Tensor int4_pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kInt, "int4_pack: codes must be int32 [K, N]");
  const int64_t K = codes.size(0), N = codes.size(1), blocks = (N + COLS - 1) / COLS;
  TORCH_CHECK(K % 4 == 0, "int4_pack: K must be a multiple of 4");
  auto out = at::empty({blocks, K / 4, CHUNKS, 32}, at::kByte);
  const auto c = codes.contiguous();
  const int32_t* src = c.data_ptr<int32_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < K / 4; ++t)
        for (int64_t ch = 0; ch < CHUNKS; ++ch)
          for (int64_t j = 0; j < 32; ++j) {
            const int64_t col = b * COLS + ch * 16 + j / 2, k = 4 * t + (j & 1);
            const uint8_t low = col < N ? uint8_t(src[k * N + col] & 15) : 0, high = col < N ? uint8_t(src[(k + 2) * N + col] & 15) : 0;
            dst[((b * (K / 4) + t) * CHUNKS + ch) * 32 + j] = uint8_t(low | (high << 4));
          }
  });
  return out;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool INT4_KERNEL = true;

inline __m512i code_table() {  // bf16 bit patterns of 0, 1, ..., 15
  return _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110,
                          0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000);
}

// Scale s and s * z of one group for one chunk of 16 columns (fp32, exact).
inline void group_constants(const c10::Half* scales, const uint8_t* zeros, __m512& s, __m512& sz) {
  s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
  const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zeros))));
  sz = _mm512_mul_ps(s, z);
}

// R rows of x against one group of converted codes: acc[r] += s * (x . q) - s * z * sum(x).
template <int R>
inline void group_rows(const c10::BFloat16* x, int64_t K, const __m512i* codes, int64_t g, const float* xsum, int64_t groups,
                       const __m512* s, const __m512* sz, float* acc) {
  __m512 dot[R][CHUNKS];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CHUNKS; ++c) dot[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < g / 2; ++p) {
    __m512bh w[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) w[c] = (__m512bh)codes[p * CHUNKS + c];
    for (int r = 0; r < R; ++r) {
      const __m512bh pair = broadcast_pair(x + r * K + 2 * p);
      for (int c = 0; c < CHUNKS; ++c) dot[r][c] = _mm512_dpbf16_ps(dot[r][c], pair, w[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 sum_x = _mm512_set1_ps(xsum[r * groups]);
    for (int c = 0; c < CHUNKS; ++c) {
      float* y = acc + r * COLS + c * 16;
      _mm512_storeu_ps(y, _mm512_fnmadd_ps(sz[c], sum_x, _mm512_fmadd_ps(s[c], dot[r][c], _mm512_loadu_ps(y))));
    }
  }
}

// Widen one group's packed codes to bf16 [g / 2 row pairs][4 chunks] (32 values each).
inline void convert_group(const uint8_t* packed, int64_t quads, __m512i* out) {
  const __m512i table = code_table(), low = _mm512_set1_epi16(0x0F);
  for (int64_t t = 0; t < quads; ++t)
    for (int64_t c = 0; c < CHUNKS; ++c) {
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + (t * CHUNKS + c) * 32)));
      out[(2 * t) * CHUNKS + c] = _mm512_permutexvar_epi16(_mm512_and_si512(w, low), table);
      out[(2 * t + 1) * CHUNKS + c] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
    }
}

// Sum of x over each group of g columns, per row: [rows, K / g] (the zero-point term's factor).
inline std::vector<float> group_sums(const c10::BFloat16* x, int64_t rows, int64_t K, int64_t g) {
  std::vector<float> row(K), sums(rows * (K / g));
  for (int64_t m = 0; m < rows; ++m) {
    to_floats(x + m * K, row.data(), K);
    for (int64_t gi = 0; gi < K / g; ++gi) {
      float sum = 0.f;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) sum += row[k];
      sums[m * (K / g) + gi] = sum;
    }
  }
  return sums;
}

// One row of x (batch-1 decode): codes widened in registers and used at once, no L1 buffer. The
// low- and high-nibble products accumulate separately so that eight dot-product chains are in flight.
void int4_gemv_impl(const c10::BFloat16* x, int64_t K, const uint8_t* wp, const c10::Half* sp, const uint8_t* zp, int64_t g, int64_t n_pad,
                    int64_t N, int64_t blocks, c10::BFloat16* yp) {
  const int64_t groups = K / g;
  const std::vector<float> xsum = group_sums(x, 1, K, g);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const __m512i table = code_table(), low = _mm512_set1_epi16(0x0F);
    for (int64_t b = b0; b < b1; ++b) {
      __m512 y[CHUNKS];
      for (int c = 0; c < CHUNKS; ++c) y[c] = _mm512_setzero_ps();
      const uint8_t* block = wp + b * (K / 4) * CHUNKS * 32;
      for (int64_t gi = 0; gi < groups; ++gi) {
        __m512 even[CHUNKS], odd[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) even[c] = odd[c] = _mm512_setzero_ps();
        for (int64_t t = gi * (g / 4); t < (gi + 1) * (g / 4); ++t) {
          const __m512bh x01 = broadcast_pair(x + 4 * t), x23 = broadcast_pair(x + 4 * t + 2);
          for (int c = 0; c < CHUNKS; ++c) {
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + (t * CHUNKS + c) * 32)));
            even[c] = _mm512_dpbf16_ps(even[c], x01, (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, low), table));
            odd[c] = _mm512_dpbf16_ps(odd[c], x23, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table));
          }
        }
        const __m512 sum_x = _mm512_set1_ps(xsum[gi]);
        for (int c = 0; c < CHUNKS; ++c) {
          __m512 s, sz;
          group_constants(sp + gi * n_pad + b * COLS + c * 16, zp + gi * n_pad + b * COLS + c * 16, s, sz);
          y[c] = _mm512_fnmadd_ps(sz, sum_x, _mm512_fmadd_ps(s, _mm512_add_ps(even[c], odd[c]), y[c]));
        }
      }
      float row[COLS];
      for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(row + c * 16, y[c]);
      const int64_t width = std::min(COLS, N - b * COLS);
      for (int64_t c = 0; c < width; ++c) yp[b * COLS + c] = c10::BFloat16(row[c]);
    }
  });
}

void int4_linear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t g,
                      at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), groups = K / g, blocks = packed.size(0), n_pad = scales.size(1);
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  if (M == 1) return int4_gemv_impl(xp, K, wp, sp, zp, g, n_pad, N, blocks, yp);
  const std::vector<float> xsum = group_sums(xp, M, K, g);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) __m512i codes[MAX_GROUP / 2 * CHUNKS];  // one group's widened codes (a std::vector would not be 64-byte aligned)
    std::vector<float> acc(M * COLS);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t gi = 0; gi < groups; ++gi) {
        convert_group(wp + (b * (K / 4) + gi * (g / 4)) * CHUNKS * 32, g / 4, codes);
        __m512 s[CHUNKS], sz[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) group_constants(sp + gi * n_pad + b * COLS + c * 16, zp + gi * n_pad + b * COLS + c * 16, s[c], sz[c]);
        const c10::BFloat16* xg = xp + gi * g;
        const float* xs = xsum.data() + gi;
        int64_t m = 0;
        for (; m + 6 <= M; m += 6) group_rows<6>(xg + m * K, K, codes, g, xs + m * groups, groups, s, sz, acc.data() + m * COLS);
        switch (M - m) {
          case 5: group_rows<5>(xg + m * K, K, codes, g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          case 4: group_rows<4>(xg + m * K, K, codes, g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          case 3: group_rows<3>(xg + m * K, K, codes, g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          case 2: group_rows<2>(xg + m * K, K, codes, g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          case 1: group_rows<1>(xg + m * K, K, codes, g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          default: break;
        }
      }
      const int64_t width = std::min(COLS, N - b * COLS);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < width; ++c) yp[m * N + b * COLS + c] = c10::BFloat16(acc[m * COLS + c]);
    }
  });
}

// W as a dense [K, N] matrix: (q - z) * s in fp32, rounded once to the output dtype.
template <typename T>
void int4_dequantize_impl(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t g, at::Tensor& w) {
  const int64_t K = w.size(0), N = w.size(1), blocks = packed.size(0), n_pad = scales.size(1);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  T* out = w.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) __m512i codes[MAX_GROUP / 2 * CHUNKS];  // one group's widened codes (a std::vector would not be 64-byte aligned)
    float row[CHUNKS * 16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t width = std::min(COLS, N - b * COLS);
      for (int64_t gi = 0; gi < K / g; ++gi) {
        convert_group(wp + (b * (K / 4) + gi * (g / 4)) * CHUNKS * 32, g / 4, codes);
        __m512 s[CHUNKS], sz[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) group_constants(sp + gi * n_pad + b * COLS + c * 16, zp + gi * n_pad + b * COLS + c * 16, s[c], sz[c]);
        for (int64_t p = 0; p < g / 2; ++p)
          for (int64_t parity = 0; parity < 2; ++parity) {
            for (int c = 0; c < CHUNKS; ++c) {
              // bf16 q of this row: every other 16-bit word of the pair vector, widened to fp32
              const __m512i words = _mm512_srli_epi32(_mm512_slli_epi32(codes[p * CHUNKS + c], 16 * (1 - parity)), 16);
              const __m512 q = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
              _mm512_storeu_ps(row + c * 16, _mm512_fmsub_ps(s[c], q, sz[c]));
            }
            T* dst = out + (gi * g + 2 * p + parity) * N + b * COLS;
            for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<T>(row[c]);
          }
      }
    }
  });
}
#else
constexpr bool INT4_KERNEL = false;
#endif

void check_int4(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t g, int64_t K, int64_t N) {
  TORCH_CHECK(INT4_KERNEL, "int4 kernels need AVX-512 BF16; this build has none (use the plain-torch path)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 4 && packed.size(1) * 4 == K,
              "int4: packed codes do not match K");
  TORCH_CHECK(g % 4 == 0 && g <= MAX_GROUP && K % g == 0, "int4: the group size must be a multiple of 4, at most 256, dividing K");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kByte && scales.is_contiguous() && zeros.is_contiguous() &&
                  scales.size(0) == K / g && zeros.sizes() == scales.sizes() && scales.size(1) == packed.size(0) * COLS && N <= scales.size(1),
              "int4: scales (fp16) and zeros (uint8) must be [K / g, padded N]");
}

void int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size,
                 at::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2, "int4_linear: x must be contiguous bf16 [M, K]");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == x.size(0),
              "int4_linear: out must be contiguous bf16 [M, N]");
  check_int4(packed, scales, zeros, group_size, x.size(1), out.size(1));
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  int4_linear_impl(x, packed, scales, zeros, group_size, out);
#endif
}

void int4_dequantize(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t group_size, at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2, "int4_dequantize: out must be contiguous [K, N]");
  check_int4(packed, scales, zeros, group_size, out.size(0), out.size(1));
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  switch (out.scalar_type()) {
    case at::kBFloat16: return int4_dequantize_impl<c10::BFloat16>(packed, scales, zeros, group_size, out);
    case at::kHalf: return int4_dequantize_impl<c10::Half>(packed, scales, zeros, group_size, out);
    case at::kFloat: return int4_dequantize_impl<float>(packed, scales, zeros, group_size, out);
    default: TORCH_CHECK(false, "int4_dequantize: out must be bf16, fp16 or fp32");
  }
#endif
}


// ------------------------------------------------------------------------------------ dense GEMV

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// y[m, n] = x[m, :] . W[n, :] for a few rows of bf16 x and a bf16 weight in its natural [N, K]
// layout (so a tied lm_head keeps sharing the embedding). Four weight rows at a time, each read
// once from memory for all rows of x; one horizontal sum per output.
template <int M>
void dense_gemv_rows(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t chunks = K / 32;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      __m512bh rows[4];
      for (int r = 0; r < 4; ++r) rows[r] = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + c * 32);
      for (int m = 0; m < M; ++m) {
        const __m512bh xs = (__m512bh)_mm512_loadu_si512(x + m * K + c * 32);
        for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xs, rows[r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) y[m * N + n + r] = c10::BFloat16(_mm512_reduce_add_ps(acc[m][r]));
  }
  for (; n < n1; ++n)
    for (int m = 0; m < M; ++m) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + m * K + c * 32), (__m512bh)_mm512_loadu_si512(w + n * K + c * 32));
      y[m * N + n] = c10::BFloat16(_mm512_reduce_add_ps(acc));
    }
}
#endif

void dense_gemv(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out) {
  TORCH_CHECK(INT4_KERNEL, "dense_gemv needs AVX-512 BF16; this build has none");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "dense_gemv: x, weight and out must be bf16");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && out.is_contiguous() && x.dim() == 2 && weight.dim() == 2,
              "dense_gemv: x [M, K], weight [N, K] and out [M, N] must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && out.size(0) == M && out.size(1) == N && K % 32 == 0 && M >= 1 && M <= 4,
              "dense_gemv: shapes must be x [M <= 4, K], weight [N, K], out [M, N], K a multiple of 32");
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = weight.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: return dense_gemv_rows<1>(xp, wp, yp, N, K, n0, n1);
      case 2: return dense_gemv_rows<2>(xp, wp, yp, N, K, n0, n1);
      case 3: return dense_gemv_rows<3>(xp, wp, yp, N, K, n0, n1);
      default: return dense_gemv_rows<4>(xp, wp, yp, N, K, n0, n1);
    }
  });
#endif
}

// ------------------------------------------------------------------------------------ int8 GEMV

// int8_gemv: y = x @ W.T for a few bf16 rows x [M, K] and a weight-only int8 matrix
// W[n][k] = q[n][k] * s[n][k / 32] (q int8, s fp16: GGUF's Q8_0), for an output head, which decode
// reads whole every step. It runs on VNNI integer dot products: converting int8 codes to bf16 or
// fp32 costs several instructions per 32 codes (the kernel became compute-bound at ~13 GB/s), while
// vpdpwssd multiplies sign-extended codes by 16-bit x directly. x is put on a 16-bit grid per row
// with the power-of-two step 2^(e - 15), amax < 2^e: entries within 2^7 of the row's largest keep
// all their bits and any entry moves by at most amax / 2^15; every product and group sum is then
// exact in int32, and each group's sum is scaled by s in fp32. A row of x holding NaN or inf gives
// a row of NaN, as a dense matmul would.
//
// Packed layout (int8_pack): codes int8 [N / 16, K / 2, 16, 2]: for output rows 16b .. 16b + 15 and
// inputs 2t, 2t + 1, lane j holds (q[16b + j][2t], q[16b + j][2t + 1]), which sign-extended to 16
// bits is exactly vpdpwssd's operand; scales fp16 [N / 16, K / 32, 16]. Rows past N are zero.
constexpr int64_t INT8_GROUP = 32;
constexpr int64_t INT8_LANES = 16;

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool INT8_KERNEL = true;

// One tile: M rows of x (16-bit pairs, int32 words) against RB blocks of 16 output rows.
template <int M, int RB>
inline void int8_tile(const int32_t* xpairs, const float* xstep, int64_t K, const int8_t* codes, const c10::Half* scales,
                      c10::BFloat16* y, int64_t N, int64_t n) {
  const int64_t groups = K / INT8_GROUP, block_codes = K * INT8_LANES, block_scales = groups * INT8_LANES;
  __m512 acc[M][RB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < RB; ++b) acc[m][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sums[M][RB];
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < RB; ++b) sums[m][b] = _mm512_setzero_si512();
    for (int64_t t = g * INT8_GROUP / 2; t < (g + 1) * INT8_GROUP / 2; ++t) {
      __m512i w[RB];
      for (int b = 0; b < RB; ++b)
        w[b] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + b * block_codes + t * 2 * INT8_LANES)));
      for (int m = 0; m < M; ++m) {
        const __m512i xs = _mm512_set1_epi32(xpairs[m * (K / 2) + t]);
        for (int b = 0; b < RB; ++b) sums[m][b] = _mm512_dpwssd_epi32(sums[m][b], w[b], xs);
      }
    }
    for (int b = 0; b < RB; ++b) {
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * block_scales + g * INT8_LANES)));
      for (int m = 0; m < M; ++m) acc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[m][b]), s, acc[m][b]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < RB; ++b) {
      const int64_t row = n + b * INT8_LANES, width = std::min<int64_t>(INT8_LANES, N - row);
      if (width <= 0) continue;
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[m][b], _mm512_set1_ps(xstep[m])));
      _mm256_mask_storeu_epi16(y + m * N + row, __mmask16((1u << width) - 1), out);
    }
}

template <int M, int RB>
void int8_blocks(const int32_t* xpairs, const float* xstep, int64_t K, const int8_t* codes, const c10::Half* scales, c10::BFloat16* y,
                 int64_t N, int64_t b0, int64_t b1) {
  const int64_t groups = K / INT8_GROUP;
  int64_t b = b0;
  for (; b + RB <= b1; b += RB)
    int8_tile<M, RB>(xpairs, xstep, K, codes + b * K * INT8_LANES, scales + b * groups * INT8_LANES, y, N, b * INT8_LANES);
  for (; b < b1; ++b) int8_tile<M, 1>(xpairs, xstep, K, codes + b * K * INT8_LANES, scales + b * groups * INT8_LANES, y, N, b * INT8_LANES);
}
#else
constexpr bool INT8_KERNEL = false;
#endif

// codes int8 [N, K] -> the packed layout above (rows padded with zeros to a multiple of 16).
at::Tensor int8_pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.size(1) % INT8_GROUP == 0,
              "int8_pack: codes must be int8 [N, K], K a multiple of 32");
  const int64_t N = codes.size(0), K = codes.size(1), blocks = (N + INT8_LANES - 1) / INT8_LANES;
  auto padded = at::zeros({blocks * INT8_LANES, K}, at::kChar);
  padded.narrow(0, 0, N).copy_(codes);
  return padded.view({blocks, INT8_LANES, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

void int8_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out) {
  TORCH_CHECK(INT8_KERNEL, "int8_gemv needs AVX-512 BF16 and VNNI; this build has none (use the dense head)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 && codes.scalar_type() == at::kChar &&
                  scales.scalar_type() == at::kHalf,
              "int8_gemv: x and out must be bf16, codes int8, scales fp16");
  TORCH_CHECK(x.is_contiguous() && codes.is_contiguous() && scales.is_contiguous() && out.is_contiguous() && x.dim() == 2 &&
                  codes.dim() == 4 && scales.dim() == 3,
              "int8_gemv: x [M, K], packed codes [N / 16, K / 2, 16, 2], scales [N / 16, K / 32, 16], out [M, N], all contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), blocks = codes.size(0);
  TORCH_CHECK(K % INT8_GROUP == 0 && codes.size(1) * 2 == K && codes.size(2) == INT8_LANES && codes.size(3) == 2 && scales.size(0) == blocks &&
                  scales.size(1) == K / INT8_GROUP && scales.size(2) == INT8_LANES && out.size(0) == M && M >= 1 &&
                  N <= blocks * INT8_LANES && N > (blocks - 1) * INT8_LANES,
              "int8_gemv: shapes do not match (K a multiple of 32, codes and scales from int8_pack of an [N, K] weight)");
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  // x on its 16-bit grid: step 2^e with amax / 2^e <= 32767; a zero row keeps step 1 (all zeros).
  std::vector<int16_t> xq(M * K);
  std::vector<float> step(M);
  std::vector<int64_t> non_finite_rows;
  const c10::BFloat16* xp = x.data_ptr<c10::BFloat16>();
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    bool finite = true;  // a NaN must not vanish into the grid (std::max would drop it)
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(to_float(xp[m * K + k]));
      finite = finite && std::isfinite(a);
      amax = std::max(amax, a);
    }
    if (!finite) {  // computed as zeros below, then overwritten with NaN
      non_finite_rows.push_back(m);
      amax = 0.f;
    }
    int e = 0;
    if (amax > 0.f) {
      std::frexp(amax, &e);  // amax < 2^e
      e -= 15;               // amax / 2^e < 2^15
    }
    step[m] = std::ldexp(1.f, e);
    for (int64_t k = 0; k < K; ++k) {
      const float v = amax > 0.f ? std::nearbyint(std::ldexp(to_float(xp[m * K + k]), -e)) : 0.f;
      xq[m * K + k] = int16_t(std::max(-32767.f, std::min(32767.f, v)));
    }
  }
  const int32_t* xpairs = reinterpret_cast<const int32_t*>(xq.data());
  const int8_t* cp = codes.data_ptr<int8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  c10::BFloat16* yp = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    // Blocks are walked in chunks whose codes stay in L2 while every tile of x passes over them.
    for (int64_t c0 = b0; c0 < b1; c0 += 64) {
      const int64_t c1 = std::min(b1, c0 + 64);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int32_t* xm = xpairs + m0 * (K / 2);
        const float* sm = step.data() + m0;
        c10::BFloat16* ym = yp + m0 * N;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: int8_blocks<1, 4>(xm, sm, K, cp, sp, ym, N, c0, c1); break;
          case 2: int8_blocks<2, 4>(xm, sm, K, cp, sp, ym, N, c0, c1); break;
          case 3: int8_blocks<3, 2>(xm, sm, K, cp, sp, ym, N, c0, c1); break;
          default: int8_blocks<4, 2>(xm, sm, K, cp, sp, ym, N, c0, c1); break;
        }
      }
    }
  });
  for (const int64_t m : non_finite_rows) out[m].fill_(std::numeric_limits<float>::quiet_NaN());
#endif
}

}  // namespace
}  // namespace quantkit_cpu

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) {
  m.impl("int4_pack", quantkit_cpu::int4_pack);
  m.impl("int4_linear", quantkit_cpu::int4_linear);
  m.impl("int4_dequantize", quantkit_cpu::int4_dequantize);
  m.impl("dense_gemv", quantkit_cpu::dense_gemv);
  m.impl("int8_pack", quantkit_cpu::int8_pack);
  m.impl("int8_gemv", quantkit_cpu::int8_gemv);
}
