"""Stand-in for ``sessa_pt.train`` used while developing the Slurm layer: same command line and
run-directory contract (status.json, train_log.jsonl, checkpoints with COMPLETE, STOP file),
a gloo all-reduce per step instead of a model."""

import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    recipe, *overrides = sys.argv[1:]
    cfg = {"train.steps": "20", "checkpoint.every": "5", "run.dir": None, "run.seed": "0"}
    for kv in overrides:
        k, _, v = kv.partition("=")
        if k not in cfg:
            print(f"error: unknown config key '{k}'", file=sys.stderr)
            return 1
        cfg[k] = v
    steps, every, run_dir = int(cfg["train.steps"]), int(cfg["checkpoint.every"]), cfg["run.dir"]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ckdir = os.path.join(run_dir, "checkpoints")
    done = sorted(d for d in os.listdir(ckdir) if os.path.exists(os.path.join(ckdir, d, "COMPLETE"))) if os.path.isdir(ckdir) else []
    start = int(done[-1].split("_")[1]) if done else 0

    def status(state, step):
        if rank == 0:
            with open(os.path.join(run_dir, "status.json"), "w") as f:
                json.dump({"state": state, "step": step, "total_steps": steps, "mlflow_run_id": "standin"}, f)

    def save(step):
        if rank == 0:
            d = os.path.join(ckdir, f"step_{step:08d}")
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "COMPLETE"), "w").close()

    status("running", start)
    for step in range(start + 1, steps + 1):
        t = torch.tensor([float(rank + 1) * step])
        dist.all_reduce(t)
        time.sleep(0.3)
        if rank == 0:
            with open(os.path.join(run_dir, "train_log.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / t.item(), "grad_norm": 1.0, "lr": 1e-3}) + "\n")
        if step % every == 0:
            save(step)
        stop = torch.tensor([1.0 if os.path.exists(os.path.join(run_dir, "STOP")) else 0.0])
        dist.broadcast(stop, 0)
        if stop.item() and step < steps:
            save(step)
            status("preempted", step)
            dist.barrier()
            if rank == 0:
                os.remove(os.path.join(run_dir, "STOP"))
            return 0
    save(steps)
    status("finished", steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
