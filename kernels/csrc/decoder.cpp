// decode_layers: every decoder layer of a Llama-family model for one decode step (one new token
// per sequence), as one C++ loop over the layers that calls quantkit's own kernels in the order
// the Python modules call them (runtime/models/llama.py, DecoderLayer):
//   add_rms_norm -> qkv linear -> rope_store -> paged_decode -> o linear -> add_rms_norm
//   -> gate_up linear -> silu_and_mul -> down linear,   and the final add_rms_norm.
// Why: a batch-1 decode step of SmolLM2-135M is ~270 kernel calls, and from Python each costs
// ~10 us of interpreter, module and argument boxing around a kernel that itself takes 2-30 us: a
// third of the step. Here each call goes through the dispatcher's typed (unboxed) path, well under
// a microsecond. Same kernels, same arguments, same order and thread count: the results are
// bit-identical to the module path (tested), which stays the path for everything else (prefill,
// mixed steps, other dtypes, GPUs).
//
// Each linear is 4 tensors of `linears` with its group size in `groups`: (codes, scales, zeros, bias)
// of quantkit's int4 layout for group > 0, (bf16 weight [N, K], -, -, bias) for a dense one (group
// 0), which takes dense_gemv up to gemv_max_rows rows and at::linear above, as kernels/linear.py's
// dense_linear does; an empty bias is none (a bias is added as the modules add it: Qwen2's q/k/v).
// A layer with a q/k norm (Qwen3) normalizes q and k over head_dim, then scales each head, before RoPE.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace quantkit_cpu {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using T = at::Tensor;
using Int4Linear = void(const T&, const T&, const T&, const T&, int64_t, T&);
using DenseGemv = void(const T&, const T&, T&);
using RmsNorm = void(const T&, const T&, double, T&);
using AddRmsNorm = void(T&, T&, const T&, double);
using RopeStore = void(T&, const T&, const T&, const T&, T&, T&, const T&, int64_t);
using SiluAndMul = void(const T&, T&);
using PagedDecode = void(const T&, const T&, const T&, const T&, const T&, const T&, const T&, int64_t, double, int64_t, T&);

struct Kernels {
  c10::TypedOperatorHandle<Int4Linear> int4_linear = find<Int4Linear>("quantkit_cpu::int4_linear");
  c10::TypedOperatorHandle<DenseGemv> dense_gemv = find<DenseGemv>("quantkit_cpu::dense_gemv");
  c10::TypedOperatorHandle<RmsNorm> rms_norm = find<RmsNorm>("quantkit_cpu::rms_norm");
  c10::TypedOperatorHandle<AddRmsNorm> add_rms_norm = find<AddRmsNorm>("quantkit_cpu::add_rms_norm");
  c10::TypedOperatorHandle<RopeStore> rope_store = find<RopeStore>("quantkit_cpu::rope_store");
  c10::TypedOperatorHandle<SiluAndMul> silu_and_mul = find<SiluAndMul>("quantkit_cpu::silu_and_mul");
  c10::TypedOperatorHandle<PagedDecode> paged_decode = find<PagedDecode>("quantkit_cpu::paged_decode");
};

const Kernels& kernels() {
  static const Kernels k;  // looked up once: the schemas are registered when the library loads
  return k;
}

// y = x @ W.T (+ bias) for linear i (4 tensors each in `linears`): quantkit's int4 kernel, or a dense weight.
at::Tensor linear(const Kernels& k, const at::Tensor& x, at::TensorList linears, at::IntArrayRef groups, at::IntArrayRef out_features,
                  int64_t i, int64_t gemv_max_rows) {
  const at::Tensor& w = linears[4 * i];
  const at::Tensor& bias = linears[4 * i + 3];
  const bool has_bias = bias.numel() > 0;
  if (groups[i] == 0 && !(x.size(0) <= gemv_max_rows && x.size(1) % 32 == 0))
    return has_bias ? at::linear(x, w, bias) : at::linear(x, w);
  at::Tensor y = at::empty({x.size(0), out_features[i]}, x.options());
  if (groups[i] > 0)
    k.int4_linear.call(x, w, linears[4 * i + 1], linears[4 * i + 2], groups[i], y);
  else
    k.dense_gemv.call(x, w, y);
  return has_bias ? y + bias : y;
}

// x: the step's embeddings [M, hidden] (bf16), overwritten (it becomes block 0's residual).
// norms: 2 per layer (input, post-attention), then the final norm. caches: K and V per layer
// ([Hkv, slots, D]). qk_norms: per layer, the q/k norm's weight [H + Hkv, D] or an empty tensor.
// windows: per layer, 0 for none. The rest is paged_decode's and rope_store's
// operands, shared by every layer. Returns the final hidden states [M, hidden], normed.
at::Tensor decode_layers(at::Tensor& x, at::TensorList norms, at::TensorList linears, at::IntArrayRef groups, at::IntArrayRef out_features,
                         at::TensorList qk_norms, at::TensorList caches, const at::Tensor& cos, const at::Tensor& signed_sin,
                         const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& rows, const at::Tensor& seqs,
                         int64_t block_size, double scale, at::IntArrayRef windows, int64_t num_heads, int64_t head_dim, double eps,
                         int64_t gemv_max_rows) {
  const int64_t L = static_cast<int64_t>(windows.size()), M = x.size(0);
  TORCH_CHECK(L > 0 && static_cast<int64_t>(norms.size()) == 2 * L + 1 && static_cast<int64_t>(linears.size()) == 16 * L &&
                  static_cast<int64_t>(groups.size()) == 4 * L && static_cast<int64_t>(out_features.size()) == 4 * L &&
                  static_cast<int64_t>(qk_norms.size()) == L && static_cast<int64_t>(caches.size()) == 2 * L,
              "decode_layers: per layer 2 norms, 4 linears of 4 tensors, 4 groups and widths, 1 q/k norm, 2 caches, 1 window; plus the final norm");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_layers: x must be contiguous [rows, hidden]");
  TORCH_CHECK(M == rows.numel(), "decode_layers: every row of x must decode (x has ", M, " rows, rows lists ", rows.numel(), ")");
  const Kernels& k = kernels();
  const int64_t H = num_heads, D = head_dim, Hkv = caches[0].size(0);
  for (int64_t l = 0; l < L; ++l)  // the splits below are views: a wrong width would split silently
    TORCH_CHECK(out_features[4 * l] == (H + 2 * Hkv) * D && out_features[4 * l + 2] % 2 == 0 && caches[2 * l].size(0) == Hkv &&
                    caches[2 * l].size(2) == D,
                "decode_layers: layer ", l, ": q/k/v width must be (heads + 2 kv heads) * head_dim, gate/up even, caches [kv heads, slots, head_dim]");
  at::Tensor h = at::empty_like(x), residual = x, hidden;
  k.rms_norm.call(x, norms[0], eps, h);  // block 0: no residual yet
  for (int64_t l = 0; l < L; ++l) {
    if (l > 0) {
      k.add_rms_norm.call(hidden, residual, norms[2 * l], eps);  // hidden becomes the normed input, residual the sum
      h = hidden;
    }
    at::Tensor kc = caches[2 * l], vc = caches[2 * l + 1];
    const at::Tensor qkv = linear(k, h, linears, groups, out_features, 4 * l, gemv_max_rows);  // [M, (H + 2 Hkv) D]
    at::Tensor qk = qkv.narrow(1, 0, (H + Hkv) * D).view({M, H + Hkv, D});
    if (qk_norms[l].numel() > 0) qk = at::rms_norm(qk, {D}, std::nullopt, eps) * qk_norms[l];  // as HeadRMSNorm computes it
    const at::Tensor v = qkv.narrow(1, (H + Hkv) * D, Hkv * D).view({M, Hkv, D});
    k.rope_store.call(qk, v, cos, signed_sin, kc, vc, slot_mapping, H);
    at::Tensor attn = at::empty({M, H, D}, x.options());
    k.paged_decode.call(qk.narrow(1, 0, H), kc, vc, block_tables, context_lens, rows, seqs, block_size, scale, windows[l], attn);
    at::Tensor o = linear(k, attn.view({M, H * D}), linears, groups, out_features, 4 * l + 1, gemv_max_rows);
    k.add_rms_norm.call(o, residual, norms[2 * l + 1], eps);
    const at::Tensor gate_up = linear(k, o, linears, groups, out_features, 4 * l + 2, gemv_max_rows);
    at::Tensor act = at::empty({M, gate_up.size(1) / 2}, x.options());
    k.silu_and_mul.call(gate_up, act);
    hidden = linear(k, act, linears, groups, out_features, 4 * l + 3, gemv_max_rows);
  }
  k.add_rms_norm.call(hidden, residual, norms[2 * L], eps);
  return hidden;
}

}  // namespace
}  // namespace quantkit_cpu

TORCH_LIBRARY_IMPL(quantkit_cpu, CPU, m) { m.impl("decode_layers", quantkit_cpu::decode_layers); }
