"""Which activation dtype computes fastest on this CPU: dense bf16 / fp32 / fp16 matmuls and
PyTorch's fused int4 op with each, at M = 1, 4, 16, 256 rows, on the default model's fused q/k/v
shape (576 -> 1536, group 64). On a CPU with AVX-512 BF16, bf16 is the fast dense dtype; on an
AVX2-only CPU, bf16 matmuls are emulated and fp32 wins, while the fused int4 op stays fast only
with bf16. Random inputs; the weight fits in cache, so this compares compute paths, not bandwidth.

    python benchmarks/dtype_paths.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from common import seconds_per_call, write_results  # noqa: E402

N, K, GROUP = 1536, 576, 64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32), 2)
    rows = []
    print(f"{'M':>4} {'dtype':>5} {'dense ms':>9} {'GFLOP/s':>8} {'int4 op ms':>10}")
    for m in (1, 4, 16, 256):
        for name, dtype in DTYPES.items():
            x = torch.randn(m, K, generator=g).to(dtype)
            w = torch.randn(N, K, generator=g).to(dtype)
            scales_and_zeros = (torch.rand(K // GROUP, N, 2, generator=g) * 0.02).to(dtype)
            dense = seconds_per_call(lambda: torch.nn.functional.linear(x, w))
            int4 = seconds_per_call(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros))
            rows.append({"m": m, "dtype": name, "dense_s": dense, "dense_flops": 2 * m * N * K / dense, "int4_op_s": int4})
            print(f"{m:4d} {name:>5} {dense * 1e3:9.3f} {2 * m * N * K / dense / 1e9:8.1f} {int4 * 1e3:10.3f}")
    write_results(Path(__file__).parent / "results" / f"dtype_paths_{torch.backends.cpu.get_cpu_capability().lower()}.json",
                  {"shape": {"n": N, "k": K, "group": GROUP}, "rows": rows})


if __name__ == "__main__":
    main()
