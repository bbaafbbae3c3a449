"""CUDA-event timing shared by the kernel benchmarks: the median of ``n`` timed calls after
``warmup`` untimed ones, in milliseconds; and the same for one call captured in a CUDA graph."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], n: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_median_ms(fn: Callable[[], object], n: int, warmup: int = 3
                    ) -> tuple[float, object, torch.cuda.CUDAGraph]:
    """Capture one call of ``fn`` in a CUDA graph and time ``n`` replays (median ms).

    ``fn`` must read and write only tensors that outlive the graph (its static inputs, captured
    by closure). It is first called ``warmup`` times on a side stream (kernel compilation,
    autotuning, cuBLAS workspaces, allocator), as capture requires. Returns the time, the
    captured call's output (rewritten by every replay) and the graph (keep it while the output
    is used; drop it to free the graph's memory pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return median_ms(graph.replay, n, warmup=1), out, graph
