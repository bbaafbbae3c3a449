"""The kernel-kind table of a GPU profile (sessa_pt.train.profile_summary), on a table in the
layout torch.profiler prints (the header and rows as SESSA_PT_PROFILE writes them)."""

from __future__ import annotations

import pathlib

import pytest

from sessa_pt.train.profile_summary import summarise

COLS = ("Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg", "Self CUDA",
        "Self CUDA %", "CUDA total", "CUDA time avg", "# of Calls")


def _row(name: str, self_cuda: str) -> str:
    cells = ["1.00%", "1.000ms", "1.00%", "1.000ms", "1.000us", self_cuda, "1.00%", self_cuda,
             "1.000us", "4"]
    return f"{name:>90}  " + "  ".join(f"{c:>12}" for c in cells)


def test_kinds_dedup_and_other(tmp_path: pathlib.Path) -> None:
    rule = "-" * 90 + "  " + "  ".join("-" * 12 for _ in COLS)
    lines = ["steps 7..8", rule, f"{'Name':>90}  " + "  ".join(f"{c:>12}" for c in COLS), rule,
             _row("sessa::feedback_triton_bwd", "60.000ms"),      # operator: its kernels again
             _row("bwd_dlogit_panel", "20.000ms"),
             _row("fwd_panel_solve", "10.000ms"),
             _row("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "30.000ms"),
             _row("void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688gemm_bf16_128x128_tn_align1>", "5.000ms"),
             _row("triton_poi_fused_add_mul_0", "2.500ms"),
             _row("triton_poi_fused_add_mul_0", "2.500ms"),          # listed twice, counted once
             _row("aten::mm", "35.000ms"),
             _row("chunk_scan_fwd", "500.000us"), rule, "Self CPU time total: 50.000ms",
             "Self CUDA time total: 100.000ms"]
    path = tmp_path / "profile_rank0.txt"
    path.write_text("\n".join(lines) + "\n")
    got = {kind: ms for kind, ms, _ in summarise(path)}
    assert got["Sessa feedback, dq/dk (Triton)"] == pytest.approx(20.0)
    assert got["Sessa feedback, solves (Triton)"] == pytest.approx(10.0)
    assert got["GEMM sm90"] == pytest.approx(30.0)
    assert got["GEMM off the sm90 path (align1/2, sm75, sm80)"] == pytest.approx(5.0)
    assert got["inductor fused kernels"] == pytest.approx(2.5)
    assert got["Mamba2 SSD (Triton)"] == pytest.approx(0.5)
    assert got["other"] == pytest.approx(100 - 68.0)
    assert got["all"] == pytest.approx(100.0)


def test_a_cpu_only_table_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("Name  Self CPU\nSelf CPU time total: 1.0ms\n")
    with pytest.raises(SystemExit, match="Self CUDA time total"):
        summarise(path)
