// Paged prefill attention in bf16, registered as torch.ops.quantkit_cpu.paged_prefill.
//
// Several query tokens per sequence (a prompt, or a chunk of one after cached tokens) attend
// causally over the paged KV cache. PyTorch's CPU SDPA reaches 40-60 GFLOP/s here against
// ~440 for a bf16 matmul (measured on the build machine), and for a 2048-token window the
// attention costs more than all the linears. This is a flash-attention loop built on
// AVX-512 BF16's vdpbf16ps (pairs of bf16 products summed into fp32):
//   1. pack: each (sequence, KV head)'s keys into [chunk][D/2][32 keys][2] and values into
//      [key pair][D][2], the operand layouts of vdpbf16ps, once for all the query tiles that read them;
//   2. attend: one task per (sequence, KV head, tile of 16 query positions): the tile's query
//      heads of that KV head (grouped-query attention) are the rows; for each chunk of 32 keys,
//      S = Q K^T (fp32), online softmax (fp32 max, sum and rescale), O += P V with P rounded
//      to bf16 (as flash kernels on GPUs do); O / sum is rounded once at the end.
// Chunks of keys start at multiples of 32 positions whatever the tile, and keys a row may not
// see contribute exactly nothing, so each row's arithmetic is the same however a prompt is cut
// into chunks or batched: results are batch-invariant.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace quantkit_cpu {
namespace {

#if defined(__AVX512BF16__) && defined(__AVX512BW__)

constexpr int64_t KEYS = 32;       // keys per chunk: two registers of fp32 scores per row
constexpr int64_t POSITIONS = 16;  // query positions per task

struct Sequence {
  int64_t first_row;  // the sequence's first query row
  int64_t q_len;      // query tokens: positions ctx - q_len .. ctx - 1
  int64_t ctx;        // keys: positions 0 .. ctx - 1
  const int32_t* table;
  int64_t chunks() const { return (ctx + KEYS - 1) / KEYS; }
};

// Keys of one (sequence, KV head) as K^T chunks [chunk][D/2][KEYS][2] and values as [key pair][D][2]
// (bf16 pairs viewed as uint32), zero past the context so padding lanes are finite.
void pack_head(const Sequence& s, const uint16_t* k_head, const uint16_t* v_head, int64_t D, int64_t block_size,
               uint32_t* kt, uint32_t* vp) {
  const int64_t pairs = D / 2;
  for (int64_t c = 0; c < s.chunks(); ++c) {
    uint32_t* chunk = kt + c * pairs * KEYS;
    for (int64_t j = 0; j < KEYS; ++j) {
      const int64_t p = c * KEYS + j;
      if (p >= s.ctx) {
        for (int64_t dp = 0; dp < pairs; ++dp) chunk[dp * KEYS + j] = 0;
        continue;
      }
      const int64_t slot = int64_t(s.table[p / block_size]) * block_size + p % block_size;
      const uint32_t* row = reinterpret_cast<const uint32_t*>(k_head + slot * D);
      for (int64_t dp = 0; dp < pairs; ++dp) chunk[dp * KEYS + j] = row[dp];
    }
  }
  const int64_t padded = s.chunks() * KEYS;
  for (int64_t p = 0; p < padded; p += 2) {
    uint16_t* out = reinterpret_cast<uint16_t*>(vp + (p / 2) * D);
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t q = p + half;
      if (q >= s.ctx) {
        for (int64_t d = 0; d < D; ++d) out[2 * d + half] = 0;
        continue;
      }
      const int64_t slot = int64_t(s.table[q / block_size]) * block_size + q % block_size;
      const uint16_t* row = v_head + slot * D;
      for (int64_t d = 0; d < D; ++d) out[2 * d + half] = row[d];
    }
  }
}

// S[r][0..31] = Q[r] . K[chunk] for 8 rows at a time (16 accumulators).
template <int64_t D>
inline void scores8(const uint32_t* q, const uint32_t* kt, float* s) {
  constexpr int64_t PAIRS = D / 2;
  __m512 acc[8][2];
  for (int r = 0; r < 8; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < PAIRS; ++dp) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + dp * KEYS), k1 = (__m512bh)_mm512_loadu_si512(kt + dp * KEYS + 16);
    for (int r = 0; r < 8; ++r) {
      const __m512bh b = broadcast_pair(q[r * PAIRS + dp]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], b, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], b, k1);
    }
  }
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_ps(s + r * KEYS, acc[r][0]);
    _mm512_storeu_ps(s + r * KEYS + 16, acc[r][1]);
  }
}

// O[r] = O[r] * rescale[r] + P[r] V[chunk] for ROWS rows (ROWS * D / 16 accumulators).
template <int64_t D, int ROWS>
inline void accumulate(const uint32_t* p, const uint32_t* vp, const float* rescale, float* o) {
  constexpr int64_t OC = D / 16;
  __m512 acc[ROWS][OC];
  for (int r = 0; r < ROWS; ++r) {
    const __m512 c = _mm512_set1_ps(rescale[r]);
    for (int64_t oc = 0; oc < OC; ++oc) acc[r][oc] = _mm512_mul_ps(_mm512_loadu_ps(o + r * D + oc * 16), c);
  }
  for (int64_t kp = 0; kp < KEYS / 2; ++kp) {
    __m512bh v[OC];
    for (int64_t oc = 0; oc < OC; ++oc) v[oc] = (__m512bh)_mm512_loadu_si512(vp + kp * D + oc * 16);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh b = broadcast_pair(p[r * (KEYS / 2) + kp]);
      for (int64_t oc = 0; oc < OC; ++oc) acc[r][oc] = _mm512_dpbf16_ps(acc[r][oc], b, v[oc]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int64_t oc = 0; oc < OC; ++oc) _mm512_storeu_ps(o + r * D + oc * 16, acc[r][oc]);
}

struct Scratch {
  std::vector<uint32_t> q, p;       // the tile's queries and probabilities, bf16 pairs
  std::vector<float> s, o, m, l, c;  // scores, output accumulators, running max, sum, rescale
};

// One task: positions [tile0, tile0 + 16) of the sequence's query, the G query heads of one KV head.
template <int64_t D>
void attend_tile(const Sequence& s, int64_t tile0, const uint16_t* query, int64_t q_row, int64_t head0, int64_t G, const uint32_t* kt,
                 const uint32_t* vp, float scale, int64_t window, uint16_t* out, int64_t out_row, Scratch& w) {
  constexpr int64_t PAIRS = D / 2;
  constexpr int ROWS_PV = D <= 64 ? 4 : 2;
  const int64_t n_pos = std::min(POSITIONS, s.q_len - tile0), rows = POSITIONS * G;  // rows: 16 * G, a multiple of 8
  const int64_t pos0 = s.ctx - s.q_len + tile0;                                     // position of the tile's first query
  w.q.assign(rows * PAIRS, 0u);
  for (int64_t i = 0; i < n_pos; ++i)
    std::memcpy(w.q.data() + i * G * PAIRS, query + (s.first_row + tile0 + i) * q_row + head0 * D, G * D * sizeof(uint16_t));
  w.s.resize(rows * KEYS);
  w.p.resize(rows * KEYS / 2);
  w.o.assign(rows * D, 0.f);
  w.m.assign(rows, -INFINITY);
  w.l.assign(rows, 0.f);
  w.c.resize(rows);
  const int64_t last = pos0 + n_pos - 1;  // the tile's last position: no key after it is seen
  const int64_t first = window > 0 ? std::max<int64_t>(0, pos0 - window + 1) : 0;
  const __m512 scale16 = _mm512_set1_ps(scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t chunk = first / KEYS; chunk <= last / KEYS; ++chunk) {
    const int64_t key0 = chunk * KEYS;
    for (int64_t r = 0; r < rows; r += 8) scores8<D>(w.q.data() + r * PAIRS, kt + chunk * PAIRS * KEYS, w.s.data() + r * KEYS);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = pos0 + r / G;
      // Keys this row sees in the chunk: [lo, hi) relative to key0.
      const int64_t hi = std::min<int64_t>(KEYS, pos - key0 + 1);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1 - key0) : 0;
      uint32_t* prow = w.p.data() + r * KEYS / 2;
      if (r / G >= n_pos || hi <= lo) {  // a padding row, or nothing visible in this chunk
        w.c[r] = 1.f;
        std::memset(prow, 0, KEYS / 2 * sizeof(uint32_t));
        continue;
      }
      __mmask16 valid[2];
      for (int h = 0; h < 2; ++h) {
        const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * h));
        valid[h] = _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(lo))) &
                   _mm512_cmplt_epi32_mask(key, _mm512_set1_epi32(static_cast<int>(hi)));
      }
      const __m512 neg = _mm512_set1_ps(-INFINITY);
      const __m512 s0 = _mm512_mask_mul_ps(neg, valid[0], _mm512_loadu_ps(w.s.data() + r * KEYS), scale16);
      const __m512 s1 = _mm512_mask_mul_ps(neg, valid[1], _mm512_loadu_ps(w.s.data() + r * KEYS + 16), scale16);
      const float top = std::max(w.m[r], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
      w.c[r] = w.m[r] == -INFINITY ? 0.f : exp_nonpositive(w.m[r] - top);
      w.m[r] = top;
      const __m512 shift = _mm512_set1_ps(top);
      const __m512 p0 = _mm512_maskz_mov_ps(valid[0], exp_nonpositive16(_mm512_sub_ps(s0, shift)));
      const __m512 p1 = _mm512_maskz_mov_ps(valid[1], exp_nonpositive16(_mm512_sub_ps(s1, shift)));
      w.l[r] = w.l[r] * w.c[r] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
      _mm512_storeu_si512(prow, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    const uint32_t* vchunk = vp + chunk * (KEYS / 2) * D;
    for (int64_t r = 0; r < rows; r += ROWS_PV)
      accumulate<D, ROWS_PV>(w.p.data() + r * KEYS / 2, vchunk, w.c.data() + r, w.o.data() + r * D);
  }
  for (int64_t i = 0; i < n_pos; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      float* o = w.o.data() + r * D;
      const float inv = 1.f / w.l[r];
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      from_floats(o, reinterpret_cast<c10::BFloat16*>(out + (s.first_row + tile0 + i) * out_row + (head0 + g) * D), D);
    }
}

#endif  // __AVX512BF16__

// query/out [rows, H, D] bf16 (query rows may be strided); caches [Hkv, slots, D]; block_tables int32
// [seqs, max_blocks]; context_lens int32 [seqs]; starts/seqs int64 [n]: prefill i is the query
// rows starts[i] .. starts[i] + q_lens[i] - 1 of sequence seqs[i], the last q_lens[i] positions of its context.
void paged_prefill(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
                   const at::Tensor& context_lens, const at::Tensor& starts, const at::Tensor& q_lens, const at::Tensor& seqs,
                   int64_t block_size, double scale, int64_t window, at::Tensor& out) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "paged_prefill: bad shapes");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
                  out.scalar_type() == at::kBFloat16 && out.sizes() == query.sizes(),
              "paged_prefill: query, caches and out must be bf16, query and out of one shape");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2) && out.stride(2) == 1 && out.stride(1) == out.size(2) &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_prefill: caches must be contiguous, query and out rows of contiguous heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt && block_tables.is_contiguous(),
              "paged_prefill: block_tables and context_lens must be contiguous int32");
  TORCH_CHECK(starts.scalar_type() == at::kLong && q_lens.scalar_type() == at::kLong && seqs.scalar_type() == at::kLong &&
                  starts.numel() == seqs.numel() && q_lens.numel() == seqs.numel(),
              "paged_prefill: starts, q_lens and seqs must be int64 of one length");
  const int64_t H = query.size(1), D = query.size(2), Hkv = k_cache.size(0), slots = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && H % Hkv == 0, "paged_prefill: head dims differ or heads are not a multiple of KV heads");
  TORCH_CHECK(D == 64 || D == 128, "paged_prefill: head dim ", D, " is not supported (64 or 128)");
  const int64_t n = seqs.numel(), G = H / Hkv, max_blocks = block_tables.size(1);
  std::vector<Sequence> seq(n);
  std::vector<int64_t> packed_at(n + 1, 0);  // offsets of each sequence's packed K (and V) per KV head, in uint32
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = seqs.data_ptr<int64_t>()[i];
    seq[i] = {starts.data_ptr<int64_t>()[i], q_lens.data_ptr<int64_t>()[i], context_lens.data_ptr<int32_t>()[s], block_tables.data_ptr<int32_t>() + s * max_blocks};
    TORCH_CHECK(seq[i].q_len >= 1 && seq[i].q_len <= seq[i].ctx && seq[i].first_row + seq[i].q_len <= query.size(0),
                "paged_prefill: prefill ", i, " has query length ", seq[i].q_len, " for a context of ", seq[i].ctx);
    packed_at[i + 1] = packed_at[i] + seq[i].chunks() * KEYS * D / 2;
  }
  std::vector<uint32_t> kt(packed_at[n] * Hkv), vp(packed_at[n] * Hkv);
  const auto* kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  at::parallel_for(0, n * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / Hkv, h = task % Hkv, offset = packed_at[i] * Hkv + h * (packed_at[i + 1] - packed_at[i]);
      pack_head(seq[i], kc + h * slots * D, vc + h * slots * D, D, block_size, kt.data() + offset, vp.data() + offset);
    }
  });
  // Tasks: (sequence, first query position of the tile, KV head). A tile's cost grows with the keys
  // it reads, so tasks are dealt to threads longest first, each to the least loaded thread:
  // at::parallel_for alone would split them by count and leave one thread with all the long ones.
  struct Task { int64_t seq, tile0, head, cost; };
  std::vector<Task> tasks;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < seq[i].q_len; t += POSITIONS)
      for (int64_t h = 0; h < Hkv; ++h) tasks.push_back({i, t, h, seq[i].ctx - seq[i].q_len + t + POSITIONS});
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  std::vector<std::vector<Task>> share(threads);
  std::vector<int64_t> load(threads, 0);
  for (const Task& task : tasks) {
    const int64_t least = std::min_element(load.begin(), load.end()) - load.begin();
    share[least].push_back(task);
    load[least] += task.cost;
  }
  const auto* q = reinterpret_cast<const uint16_t*>(query.data_ptr<at::BFloat16>());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t t = begin; t < end; ++t)
      for (const Task& task : share[t]) {
        const Sequence& s = seq[task.seq];
        const int64_t offset = packed_at[task.seq] * Hkv + task.head * (packed_at[task.seq + 1] - packed_at[task.seq]);
        if (D == 64)
          attend_tile<64>(s, task.tile0, q, query.stride(0), task.head * G, G, kt.data() + offset, vp.data() + offset, float(scale), window, o,
                          out.stride(0), w);
        else
          attend_tile<128>(s, task.tile0, q, query.stride(0), task.head * G, G, kt.data() + offset, vp.data() + offset, float(scale), window, o,
                           out.stride(0), w);
      }
  });
#else
  TORCH_CHECK(false, "paged_prefill needs a CPU with AVX-512 BF16 (see bf16_available())");
#endif
}

}  // namespace
}  // namespace quantkit_cpu

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) { m.impl("paged_prefill", quantkit_cpu::paged_prefill); }
