"""Process groups and the rank map.

One ``ParallelLayout`` owns the degrees (tp, pp, dp) and this rank's coordinates; everything
else asks it. megatron-core's ``parallel_state`` and DeepSpeed's
``PipeModelDataParallelTopology`` are both initialised from it, and start-up asserts that they
place every rank identically (TP fastest, then DP, then PP).
"""

from __future__ import annotations

import datetime
import os
import sys
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Collective over the world: true on every rank when any rank's ``flag`` is. A world of
    one returns the flag as it is, with no device round trip (the trainer asks this several
    times a step, and every ``.item()`` of a GPU tensor waits for the queue to drain)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def init_distributed(timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's environment (a single process works without
    torchrun): NCCL on GPU, gloo on CPU."""
    if dist.is_initialized():
        return
    # A process started without torchrun (no rendezvous port given) is a world of one: its
    # rendezvous is an in-process store. A TCP store would need a free port, and a port probed
    # free can be taken before the store binds it when many runs start side by side (seen as
    # EADDRINUSE).
    solo = os.environ.get("WORLD_SIZE", "1") == "1" and "MASTER_PORT" not in os.environ
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        _skip_deepspeed_shm_op()
    kwargs = {"device_id": torch.device("cuda", int(os.environ["LOCAL_RANK"]))} if cuda else {}
    if solo:
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    import deepspeed

    # DeepSpeed keeps its own handle on the (already initialised) default group; the pipeline
    # module asserts it exists.
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed's first init_distributed on CPU JIT-compiles a shared-memory op (~35 s of g++)
    that only serves inference all-reduce; we never use it. Stub the builder. (It must be
    patched through sys.modules: the attribute ``deepspeed.comm.torch`` is the torch module.)"""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_parallel(tp: int, pp: int, seed: int) -> ParallelLayout:
    """megatron-core parallel_state for (tp, pp) plus the matching DeepSpeed topology."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from sessa_pt.parallel import cpu_shims

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    cpu_shims.install_if_needed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    layout = ParallelLayout(world, rank, tp, pp, world // (tp * pp),
                            ps.get_tensor_model_parallel_rank(),
                            ps.get_pipeline_model_parallel_rank(),
                            ps.get_data_parallel_rank())
    assert_rank_maps_agree(layout)
    return layout


def deepspeed_topology(layout: ParallelLayout):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    return PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)


def assert_rank_maps_agree(layout: ParallelLayout) -> None:
    """Every rank's (tp, dp, pp) coordinates must be the same in megatron and DeepSpeed."""
    from megatron.core import parallel_state as ps

    topo = deepspeed_topology(layout)
    coord = topo.get_coord(layout.rank)
    ours = (layout.tp_rank, layout.dp_rank, layout.pp_rank)
    theirs = (coord.model, coord.data, coord.pipe)
    if ours != theirs:
        raise RuntimeError(f"rank {layout.rank}: megatron places it at (tp, dp, pp) = {ours} "
                           f"but DeepSpeed at {theirs}; the two rank maps disagree")
    groups = {"model": ps.get_tensor_model_parallel_group(),
              "data": ps.get_data_parallel_group(),
              "pipe": ps.get_pipeline_model_parallel_group()}
    for axis, group in groups.items():
        mine = sorted(dist.get_process_group_ranks(group))
        if mine != _axis_ranks(topo, layout.rank, axis):
            raise RuntimeError(f"rank {layout.rank}: megatron's {axis} group {mine} differs "
                               f"from DeepSpeed's {_axis_ranks(topo, layout.rank, axis)}")


def _axis_ranks(topo, rank: int, axis: str) -> list[int]:
    """Ranks that share every coordinate with ``rank`` except ``axis``."""
    coord = topo.get_coord(rank)._asdict()
    others = {k: v for k, v in coord.items() if k != axis}
    return sorted(topo.filter_match(**others))


def megatron_mpu():
    """parallel_state in the shape DeepSpeed's ``mpu`` argument expects (it calls
    get_model_parallel_* names that megatron-core no longer has; see stack.md section 3c)."""
    from megatron.core import parallel_state as ps

    m = types.SimpleNamespace(**{n: getattr(ps, n) for n in dir(ps)
                                 if n.startswith(("get_", "is_"))})
    m.get_model_parallel_rank = ps.get_tensor_model_parallel_rank
    m.get_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
    m.get_model_parallel_group = ps.get_tensor_model_parallel_group
    return m
