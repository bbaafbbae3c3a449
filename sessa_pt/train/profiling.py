"""Opt-in profile of a few training steps: ``SESSA_PT_PROFILE=<first step>[:<n steps>]``
(e.g. ``SESSA_PT_PROFILE=8:2``) runs torch.profiler over those optimizer steps and writes the
kernel table, sorted by device time, to ``<run.dir>/profile_rank<r>.txt``, and the top
operators split by the Python code that called them (5 frames) to
``<run.dir>/profile_stacks_rank<r>.txt``: which line of the model or of DeepSpeed issues the
eager copies and adds that the kernel table only names.

A diagnostic for throughput work (where does a step's time go?), off by default; with CUDA the
table lists the GPU kernels, on CPU the operators.
"""

from __future__ import annotations

import os
import pathlib

import torch


class StepProfiler:
    def __init__(self, run_dir: pathlib.Path, rank: int) -> None:
        spec = os.environ.get("SESSA_PT_PROFILE", "")
        self.first, self.count, self.prof = 0, 0, None
        self.path = run_dir / f"profile_rank{rank}.txt"
        self.stacks_path = run_dir / f"profile_stacks_rank{rank}.txt"
        if spec:
            try:
                first, _, count = spec.partition(":")
                self.first, self.count = int(first), int(count or 2)
            except ValueError:
                raise SystemExit(f"SESSA_PT_PROFILE={spec!r}: expected <first step>[:<n steps>], "
                                 "e.g. 8:2") from None

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run (1-based)."""
        if self.count and step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, with_stack=True)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is not None and step == self.first + self.count - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self.prof.key_averages().table(sort_by=sort, row_limit=150, max_name_column_width=90)
            self.path.write_text(f"steps {self.first}..{step}\n{table}\n")
            stacks = self.prof.key_averages(group_by_stack_n=5).table(
                sort_by=sort, row_limit=60, max_name_column_width=60, max_src_column_width=110)
            self.stacks_path.write_text(f"steps {self.first}..{step}\n{stacks}\n")
            print(f"[profile] wrote {self.path}", flush=True)
            self.prof = None
