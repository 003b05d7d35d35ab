// Row-wise ops, registered as torch.ops.quantkit_cpu.*: a decoder block's RMSNorm (optionally
// adding the residual first, in place, as vLLM's fused_add_rms_norm does) and gated MLP's
// SiLU-and-mul, and the scorer's log-probability of one target token per row of logits, each in
// one pass.

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

// ------------------------------------------------------------------------------------ target log-probabilities

// For each row r of logits [N, V]: logprob[r] = logits[r, t] - max - log(sum(exp(logits[r] - max)))
// with t = targets[r], and greedy[r] = (t is the first index of the row's maximum, as argmax
// picks it). Scoring asks this of every continuation position; the eager form (upcast the whole
// [N, V] block to fp32, log_softmax it, gather, argmax) makes three passes over ~200 KB per row
// in memory, this makes two over the row while it sits in cache.
struct RowMax {
  float value;
  int64_t index;
};

template <typename T>
RowMax row_max(const T* row, int64_t vocab) {
  RowMax best{-INFINITY, 0};
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    if (vocab >= 16) {
      __m512 lane_max = load16(row);
      __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      __m512i index = lane_index;
      const __m512i step = _mm512_set1_epi32(16);
      for (i = 16; i + 16 <= vocab; i += 16) {
        index = _mm512_add_epi32(index, step);
        const __m512 x = load16(row + i);
        const __mmask16 greater = _mm512_cmp_ps_mask(x, lane_max, _CMP_GT_OQ);  // strictly: each lane keeps its first maximum
        lane_max = _mm512_mask_blend_ps(greater, lane_max, x);
        lane_index = _mm512_mask_blend_epi32(greater, lane_index, index);
      }
      alignas(64) float values[16];
      alignas(64) int32_t indices[16];
      _mm512_store_ps(values, lane_max);
      _mm512_store_si512(indices, lane_index);
      best = {values[0], indices[0]};
      for (int lane = 1; lane < 16; ++lane)
        if (values[lane] > best.value || (values[lane] == best.value && indices[lane] < best.index)) best = {values[lane], indices[lane]};
    }
  }
#endif
  for (; i < vocab; ++i) {
    const float x = to_float(row[i]);
    if (x > best.value) best = {x, i};
  }
  return best;
}

template <typename T>
float row_sum_exp(const T* row, int64_t vocab, float shift) {
  float sum = 0.f;
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    __m512 acc = _mm512_setzero_ps();
    const __m512 minus_shift = _mm512_set1_ps(-shift);
    for (; i + 16 <= vocab; i += 16) acc = _mm512_add_ps(acc, exp_nonpositive16(_mm512_add_ps(load16(row + i), minus_shift)));
    sum = _mm512_reduce_add_ps(acc);
  }
#endif
  for (; i < vocab; ++i) sum += exp_nonpositive(to_float(row[i]) - shift);
  return sum;
}

void target_logprobs(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& logprobs, at::Tensor& greedy) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "target_logprobs: logits must be [N, V] with contiguous rows");
  TORCH_CHECK(logits.scalar_type() != at::kDouble, "target_logprobs: float64 is not supported (it computes in fp32)");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "target_logprobs: empty vocabulary");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == rows && targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "target_logprobs: targets must be int64 [N]");
  TORCH_CHECK(logprobs.sizes() == targets.sizes() && logprobs.scalar_type() == at::kFloat && logprobs.is_contiguous(),
              "target_logprobs: logprobs must be float32 [N]");
  TORCH_CHECK(greedy.sizes() == targets.sizes() && greedy.scalar_type() == at::kBool && greedy.is_contiguous(),
              "target_logprobs: greedy must be bool [N]");
  const int64_t* target = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(target[r] >= 0 && target[r] < vocab, "target_logprobs: target ", target[r], " of row ", r, " is outside the vocabulary of ", vocab);
  float* logprob = logprobs.data_ptr<float>();
  bool* is_greedy = greedy.data_ptr<bool>();
  const int64_t row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "target_logprobs", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = base + r * row_stride;
        const RowMax best = row_max(row, vocab);
        logprob[r] = to_float(row[target[r]]) - best.value - std::log(row_sum_exp(row, vocab, best.value));
        is_greedy[r] = best.index == target[r];
      }
    });
  });
}

}  // namespace
}  // namespace quantkit_cpu

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) {
  m.impl("rms_norm", quantkit_cpu::rms_norm);
  m.impl("add_rms_norm", quantkit_cpu::add_rms_norm);
  m.impl("silu_and_mul", quantkit_cpu::silu_and_mul);
  m.impl("target_logprobs", quantkit_cpu::target_logprobs);
}
