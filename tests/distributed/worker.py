"""Runs several training layouts one after another inside ONE torchrun launch (launches cost
~8 s each on 2 cores; layouts are cheap): argv[1] is a JSON list of override lists; each run's
``run.dir`` is in its overrides. Between runs the megatron process groups are torn down."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import torch.distributed as dist


def main() -> None:
    from megatron.core import parallel_state as ps

    from sessa_pt.config import load_config
    from sessa_pt.parallel.topology import init_distributed
    from sessa_pt.train.trainer import Trainer

    init_distributed()
    for overrides in json.loads(pathlib.Path(sys.argv[1]).read_text()):
        Trainer(load_config(None, overrides)).run()
        dist.barrier()
        ps.destroy_model_parallel()
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
