"""Cross entropy and its gradient over one chunk of logits, in place (for the fused linear +
cross-entropy loss in ``sessa_pt.models.lm``).

``cross_entropy_grad_(logits, labels, weights)`` returns ``sum_i weights_i CE_i`` (float32) and
overwrites ``logits`` (N, V) with ``weights_i (softmax(logits_i) - onehot(labels_i))``, the
gradient of that sum. Rows whose label is -100 (PyTorch's ignore_index) count zero. The GPU
path is one Triton kernel per row (two sweeps over the vocabulary: online max/sum-exp in fp32,
then the gradient), so a chunk's logits are read twice and written once and never copied to
fp32; the CPU path is plain PyTorch with the same results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sessa_kernels.precision import accumulation_dtype

IGNORE_INDEX = -100


def _cross_entropy_grad_torch(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    acc = accumulation_dtype(logits)
    lf = logits.to(acc)
    keep = labels != IGNORE_INDEX
    safe = torch.where(keep, labels, 0)
    w = torch.where(keep, weights.to(acc), 0.0)
    lse = torch.logsumexp(lf, dim=-1)
    picked = lf.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = ((lse - picked) * w).sum()
    grad = torch.exp(lf - lse.unsqueeze(1)) * w.unsqueeze(1)
    grad.scatter_add_(1, safe.unsqueeze(1), -w.unsqueeze(1))
    logits.copy_(grad)
    return loss.float() if acc == torch.float32 else loss


def cross_entropy_grad_(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """See the module docstring. logits (N, V) contiguous; labels (N,) int; weights (N,)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or weights.shape != labels.shape:
        raise ValueError(f"need logits (N, V), labels (N,), weights (N,); got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(weights.shape)}")
    if not logits.is_cuda or logits.dtype == torch.float64:
        return _cross_entropy_grad_torch(logits, labels, weights)
    with torch.cuda.device(logits.device):
        return cross_entropy_grad_triton_(logits, labels, weights)


def cross_entropy_grad_triton_(logits: Tensor, labels: Tensor, weights: Tensor,
                               block: int = 8192) -> Tensor:
    """The Triton path of :func:`cross_entropy_grad_` (on CPU only under the interpreter)."""
    from sessa_kernels import _ce_kernels as kern

    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_grad_ needs rows of contiguous logits (it writes them "
                         "in place)")
    N, V = logits.shape
    loss = torch.empty(N, device=logits.device, dtype=torch.float32)
    block = min(block, 1 << max(4, (V - 1).bit_length()))
    kern.ce_grad_rows[(N,)](logits, labels.contiguous(), weights.float().contiguous(), loss,
                            V, logits.stride(0), IGNORE=IGNORE_INDEX, BLOCK=block, num_warps=8)
    return loss.sum()
