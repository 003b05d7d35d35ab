// Paged decode attention and the RoPE + KV-cache write, registered as torch.ops.quantkit_cpu.*.
//
// paged_decode: one query token per sequence attending over the paged KV cache, read in place.
// The plain-torch path gathers K/V into a padded batch, converts it to fp32 and runs two batched
// matmuls: three full copies of the context per layer. Here each (sequence, KV head) task streams
// its cache rows once, for all the query heads that share that KV head (grouped-query attention).
// Cache layout (kernels/attention.py, allocate_kv_cache): head-major [Hkv, num_blocks * block_size, D];
// the slot of position p of a sequence is table[p / block_size] * block_size + p % block_size.
// Scores and the softmax are fp32, as in a flash kernel; the output is rounded once. In bf16 (the
// runtime's CPU dtype) both passes run on vdpbf16ps straight from the cache rows: Q K^T 16 keys
// at a time with one transposing reduction, P V two keys at a time with P rounded to bf16; this
// and prefetching 64 keys ahead made batched decode ~1.3x faster on a cold cache (the plain fp32
// loops remain for fp32/fp16 and odd head dims).
// A task's arithmetic depends only on its own sequence, so results are batch-invariant.
//
// rope_store: RoPE on q and k and the K/V cache write in one pass per token.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace quantkit_cpu {
namespace {

// Softmax numerators in place; returns their sum.
inline float exp_shifted(float* scores, int64_t len) {
  float top = -INFINITY, sum = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  // 16 lanes at a time: a scalar max and sum would be one long dependent chain per head.
  __m512 top16 = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= len; i += 16) top16 = _mm512_max_ps(top16, _mm512_loadu_ps(scores + i));
  top = _mm512_reduce_max_ps(top16);
#endif
  for (; i < len; ++i) top = scores[i] > top ? scores[i] : top;
  i = 0;
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum16 = _mm512_setzero_ps();
  for (; i + 16 <= len; i += 16) {
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(scores + i), shift));
    _mm512_storeu_ps(scores + i, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  sum = _mm512_reduce_add_ps(sum16);
#endif
  for (; i < len; ++i) {
    scores[i] = exp_nonpositive(scores[i] - top);
    sum += scores[i];
  }
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
// block it prefetches the same row PREFETCH_BLOCKS blocks ahead: blocks lie anywhere in the
// cache, so the hardware prefetcher loses the stream at every block boundary.
constexpr int64_t PREFETCH_BLOCKS = 2;  // blocks ahead (1 and 4 measured no better)
template <int CHUNKS, typename T, typename Fn>
inline void for_each_row(const DecodeTask& t, const T* head, Fn&& fn) {
  constexpr int64_t ROW = CHUNKS * 16;
  const int64_t last_block = (t.last - 1) / t.block_size;
  for_each_slot(t, [&](int64_t p, int64_t slot) {
    const int64_t block = p / t.block_size;
    if (block + PREFETCH_BLOCKS <= last_block) {
      const T* ahead = head + (int64_t(t.table[block + PREFETCH_BLOCKS]) * t.block_size + p % t.block_size) * ROW;
      for (int64_t byte = 0; byte < ROW * int64_t(sizeof(T)); byte += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead) + byte, _MM_HINT_T0);
    }
    __m512 row[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) row[c] = load16(head + (slot * CHUNKS + c) * 16);
    fn(p - t.first, row);
  });
}

#if defined(__AVX512BF16__)
// The cache slot of every attended position, one block-table lookup per block: a 64-bit division
// per key (position / block_size) would cost more than the key's arithmetic.
inline const int64_t* task_slots(const DecodeTask& t) {
  thread_local std::vector<int64_t> slots;
  slots.resize(t.last - t.first);
  for_each_slot(t, [&](int64_t p, int64_t slot) { slots[p - t.first] = slot; });
  return slots.data();
}

constexpr int64_t AHEAD = 64;  // keys prefetched ahead of the one being read (32 and 128 measured no better)

// Prefetches the rows of keys [from, to) of one head.
template <int64_t D>
inline void prefetch_rows(const c10::BFloat16* head, const int64_t* slots, int64_t from, int64_t to) {
  for (int64_t i = from; i < to; ++i)
    for (int64_t byte = 0; byte < D * 2; byte += 64) _mm_prefetch(reinterpret_cast<const char*>(head + slots[i] * D) + byte, _MM_HINT_T0);
}

// Lane j of the result = the sum of all 16 lanes of v[j]: 16 dot products finished together in 45
// shuffles and adds, where a horizontal sum per vector would cost ~9 operations each.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: (v2i, v2i+1, v2i, v2i+1) partial sums
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit block: keys 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // blocks: (quads 2i, half sums), (quads 2i + 1, half sums)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88), _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88), _mm512_shuffle_f32x4(halves[0], halves[1], 0xDD));
}

// The K pass in bf16: scores[g][i] = scale * q_g . k_i, the products taken by vdpbf16ps straight
// from the bf16 cache rows (exact products, fp32 sums), 16 keys at a time.
template <int CHUNKS>
void bf16_scores(const c10::BFloat16* q, const c10::BFloat16* k_head, const DecodeTask& t, const int64_t* slots, int64_t G, float* scores) {
  constexpr int64_t D = CHUNKS * 16, WORDS = D / 32;  // a row is WORDS registers of 32 bf16
  const int64_t len = t.last - t.first;
  const c10::BFloat16* rows[16];
  const __m512 scale = _mm512_set1_ps(t.scale);
  for (int64_t i0 = 0; i0 < len; i0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - i0);
    // Blocks lie anywhere in the cache, so the hardware prefetcher loses the stream at each one.
    prefetch_rows<D>(k_head, slots, std::min(len, i0 == 0 ? 0 : i0 + AHEAD), std::min(len, i0 + 16 + AHEAD));
    for (int64_t j = 0; j < 16; ++j) rows[j] = j < n ? k_head + slots[i0 + j] * D : zero_row<D>;
    for (int64_t g = 0; g < G; ++g) {
      __m512bh qg[WORDS];
      for (int w = 0; w < WORDS; ++w) qg[w] = (__m512bh)_mm512_loadu_si512(q + g * D + w * 32);
      __m512 dot[16];
      for (int j = 0; j < 16; ++j) {
        dot[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qg[0], (__m512bh)_mm512_loadu_si512(rows[j]));
        for (int w = 1; w < WORDS; ++w) dot[j] = _mm512_dpbf16_ps(dot[j], qg[w], (__m512bh)_mm512_loadu_si512(rows[j] + w * 32));
      }
      const __m512 s = _mm512_mul_ps(sum_lanes16(dot), scale);
      _mm512_mask_storeu_ps(scores + g * len + i0, static_cast<__mmask16>((1u << n) - 1), s);
    }
  }
}

// The V pass in bf16 for GROUPS query heads: acc[g] = sum_i p[g][i] v_i, two keys per vdpbf16ps.
// Rows i, i + 1 are interleaved word by word (unpacklo/hi), so each fp32 lane sums p_i v_i[d] +
// p_i+1 v_i+1[d] for one dim d; the lanes come out in the unpack order, put back at the end. The
// probabilities are rounded to bf16 for the products (as flash kernels on GPUs do), sums stay fp32.
template <int CHUNKS, int GROUPS>
void bf16_values(const float* probs, const c10::BFloat16* v_head, const DecodeTask& t, const int64_t* slots, float* acc) {
  constexpr int64_t D = CHUNKS * 16, WORDS = D / 32;
  const int64_t len = t.last - t.first, padded = (len + 1) & ~int64_t(1);
  std::vector<uint16_t> pb(GROUPS * padded, 0);  // bf16 probabilities, an even count per head
  for (int g = 0; g < GROUPS; ++g) from_floats(probs + g * len, reinterpret_cast<c10::BFloat16*>(pb.data() + g * padded), len);
  __m512 a[GROUPS][2 * WORDS];
  for (int g = 0; g < GROUPS; ++g)
    for (int c = 0; c < 2 * WORDS; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 2) {
    const c10::BFloat16* r0 = v_head + slots[i] * D;
    const c10::BFloat16* r1 = i + 1 < len ? v_head + slots[i + 1] * D : zero_row<D>;
    prefetch_rows<D>(v_head, slots, std::min(len, i == 0 ? 0 : i + AHEAD), std::min(len, i + 2 + AHEAD));
    __m512bh pairs[2 * WORDS];
    for (int w = 0; w < WORDS; ++w) {
      const __m512i x0 = _mm512_loadu_si512(r0 + w * 32), x1 = _mm512_loadu_si512(r1 + w * 32);
      pairs[2 * w] = (__m512bh)_mm512_unpacklo_epi16(x0, x1);
      pairs[2 * w + 1] = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
    }
    for (int g = 0; g < GROUPS; ++g) {
      const __m512bh pp = broadcast_pair(reinterpret_cast<const c10::BFloat16*>(pb.data() + g * padded + i));
      for (int c = 0; c < 2 * WORDS; ++c) a[g][c] = _mm512_dpbf16_ps(a[g][c], pp, pairs[c]);
    }
  }
  // Lane l of the unpacklo (unpackhi) register of word w holds dim 32w + 8 (l / 4) + l % 4 (+ 4).
  for (int g = 0; g < GROUPS; ++g)
    for (int w = 0; w < WORDS; ++w) {
      alignas(64) float lanes[2][16];
      _mm512_store_ps(lanes[0], a[g][2 * w]);
      _mm512_store_ps(lanes[1], a[g][2 * w + 1]);
      for (int half = 0; half < 2; ++half)
        for (int l = 0; l < 16; ++l) acc[g * D + 32 * w + 8 * (l / 4) + 4 * half + l % 4] = lanes[half][l];
    }
}
#endif

// Head dim = 16 * CHUNKS: a K or V row is CHUNKS registers, converted to fp32 once and used by
// every query head of the group. GROUPS > 0 (query heads per KV head known at compile time, and
// few): the output accumulates in registers; GROUPS == 0: any number, accumulated in L1.
template <typename T, int CHUNKS, int GROUPS>
void decode_avx512(const T* q, const T* k_head, const T* v_head, T* out, const DecodeTask& t,
                   std::vector<float>& scores, std::vector<float>& acc) {
  constexpr int64_t D = CHUNKS * 16;
  const int64_t len = t.last - t.first, G = GROUPS > 0 ? GROUPS : t.groups;
  scores.resize(G * len);
#if defined(__AVX512BF16__)
  constexpr bool BF16_PASSES = std::is_same_v<T, c10::BFloat16> && CHUNKS % 2 == 0;
  const int64_t* slots = BF16_PASSES ? task_slots(t) : nullptr;  // both bf16 passes read them
  if constexpr (BF16_PASSES) {
    bf16_scores<CHUNKS>(q, k_head, t, slots, G, scores.data());
  } else
#endif
  {
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
  }
  std::vector<float> sums(G);
  for (int64_t g = 0; g < G; ++g) sums[g] = exp_shifted(scores.data() + g * len, len);
#if defined(__AVX512BF16__)
  if constexpr (GROUPS > 0 && BF16_PASSES) {
    acc.resize(G * D);
    bf16_values<CHUNKS, GROUPS>(scores.data(), v_head, t, slots, acc.data());
  } else
#endif
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

}  // namespace
}  // namespace quantkit_cpu

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) {
  m.impl("paged_decode", quantkit_cpu::paged_decode);
  m.impl("rope_store", quantkit_cpu::rope_store);
}
