"""Evaluation command line: ``python -m sessa_pt.eval.cli {ppl,task,passkey,memory-tail}``
(also the ``sessa-eval`` console script; ``CHECKPOINT SUBCOMMAND ...`` order works too, as
``sbatch slurm/eval.sh CHECKPOINT_DIR task --data ...`` passes it).

Every subcommand takes a checkpoint directory or a run directory (its newest complete
checkpoint) from any parallel layout, prints a table, writes ``--json PATH`` when asked, and
with ``--mlflow-run-id ID`` (``auto`` = the run that trained the checkpoint) and
``--tracking-uri URI`` logs metrics and the JSON/PNG files to that mlflow run:

- ``ppl``: ``eval_<name>_loss``, ``eval_<name>_ppl``, ``eval_<name>_top1``, ``_top5``
- ``task``: ``<task>_<split>_acc`` (token accuracy), ``<task>_<split>_example_acc``, and the
  breakdown as the history ``<task>_<split>_acc_by_length`` / ``_acc_by_lag`` (step = the bin's
  mean length or lag)
- ``passkey``: ``passkey_acc`` and ``passkey_acc_by_length`` (step = length)
- ``harness``: lm-evaluation-harness (``pip install -e ".[hf]"``), offline;
  ``harness_<task>_<metric>[_<filter>]`` (e.g. ``harness_sessa_cloze_acc``)
- ``memory-tail``: ``memtail_beta_layer<i>``, ``memtail_beta_model`` and the influence curves
  ``memtail_influence_layer<i>`` / ``memtail_influence_model`` (step = lag)

Metrics are logged at the checkpoint's training step (curves excepted), so the comparison report
(``python -m sessa_pt.eval.report``) finds them beside the training metrics.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile
from typing import Any

from sessa_pt.eval.common import ResultLogger, format_table, load_model, write_json


def _name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", s).strip("_")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX) or run directory")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float64", "bfloat16"],
                   help="model weights dtype (auto: float32, with bf16 autocast on CUDA)")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--sessa-impl", choices=["dense", "chunked", "triton"],
                   help="Sessa feedback implementation (default: the checkpoint's; chunked "
                        "when it says triton and there is no GPU)")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON here")
    p.add_argument("--mlflow-run-id", metavar="ID",
                   help="log results into this mlflow run ('auto': the checkpoint's own run)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="mlflow store of --mlflow-run-id (default: the one the trainer recorded "
                        "for 'auto', else MLFLOW_TRACKING_URI)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sessa_pt.eval.cli",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    q = sub.add_parser("ppl", help="validation perplexity on packed text shards",
                       formatter_class=fmt,
                       description="Mean next-token cross entropy, perplexity and top-1/top-5 "
                                   "accuracy over a split of text shards.")
    _common(q)
    q.add_argument("--data", required=True, help="a split's manifest.json (sessa-data tokenize)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--max-samples", type=int, help="evaluate only the first N samples")
    q.add_argument("--name", default="valid", help="metric name part: eval_<name>_ppl")

    t = sub.add_parser("task", help="SymbolSoup / MQAR accuracy at the answer positions",
                       formatter_class=fmt,
                       description="Greedy accuracy at the masked answer positions of a task "
                                   "split, with a breakdown by length (SymbolSoup) or by "
                                   "source-query lag (diffuse MQAR).")
    _common(t)
    t.add_argument("--data", required=True, help="a task split's manifest.json")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-samples", type=int, help="evaluate only the first N examples")
    t.add_argument("--bins", type=int, default=5, help="length / lag bins of the breakdown")
    t.add_argument("--name", help="metric prefix (default: <task>_<split>)")

    k = sub.add_parser("passkey", help="passkey retrieval by depth x length (greedy decoding)",
                       formatter_class=fmt,
                       description="Passkey retrieval: generate greedily after the prompt and "
                                   "compare the first integer with the key (exact match).")
    _common(k)
    k.add_argument("--tokenizer", required=True, help="the sentencepiece .model the LM used")
    k.add_argument("--lengths", default="256,512,1024",
                   help="comma-separated prompt lengths in tokens")
    k.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="comma-separated needle depths in [0, 1]")
    k.add_argument("--samples", type=int, default=5, help="keys per (length, depth) cell")
    k.add_argument("--seed", type=int, default=0)

    h = sub.add_parser("harness", help="lm-evaluation-harness tasks, offline",
                       formatter_class=fmt,
                       description="lm-evaluation-harness on the checkpoint through our model "
                                   "and the run's tokenizer, with no hub access. Local tasks "
                                   "from the run's held-out split: sessa_cloze (LAMBADA-style "
                                   "last word) and sessa_passkey; other names are lm-eval "
                                   "tasks whose datasets are in the local HF cache.")
    _common(h)
    h.add_argument("--tasks", default="sessa_cloze,sessa_passkey",
                   help="comma-separated task names")
    h.add_argument("--limit", type=int, help="at most N examples per task")
    h.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument("--tokenizer", help="the run's sentencepiece .model (default: the one its "
                                       "data manifests name)")
    h.add_argument("--cloze-examples", type=int, default=500,
                   help="sessa_cloze examples made from the held-out split (at most)")
    h.add_argument("--passkey-samples", type=int, default=4, help="keys per needle depth")
    h.add_argument("--passkey-length", type=int,
                   help="passkey prompt tokens (default: the run's seq_len)")
    h.add_argument("--max-length", type=int,
                   help="longest input in tokens, longer ones are cut on the left (default: "
                        "the run's seq_len)")
    h.add_argument("--task-dir", help="write the local tasks' YAML and data here and keep them "
                                      "(default: a temporary directory)")
    h.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="resamples for the stderr of perplexity-like metrics (0: none)")
    h.add_argument("--seed", type=int, default=0)

    m = sub.add_parser("memory-tail", help="fitted tail exponent beta per layer",
                       formatter_class=fmt,
                       description="Influence of residual-stream position tau on tau+lag per "
                                   "block (RMS singular value of the Jacobian block), with a "
                                   "power-law fit (beta) and an exponential fit per layer.")
    _common(m)
    m.add_argument("--seq-len", type=int, help="sequence length (default: the run's seq_len)")
    m.add_argument("--tau", type=int, default=0, help="source position")
    m.add_argument("--n-lags", type=int, default=32, help="log-spaced lags")
    m.add_argument("--fit-min-lag", type=int, default=16, help="fit on lags >= this")
    m.add_argument("--probes", type=int, default=8, help="random probes per Jacobian block")
    m.add_argument("--data", help="take the input from this split (default: random tokens)")
    m.add_argument("--sample", type=int, default=0, help="sample index in --data")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--plot", metavar="PNG", help="write a log-log plot of every layer here")
    return p


def run_ppl(args, loaded, log: ResultLogger) -> dict[str, Any]:
    from sessa_pt.eval.tasks import perplexity

    r = perplexity(loaded, args.data, args.batch_size, args.max_samples, not args.no_bf16)
    print(format_table(["checkpoint step", "tokens", "loss", "ppl", "top1", "top5"],
                       [[loaded.step, r["tokens"], r["loss"], r["ppl"], r["top1"], r["top5"]]]))
    n = _name(args.name)
    log.metrics({f"eval_{n}_loss": r["loss"], f"eval_{n}_ppl": r["ppl"],
                 f"eval_{n}_top1": r["top1"], f"eval_{n}_top5": r["top5"]}, loaded.step)
    return r


def run_task(args, loaded, log: ResultLogger) -> dict[str, Any]:
    from sessa_pt.eval.tasks import task_accuracy

    r = task_accuracy(loaded, args.data, args.batch_size, args.max_samples, args.bins,
                      not args.no_bf16)
    print(f"{r.task} ({r.split}): token accuracy {r.token_acc:.4f} over {r.targets} targets, "
          f"example accuracy {r.example_acc:.4f} over {r.examples} examples")
    if r.bins:
        print(format_table([f"{r.breakdown_key} from", "to", "mean", "targets", "acc"],
                           [[int(b["lo"]), int(b["hi"]), round(b["center"], 1),
                             b["n"], b["acc"]] for b in r.bins]))
    prefix = _name(args.name or f"{r.task}_{r.split}")
    log.metrics({f"{prefix}_acc": r.token_acc, f"{prefix}_example_acc": r.example_acc},
                loaded.step)
    if r.bins:
        log.curve(f"{prefix}_acc_by_{r.breakdown_key}", [round(b["center"]) for b in r.bins],
                  [b["acc"] for b in r.bins])
    return {**r.as_dict(), "metric_prefix": prefix, "checkpoint": str(loaded.checkpoint),
            "step": loaded.step}


def run_passkey(args, loaded, log: ResultLogger) -> dict[str, Any]:
    from sessa_pt.eval.passkey import format_passkey, passkey_table

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    if any(not 0 <= d <= 1 for d in depths):
        raise SystemExit("--depths must lie in [0, 1]")
    r = passkey_table(loaded, args.tokenizer, lengths, depths, args.samples, args.seed,
                      not args.no_bf16)
    print(format_passkey(r))
    print(f"mean exact-match accuracy {r['acc']:.4f}")
    log.metrics({"passkey_acc": r["acc"]}, loaded.step)
    log.curve("passkey_acc_by_length", lengths,
              [sum(c["acc"] for c in r["cells"] if c["length"] == n) / len(depths)
               for n in lengths])
    return {**r, "checkpoint": str(loaded.checkpoint), "step": loaded.step}


def run_memory_tail(args, loaded, log: ResultLogger) -> dict[str, Any]:
    from sessa_pt.eval.trained_tail import plot_tail, trained_memory_tail

    r = trained_memory_tail(loaded, args.seq_len, args.tau, args.n_lags, args.fit_min_lag,
                            args.probes, args.data, args.sample, args.seed)
    print(format_table(["layer", "mixer", "beta", "R^2 power", "exp rate", "R^2 exp", "points"],
                       [[row["layer"], row["mixer"], row["beta"], row["r2_power"],
                         row["rate"], row["r2_exp"], row["fit_points"]]
                        for row in r["layers"]]))
    print(f"(seq_len {r['seq_len']}, tau {r['tau']}, fit on lags >= {r['fit_min_lag']}; "
          "influence ~ lag^-beta)")
    log.metrics({f"memtail_beta_{'model' if row['layer'] == 'model' else 'layer' + row['layer']}":
                 row["beta"] for row in r["layers"]}, loaded.step)
    for row in r["layers"]:
        name = "model" if row["layer"] == "model" else f"layer{row['layer']}"
        log.curve(f"memtail_influence_{name}", r["lags"], row["influence"])
    if args.plot:
        plot_tail(r, args.plot, f"memory tail, step {loaded.step}")
        print(f"plot written to {args.plot}")
        log.artifact(args.plot)
    return r


def run_harness_cmd(args, loaded, log: ResultLogger) -> dict[str, Any]:
    from sessa_pt.eval.harness import (
        LOCAL_TASKS,
        flat_metrics,
        run_harness,
        set_offline,
        write_local_tasks,
    )
    from sessa_pt.eval.run_tokenizer import find_run_tokenizer

    set_offline()
    from lm_eval.utils import make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    run_tok = find_run_tokenizer(loaded.cfg, args.tokenizer)
    sp = run_tok.processor()
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = pathlib.Path(args.task_dir or tmp)
        sizes = write_local_tasks(task_dir, loaded, sp, [t for t in tasks if t in LOCAL_TASKS],
                                  args.cloze_examples, args.passkey_samples, args.passkey_length)
        results = run_harness(loaded, sp, run_tok.prefix(sp), tasks, task_dir, args.limit,
                              args.num_fewshot, args.batch_size, not args.no_bf16, args.seed,
                              args.max_length, args.bootstrap_iters)
    print(make_table(results))
    metrics = flat_metrics(results)
    log.metrics(metrics, loaded.step)
    return {"tasks": tasks, "local_task_examples": sizes, "metrics": metrics,
            "results": results.get("results", {}), "n-samples": results.get("n-samples", {}),
            "versions": results.get("versions", {}), "checkpoint": str(loaded.checkpoint),
            "step": loaded.step}


COMMANDS = {"ppl": run_ppl, "task": run_task, "passkey": run_passkey,
            "harness": run_harness_cmd, "memory-tail": run_memory_tail}


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept ``CHECKPOINT SUBCOMMAND ...`` as well as ``SUBCOMMAND CHECKPOINT ...`` (the form
    ``slurm/eval.sh CHECKPOINT_DIR [eval arguments]`` produces)."""
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-") \
            and argv[1] in COMMANDS:
        return [argv[1], argv[0], *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(normalize_argv(list(sys.argv[1:] if argv is None
                                                         else argv)))
    import torch

    if args.command == "memory-tail" and args.dtype == "auto":
        args.dtype = "float64" if not torch.cuda.is_available() or args.device == "cpu" \
            else "float32"
    from sessa_pt.train.checkpoint import CheckpointError

    try:
        loaded = load_model(args.checkpoint, args.device, args.dtype, args.sessa_impl)
    except (FileNotFoundError, CheckpointError) as err:    # a damaged checkpoint is named
        print(f"sessa-eval: {err}", file=sys.stderr)
        return 2
    print(f"[sessa-eval] {args.command}: {loaded.checkpoint} (step {loaded.step}, "
          f"{loaded.cfg.model.mixer}/{loaded.cfg.model.block}, {loaded.device})", flush=True)
    log = ResultLogger(args.mlflow_run_id, args.tracking_uri, loaded)
    result = COMMANDS[args.command](args, loaded, log)
    result["command"] = args.command
    if args.json:
        write_json(args.json, result)
        print(f"results written to {args.json}")
    if log.active:
        if args.json:
            log.artifact(args.json)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = pathlib.Path(tmp) / f"{args.command}_step{loaded.step}.json"
                write_json(path, result)
                log.artifact(path)
        print(f"logged to mlflow run {log.run_id} ({log.uri})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
