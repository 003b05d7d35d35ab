"""Log-probability of one target token per row of logits: what scoring (lm-eval's loglikelihood) asks.

On CPU, quantkit's C++ kernel reads each row in its own dtype, in cache, twice (maximum and
argmax, then the sum of exponentials). The eager form upcasts the whole [rows, vocab] block to
fp32, log-softmaxes it into another block and gathers: with a 49k vocabulary that was a fifth of
an evaluation's time (kernels/csrc/elementwise.cpp).
"""

from __future__ import annotations

import torch

from . import cpu_ext


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, cpu_kernels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits[i])[targets[i]] in fp32, whether targets[i] is the first argmax of row i).

    logits [N, V] in any float dtype (computed in fp32), targets int64 [N]. cpu_kernels: the
    backend's choice (False: never the C++ kernel).
    """
    if cpu_kernels and cpu_ext.handles(logits) and logits.dim() == 2 and logits.stride(-1) == 1:
        targets = targets.to(torch.int64).contiguous()
        logprobs = torch.empty(targets.shape, dtype=torch.float32)
        greedy = torch.empty(targets.shape, dtype=torch.bool)
        cpu_ext.op("target_logprobs")(logits, targets, logprobs, greedy)
        return logprobs, greedy
    logits = logits.float()
    chosen = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return chosen - logits.logsumexp(-1), logits.argmax(-1) == targets
