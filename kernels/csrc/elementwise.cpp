// Row-wise ops of a decoder block, registered as torch.ops.quantkit_cpu.*: RMSNorm (optionally
// adding the residual first, in place, as vLLM's fused_add_rms_norm does) and a gated MLP's
// SiLU-and-mul, each in one pass.

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

}  // namespace
}  // namespace quantkit_cpu

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) {
  m.impl("rms_norm", quantkit_cpu::rms_norm);
  m.impl("add_rms_norm", quantkit_cpu::add_rms_norm);
  m.impl("silu_and_mul", quantkit_cpu::silu_and_mul);
}
