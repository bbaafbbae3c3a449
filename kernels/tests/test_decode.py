"""The decode step (PyTorch path) equals the parallel dense forward, token by token; on the GPU
the Triton step replays from a CUDA graph to the eager result."""

from __future__ import annotations

import pytest
import torch
from _helpers import feedback_inputs, rel_err
from sessa_kernels.decode import feedback_decode_step

from sessa_pt.models.feedback import feedback_dense


def test_decode_steps_match_parallel_forward_fp64() -> None:
    q, k, g, f, _ = feedback_inputs(2, 20, 8, 6, routing="sharp", dtype=torch.float64)
    ref = feedback_dense(q, k, g, f)
    s = []
    for t in range(20):
        S = torch.stack(s, 1) if s else f[:, :0]
        s.append(feedback_decode_step(q[:, t], g[:, t], f[:, t], k[:, :t], S))
    assert rel_err(torch.stack(s, 1), ref) < 1e-12


def test_decode_validates_shapes() -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        feedback_decode_step(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, 3),
                             torch.zeros(2, 5, 4), torch.zeros(2, 5, 2))


@pytest.mark.gpu
def test_decode_step_cuda_graph_replay_equals_eager() -> None:
    """The Triton decode step captured in a CUDA graph (caches as views of larger preallocated
    buffers, as in SessaMixer) replays to the eager result bit for bit, also after new values
    are written into the captured input buffers (the graph reads them in place)."""
    from sessa_kernels.decode import feedback_decode_torch

    gen = torch.Generator().manual_seed(0)
    B, P, capacity, Dk, D = 4, 1000, 1536, 256, 384

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)

    q, f, k_buf, s_buf = rand(B, Dk), rand(B, D), rand(B, capacity, Dk), rand(B, capacity, D)
    g = (torch.rand(B, generator=gen) * 2 - 1).cuda()
    K, S = k_buf[:, :P], s_buf[:, :P]

    def step() -> torch.Tensor:
        return feedback_decode_step(q, g, f, K, S, impl="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):            # compile and warm up outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for refill in (False, True):
        if refill:
            for x in (q, f, k_buf, s_buf):
                x.copy_(rand(*x.shape))
            g.copy_((torch.rand(B, generator=gen) * 2 - 1).cuda())
        eager = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), refill
        ref = feedback_decode_torch(q.double(), g.double(), f.double(), K.double(), S.double(),
                                    Dk**-0.5)
        assert rel_err(out, ref) < 1e-2, refill
