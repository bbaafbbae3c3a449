"""Triton kernel of ``ce_triton.cross_entropy_grad_`` (imported lazily)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ce_grad_rows(logits_ptr, labels_ptr, weights_ptr, loss_ptr, V, stride_row,
                 IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    """Row i: loss_i = w_i (lse - x[y]) and, in place, x <- w_i (softmax(x) - onehot(y))."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    w = tl.load(weights_ptr + row)
    w = tl.where(label == IGNORE, 0.0, w)
    offs = tl.arange(0, BLOCK)
    # sweep 1: running max and sum of exp (fp32)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + \
            tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)
    safe = tl.where(label == IGNORE, 0, label)
    picked = tl.load(base + safe).to(tl.float32)
    tl.store(loss_ptr + row, w * (lse - picked))
    # sweep 2: the gradient, in place
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
        g = w * (tl.exp(x - lse) - tl.where(idx == safe, 1.0, 0.0))
        tl.store(base + idx, g.to(logits_ptr.dtype.element_ty), mask=idx < V)
