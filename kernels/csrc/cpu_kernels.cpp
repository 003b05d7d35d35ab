// quantkit's own CPU kernels, registered as torch.ops.quantkit_cpu.* (built by kernels/cpu_ext.py).
//
// paged_decode: one query token per sequence attending over the paged KV cache, read in place.
// The plain-torch path gathers K/V into a padded batch, converts it to fp32 and runs two batched
// matmuls: three full copies of the context per layer. Here each (sequence, KV head) task streams
// its cache rows once, for all the query heads that share that KV head (grouped-query attention).
// Cache layout (kernels/attention.py, allocate_kv_cache): head-major [Hkv, num_blocks * block_size, D];
// the slot of position p of a sequence is table[p / block_size] * block_size + p % block_size.
// Scores and the softmax are fp32, as in a flash kernel; the output is rounded once.
// A task's arithmetic depends only on its own sequence, so results are batch-invariant.
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
//
// rope_store: RoPE on q and k and the K/V cache write in one pass per token.
//
// silu_and_mul: a gated MLP's activation in one pass.
//
// rms_norm / add_rms_norm: RMSNorm of each row in one pass, optionally adding the residual first
// (in place, as vLLM's fused_add_rms_norm does).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp(x) for x <= 0 as 2^n * p(f), p a degree-6 fit of 2^f on [0, 1): relative error below 3e-7.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f;
  const float n = std::floor(t);
  const float f = t - n;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// The same polynomial on 16 lanes (lane for lane the scalar function's result).
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5353362e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif

// A row of T as fp32 (vectorized where the loop over a 16-bit struct type would not be).
template <typename T>
inline void to_floats(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

// fp32 -> T, rounding to nearest even.
template <typename T>
inline void from_floats(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(src + i));
  if constexpr (std::is_same_v<T, c10::Half>)
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Softmax numerators in place; returns their sum.
inline float exp_shifted(float* scores, int64_t len) {
  float top = -INFINITY;
  for (int64_t i = 0; i < len; ++i) top = scores[i] > top ? scores[i] : top;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(top);
  for (; i + 16 <= len; i += 16) _mm512_storeu_ps(scores + i, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(scores + i), shift)));
#endif
  for (; i < len; ++i) scores[i] = exp_nonpositive(scores[i] - top);
  float sum = 0.f;
  for (int64_t j = 0; j < len; ++j) sum += scores[j];
  return sum;
}

struct DecodeTask {
  int64_t first, last;      // positions first .. last - 1 are attended
  const int32_t* table;     // the sequence's block table
  int64_t block_size;
  int64_t groups;           // query heads per KV head
  float scale;
  int64_t slot(int64_t p) const { return int64_t(table[p / block_size]) * block_size + p % block_size; }
};

// Any head dim, any dtype: plain loops.
template <typename T>
void decode_generic(const T* q, const T* k_head, const T* v_head, T* out, int64_t D, const DecodeTask& t,
                    std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t len = t.last - t.first, G = t.groups;
  scores.resize(G * len);
  std::vector<float> qf(G * D);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(q[i]) * t.scale;
  for (int64_t p = t.first; p < t.last; ++p) {
    const T* k = k_head + t.slot(p) * D;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * to_float(k[d]);
      scores[g * len + p - t.first] = s;
    }
  }
  std::vector<float> sums(G);
  for (int64_t g = 0; g < G; ++g) sums[g] = exp_shifted(scores.data() + g * len, len);
  acc.assign(G * D, 0.f);
  for (int64_t p = t.first; p < t.last; ++p) {
    const T* v = v_head + t.slot(p) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float w = scores[g * len + p - t.first];
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += w * to_float(v[d]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g * D + d] / sums[g]);
}

#if defined(__AVX512F__)

// Calls fn(position, slot) for positions first .. last - 1, one block-table lookup per block.
template <typename Fn>
inline void for_each_slot(const DecodeTask& t, Fn&& fn) {
  for (int64_t p = t.first; p < t.last;) {
    const int64_t block = p / t.block_size, end = std::min(t.last, (block + 1) * t.block_size);
    const int64_t base = int64_t(t.table[block]) * t.block_size - block * t.block_size;
    for (; p < end; ++p) fn(p, base + p);
  }
}

// Calls fn(i, row) for the attended positions in order: i indexes the scores, row is the
// position's K (or V) row of this head, widened to fp32 in CHUNKS registers. While it reads a
// block it prefetches the same row of the sequence's next block: blocks lie anywhere in the
// cache, so the hardware prefetcher loses the stream at every block boundary.
template <int CHUNKS, typename T, typename Fn>
inline void for_each_row(const DecodeTask& t, const T* head, Fn&& fn) {
  constexpr int64_t ROW = CHUNKS * 16;
  const int64_t last_block = (t.last - 1) / t.block_size;
  for_each_slot(t, [&](int64_t p, int64_t slot) {
    const int64_t block = p / t.block_size;
    if (block < last_block) {
      const T* ahead = head + (int64_t(t.table[block + 1]) * t.block_size + p % t.block_size) * ROW;
      for (int64_t byte = 0; byte < ROW * int64_t(sizeof(T)); byte += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead) + byte, _MM_HINT_T0);
    }
    __m512 row[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) row[c] = load16(head + (slot * CHUNKS + c) * 16);
    fn(p - t.first, row);
  });
}

// Head dim = 16 * CHUNKS: a K or V row is CHUNKS registers, converted to fp32 once and used by
// every query head of the group. GROUPS > 0 (query heads per KV head known at compile time, and
// few): the output accumulates in registers; GROUPS == 0: any number, accumulated in L1.
template <typename T, int CHUNKS, int GROUPS>
void decode_avx512(const T* q, const T* k_head, const T* v_head, T* out, const DecodeTask& t,
                   std::vector<float>& scores, std::vector<float>& acc) {
  constexpr int64_t D = CHUNKS * 16;
  const int64_t len = t.last - t.first, G = GROUPS > 0 ? GROUPS : t.groups;
  scores.resize(G * len);
  std::vector<float> qf(G * D);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = to_float(q[i]) * t.scale;
  for_each_row<CHUNKS>(t, k_head, [&](int64_t i, const __m512* row) {
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf.data() + g * D;
      __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qg), row[0]);
      for (int c = 1; c < CHUNKS; ++c) dot = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16), row[c], dot);
      scores[g * len + i] = _mm512_reduce_add_ps(dot);
    }
  });
  std::vector<float> sums(G);
  for (int64_t g = 0; g < G; ++g) sums[g] = exp_shifted(scores.data() + g * len, len);
  if constexpr (GROUPS > 0) {
    __m512 a[GROUPS][CHUNKS];
    for (int g = 0; g < GROUPS; ++g)
      for (int c = 0; c < CHUNKS; ++c) a[g][c] = _mm512_setzero_ps();
    for_each_row<CHUNKS>(t, v_head, [&](int64_t i, const __m512* row) {
      for (int g = 0; g < GROUPS; ++g) {
        const __m512 w = _mm512_set1_ps(scores[g * len + i]);
        for (int c = 0; c < CHUNKS; ++c) a[g][c] = _mm512_fmadd_ps(w, row[c], a[g][c]);
      }
    });
    acc.resize(G * D);
    for (int g = 0; g < GROUPS; ++g)
      for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(acc.data() + g * D + c * 16, a[g][c]);
  } else {
    acc.assign(G * D, 0.f);
    for_each_row<CHUNKS>(t, v_head, [&](int64_t i, const __m512* row) {
      for (int64_t g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(scores[g * len + i]);
        float* a = acc.data() + g * D;
        for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(a + c * 16, _mm512_fmadd_ps(w, row[c], _mm512_loadu_ps(a + c * 16)));
      }
    });
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g * D + d] / sums[g]);
}

// Register accumulation while GROUPS * CHUNKS <= 16 (half the vector registers).
template <typename T, int CHUNKS>
void decode_avx512_dispatch(const T* q, const T* k_head, const T* v_head, T* out, const DecodeTask& t,
                            std::vector<float>& scores, std::vector<float>& acc) {
  switch (CHUNKS * t.groups <= 16 ? t.groups : 0) {
    case 1: return decode_avx512<T, CHUNKS, 1>(q, k_head, v_head, out, t, scores, acc);
    case 2: return decode_avx512<T, CHUNKS, 2>(q, k_head, v_head, out, t, scores, acc);
    case 3: return decode_avx512<T, CHUNKS, 3>(q, k_head, v_head, out, t, scores, acc);
    case 4: return decode_avx512<T, CHUNKS, 4>(q, k_head, v_head, out, t, scores, acc);
    default: return decode_avx512<T, CHUNKS, 0>(q, k_head, v_head, out, t, scores, acc);
  }
}
#endif

template <typename T>
void decode_one(const T* q, const T* k_head, const T* v_head, T* out, int64_t D, const DecodeTask& t,
                std::vector<float>& scores, std::vector<float>& acc) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    switch (D) {
      case 32: return decode_avx512_dispatch<T, 2>(q, k_head, v_head, out, t, scores, acc);
      case 64: return decode_avx512_dispatch<T, 4>(q, k_head, v_head, out, t, scores, acc);
      case 128: return decode_avx512_dispatch<T, 8>(q, k_head, v_head, out, t, scores, acc);
      case 256: return decode_avx512_dispatch<T, 16>(q, k_head, v_head, out, t, scores, acc);
      default: break;
    }
  }
#endif
  decode_generic(q, k_head, v_head, out, D, t, scores, acc);
}

// query/out [rows, H, D] (query rows may be strided: a view into the fused q/k projection); caches [Hkv, slots, D]; block_tables int32 [seqs, max_blocks];
// context_lens int32 [seqs]; rows/seqs int64 [n]: decode i reads query row rows[i] for sequence
// seqs[i] and writes out row rows[i]. window > 0: only the last `window` positions are seen.
void paged_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& rows,
                  const at::Tensor& seqs, int64_t block_size, double scale, int64_t window, at::Tensor& out) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "paged_decode: bad shapes");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2) && out.is_contiguous() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "paged_decode: caches and out must be contiguous, query rows of contiguous heads");
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type() && out.sizes() == query.sizes(),
              "paged_decode: query, cache and out must share one dtype and query/out one shape");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt && block_tables.is_contiguous(),
              "paged_decode: block_tables and context_lens must be contiguous int32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && seqs.scalar_type() == at::kLong && rows.numel() == seqs.numel(),
              "paged_decode: rows and seqs must be int64 of one length");
  const int64_t H = query.size(1), D = query.size(2), Hkv = k_cache.size(0), slots = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % Hkv == 0, "paged_decode: head dims differ or heads are not a multiple of KV heads");
  const int64_t n = rows.numel(), G = H / Hkv, max_blocks = block_tables.size(1), q_row = query.stride(0);
  const int64_t* row_of = rows.data_ptr<int64_t>();
  const int64_t* seq_of = seqs.data_ptr<int64_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* ctx = context_lens.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* kc = k_cache.data_ptr<scalar_t>();
    const scalar_t* vc = v_cache.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / Hkv, h = task % Hkv, s = seq_of[i], row = row_of[i];
        const int64_t len = ctx[s];
        const int64_t first = window > 0 && len > window ? len - window : 0;
        const DecodeTask t{first, len, tables + s * max_blocks, block_size, G, static_cast<float>(scale)};
        decode_one(q + row * q_row + h * G * D, kc + h * slots * D, vc + h * slots * D, o + (row * H + h * G) * D, D, t, scores, acc);
      }
    });
  });
}


// ------------------------------------------------------------------------------------ int4

constexpr int64_t COLS = 64;  // output columns per block: 4 chunks of 16 fp32 lanes
constexpr int64_t CHUNKS = 4;

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

inline __m512bh broadcast_pair(const c10::BFloat16* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof pair);
  return (__m512bh)_mm512_set1_epi32(pair);
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
    std::vector<__m512i> codes(g / 2 * CHUNKS);
    std::vector<float> acc(M * COLS);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t gi = 0; gi < groups; ++gi) {
        convert_group(wp + (b * (K / 4) + gi * (g / 4)) * CHUNKS * 32, g / 4, codes.data());
        __m512 s[CHUNKS], sz[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) group_constants(sp + gi * n_pad + b * COLS + c * 16, zp + gi * n_pad + b * COLS + c * 16, s[c], sz[c]);
        const c10::BFloat16* xg = xp + gi * g;
        const float* xs = xsum.data() + gi;
        int64_t m = 0;
        for (; m + 6 <= M; m += 6) group_rows<6>(xg + m * K, K, codes.data(), g, xs + m * groups, groups, s, sz, acc.data() + m * COLS);
        switch (M - m) {
          case 5: group_rows<5>(xg + m * K, K, codes.data(), g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          case 4: group_rows<4>(xg + m * K, K, codes.data(), g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          case 3: group_rows<3>(xg + m * K, K, codes.data(), g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          case 2: group_rows<2>(xg + m * K, K, codes.data(), g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
          case 1: group_rows<1>(xg + m * K, K, codes.data(), g, xs + m * groups, groups, s, sz, acc.data() + m * COLS); break;
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
    std::vector<__m512i> codes(g / 2 * CHUNKS);
    float row[CHUNKS * 16];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t width = std::min(COLS, N - b * COLS);
      for (int64_t gi = 0; gi < K / g; ++gi) {
        convert_group(wp + (b * (K / 4) + gi * (g / 4)) * CHUNKS * 32, g / 4, codes.data());
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
  TORCH_CHECK(g % 4 == 0 && K % g == 0, "int4: the group size must be a multiple of 4 dividing K");
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

bool int4_available() { return INT4_KERNEL; }

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

// ------------------------------------------------------------------------------------ RMSNorm

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, in fp32 and rounded once. With `residual`:
// residual[t] += x[t] first (rounded to the dtype, as a separate add would be) and the norm is of
// the sum, which is written back to residual; out may alias x. One pass per row instead of the
// ~6 ops (and a separate add) of the eager form: at batch-1 decode those were ~1 ms of a 10 ms step.
template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t hidden, float eps) {
  std::vector<float> w(hidden);
  to_floats(weight, w.data(), hidden);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / hidden), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(hidden), add(hidden);
    for (int64_t r = r0; r < r1; ++r) {
      to_floats(x + r * hidden, row.data(), hidden);
      if (residual != nullptr) {
        T* res = residual + r * hidden;
        to_floats(res, add.data(), hidden);
        for (int64_t i = 0; i < hidden; ++i) add[i] += row[i];
        from_floats(add.data(), res, hidden);  // the sum, rounded to T as a separate add would be
        to_floats(res, row.data(), hidden);
      }
      float sum = 0.f;
      for (int64_t i = 0; i < hidden; ++i) sum += row[i] * row[i];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      for (int64_t i = 0; i < hidden; ++i) row[i] = row[i] * inv * w[i];
      from_floats(row.data(), out + r * hidden, hidden);
    }
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && weight.is_contiguous(), "rms_norm: tensors must be contiguous");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0) && out.sizes() == x.sizes(), "rms_norm: shapes differ");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(), "rms_norm: dtypes differ");
  TORCH_CHECK(x.scalar_type() != at::kDouble, "rms_norm: float64 is not supported (it computes in fp32)");
}

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  check_norm(x, weight, out);
  const int64_t hidden = weight.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel() / hidden, hidden,
                            static_cast<float>(eps));
  });
}

void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm(x, weight, x);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x");
  const int64_t hidden = weight.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                            x.numel() / hidden, hidden, static_cast<float>(eps));
  });
}

// ------------------------------------------------------------------------------------ RoPE + KV store

// Rotates every q and k head of qk [T, H + Hkv, D] in place (transformers' x * cos +
// rotate_half(x) * sin, computed in fp32 and rounded once; signed_sin = [-sin, sin]), then writes
// the k heads and v [T, Hkv, D] into the head-major caches at slot_mapping[t] (-1: not written).
// Rows of qk and v may be strided: they are views into the fused q/k/v projection.
template <typename T>
void rope_store_impl(T* qk, int64_t qk_row, const T* v, int64_t v_row, const T* cos, const T* sin, T* k_cache, T* v_cache, const int64_t* slots,
                     int64_t tokens, int64_t heads, int64_t kv_heads, int64_t D, int64_t cache_slots) {
  const int64_t half = D / 2, all = heads + kv_heads;
  at::parallel_for(0, tokens, std::max<int64_t>(1, 65536 / (all * D)), [&](int64_t t0, int64_t t1) {
    std::vector<float> x(D), y(D), cf(D), sf(D);
    for (int64_t t = t0; t < t1; ++t) {
      to_floats(cos + t * D, cf.data(), D);
      to_floats(sin + t * D, sf.data(), D);
      for (int64_t h = 0; h < all; ++h) {
        T* row = qk + t * qk_row + h * D;
        to_floats(row, x.data(), D);
        for (int64_t d = 0; d < half; ++d) y[d] = x[d] * cf[d] + x[d + half] * sf[d];
        for (int64_t d = half; d < D; ++d) y[d] = x[d] * cf[d] + x[d - half] * sf[d];
        from_floats(y.data(), row, D);
      }
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::memcpy(k_cache + (h * cache_slots + slot) * D, qk + t * qk_row + (heads + h) * D, D * sizeof(T));
        std::memcpy(v_cache + (h * cache_slots + slot) * D, v + t * v_row + h * D, D * sizeof(T));
      }
    }
  });
}

void rope_store(at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& signed_sin, at::Tensor& k_cache,
                at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads) {
  TORCH_CHECK(qk.dim() == 3 && v.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "rope_store: bad shapes");
  const int64_t T = qk.size(0), D = qk.size(2), kv_heads = qk.size(1) - num_heads;
  TORCH_CHECK(kv_heads == k_cache.size(0) && v.size(0) == T && v.size(1) == kv_heads && v.size(2) == D && k_cache.size(2) == D && D % 2 == 0,
              "rope_store: qk must be [T, heads + kv_heads, D], v [T, kv_heads, D], caches [kv_heads, slots, D]");
  TORCH_CHECK(qk.stride(2) == 1 && qk.stride(1) == D && v.stride(2) == 1 && v.stride(1) == D && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "rope_store: heads must be contiguous rows");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.numel() == T * D && signed_sin.numel() == T * D,
              "rope_store: cos and signed_sin must be contiguous [T, D]");
  TORCH_CHECK(qk.scalar_type() == v.scalar_type() && cos.scalar_type() == qk.scalar_type() && signed_sin.scalar_type() == qk.scalar_type() &&
                  k_cache.scalar_type() == qk.scalar_type() && qk.scalar_type() != at::kDouble,
              "rope_store: one dtype for all tensors (bf16, fp16 or fp32)");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == T, "rope_store: slot_mapping int64 [T]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qk.scalar_type(), "rope_store", [&] {
    rope_store_impl<scalar_t>(qk.data_ptr<scalar_t>(), qk.stride(0), v.data_ptr<scalar_t>(), v.stride(0), cos.data_ptr<scalar_t>(),
                              signed_sin.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                              slot_mapping.data_ptr<int64_t>(), T, num_heads, kv_heads, D, k_cache.size(1));
  });
}

// ------------------------------------------------------------------------------------ SiLU-and-mul

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i]: a gated MLP's activation in one pass (eager
// torch runs silu and mul on strided halves, two passes and a temporary).
inline float silu(float x) {
  const float e = exp_nonpositive(-std::fabs(x));  // exp(-|x|) <= 1: no overflow on either side
  return x * (x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
}

template <typename T>
void silu_and_mul_impl(const T* gate_up, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / inter), [&](int64_t r0, int64_t r1) {
    std::vector<float> gate(inter), up(inter);
    for (int64_t r = r0; r < r1; ++r) {
      to_floats(gate_up + r * 2 * inter, gate.data(), inter);
      to_floats(gate_up + r * 2 * inter + inter, up.data(), inter);
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= inter; i += 16) {
        const __m512 x = _mm512_loadu_ps(gate.data() + i);
        const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
        const __m512 denominator = _mm512_add_ps(one, e);
        const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
        const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(positive, e, one), denominator);
        _mm512_storeu_ps(gate.data() + i, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid), _mm512_loadu_ps(up.data() + i)));
      }
#endif
      for (; i < inter; ++i) gate[i] = silu(gate[i]) * up[i];
      from_floats(gate.data(), out + r * inter, inter);
    }
  });
}

void silu_and_mul(const at::Tensor& gate_up, at::Tensor& out) {
  TORCH_CHECK(gate_up.is_contiguous() && out.is_contiguous() && gate_up.scalar_type() == out.scalar_type() && gate_up.scalar_type() != at::kDouble,
              "silu_and_mul: contiguous bf16, fp16 or fp32 tensors of one dtype");
  const int64_t inter = out.size(-1);
  TORCH_CHECK(gate_up.size(-1) == 2 * inter && gate_up.numel() == 2 * out.numel(), "silu_and_mul: gate_up must be [..., 2 * I], out [..., I]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), out.numel() / inter, inter);
  });
}

}  // namespace

TORCH_LIBRARY(quantkit_cpu, m) {
  m.def("int4_available() -> bool", int4_available);
  m.def("int4_pack(Tensor codes) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()");
  m.def("int4_dequantize(Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()");
  m.def("dense_gemv(Tensor x, Tensor weight, Tensor(a!) out) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rope_store(Tensor(a!) qk, Tensor v, Tensor cos, Tensor signed_sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping, "
        "int num_heads) -> ()");
  m.def("silu_and_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("paged_decode(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor rows, Tensor seqs, int block_size, float scale, int window, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) {
  m.impl("int4_pack", int4_pack);
  m.impl("int4_linear", int4_linear);
  m.impl("int4_dequantize", int4_dequantize);
  m.impl("dense_gemv", dense_gemv);
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("rope_store", rope_store);
  m.impl("silu_and_mul", silu_and_mul);
  m.impl("paged_decode", paged_decode);
}
