// quantkit's own CPU kernels: the operator schemas of torch.ops.quantkit_cpu.*, built together by
// kernels/cpu_ext.py. The implementations live in attention.cpp (paged_decode, rope_store),
// prefill.cpp (paged_prefill), linear.cpp (int4_pack, int4_linear, int4_dequantize, dense_gemv,
// int8_pack, int8_gemv), w4a8.cpp (w4a8_pack, w4a8_linear), elementwise.cpp (rms_norm, add_rms_norm,
// silu_and_mul, target_logprobs) and decoder.cpp (decode_layers, a decode step's layers calling the others).

#include <torch/library.h>

namespace {

// The linear kernels and the prefill attention are compiled only where the compiler targets
// AVX-512 BF16 (-march=native).
bool bf16_available() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

bool int8_available() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

// The W4A8 linear needs only AVX-512 BW and VNNI: it converts bf16 activations with integer
// shifts, so it runs on CPUs (Ice Lake, Cascade Lake) that have no AVX-512 BF16.
bool w4a8_available() {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(quantkit_cpu, m) {
  m.def("bf16_available() -> bool", bf16_available);
  m.def("int8_available() -> bool", int8_available);
  m.def("w4a8_available() -> bool", w4a8_available);
  m.def("int4_pack(Tensor codes) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()");
  m.def("int4_dequantize(Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()");
  m.def("dense_gemv(Tensor x, Tensor weight, Tensor(a!) out) -> ()");
  m.def("int8_pack(Tensor codes) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor codes, Tensor scales, Tensor(a!) out) -> ()");
  m.def("w4a8_pack(Tensor codes) -> Tensor");
  m.def("w4a8_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rope_store(Tensor(a!) qk, Tensor v, Tensor cos, Tensor signed_sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping, "
        "int num_heads) -> ()");
  m.def("silu_and_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("target_logprobs(Tensor logits, Tensor targets, Tensor(a!) logprobs, Tensor(b!) greedy) -> ()");
  m.def("paged_decode(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor rows, Tensor seqs, int block_size, float scale, int window, Tensor(a!) out) -> ()");
  m.def("paged_prefill(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor starts, Tensor q_lens, Tensor seqs, int block_size, float scale, int window, Tensor(a!) out) -> ()");
  m.def("decode_layers(Tensor(a!) x, Tensor[] norms, Tensor[] linears, int[] groups, int[] out_features, Tensor[] qk_norms, Tensor(b!)[] caches, Tensor cos, "
        "Tensor signed_sin, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor rows, Tensor seqs, int block_size, "
        "float scale, int[] windows, int num_heads, int head_dim, float eps, int gemv_max_rows) -> Tensor");
}
