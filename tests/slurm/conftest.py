"""Fixtures for the Slurm tests: a real single-node Slurm (installed with apt-get and started
without systemd by slurm/local/ when it is not already running; stopped at the end only if
this session started it) and tiny tokenized shards for the tiny CPU recipe.

Environment: SESSA_SLURM_BASE (the local cluster's directory, default /tmp/sessa-slurm),
SLURM_INSTALL_TIMEOUT (seconds per apt-get call, default 300)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "slurm" / "local"
BASE = Path(os.environ.get("SESSA_SLURM_BASE", "/tmp/sessa-slurm"))


def _alive(pid_file: Path) -> bool:
    try:
        stat = subprocess.run(["ps", "-o", "stat=", "-p", pid_file.read_text().strip()],
                              capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return False
    return bool(stat) and not stat.startswith("Z")


@dataclass
class LocalSlurm:
    """Handle on the running cluster: an environment for its commands and job helpers."""

    base: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout, **kw)

    def final_record(self, job_id: str) -> dict[str, str]:
        """The job's last line in jobcomp.txt (JobState, ExitCode, ...), written when it ends."""
        path = self.base / "log" / "jobcomp.txt"
        rec: dict[str, str] = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobId") == job_id:
                rec = fields
        return rec

    def wait_gone(self, job_id: str, timeout: float) -> None:
        """Wait until squeue lists no pending/running part of the job (or job array)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip():
                return
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still not done after {timeout:.0f} s")


@pytest.fixture(scope="session")
def slurm() -> LocalSlurm:
    inst = subprocess.run([str(LOCAL / "install.sh")], capture_output=True, text=True, check=False,
                          timeout=2 * int(os.environ.get("SLURM_INSTALL_TIMEOUT", "300")) + 60)
    if inst.returncode == 2:
        pytest.skip(f"Slurm cannot be installed here: {inst.stderr.strip()}")
    assert inst.returncode == 0, f"slurm/local/install.sh failed:\n{inst.stdout}\n{inst.stderr}"
    if os.geteuid() != 0:
        pytest.skip("the local Slurm daemons run as root (SlurmUser=root) and this is not root")

    started_here = not _alive(BASE / "run" / "slurmctld.pid")
    start = subprocess.run([str(LOCAL / "start.sh"), str(BASE)], capture_output=True, text=True,
                           check=False,
                           timeout=120)
    if start.returncode != 0:   # start.sh stops what it started when it fails
        pytest.fail(f"slurm/local/start.sh failed:\n{start.stdout}\n{start.stderr}")

    # A clean environment for sbatch: no SLURM_*/SBATCH_* leaking in from an outer job.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(BASE / "slurm.conf")
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    try:
        yield LocalSlurm(BASE, env)
    finally:
        if started_here:
            subprocess.run([str(LOCAL / "stop.sh"), str(BASE)], capture_output=True, timeout=120,
                           check=False)


@pytest.fixture(scope="session")
def tiny_data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shards of ~250 KB of Austen (seq_len 64) and their tokenizer: recipe overrides."""
    from sessa_data.fetch import fetch
    from sessa_data.tokenize_shards import TokenizeConfig, tokenize_to_shards
    from sessa_data.tokenizer_train import train_tokenizer

    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("sessa_data_austen")) if cache else tmp_path_factory.mktemp("au")
    fetch(["austen"], root / "corpus", root / "packages")   # shared with tests/data
    out = tmp_path_factory.mktemp("slurm_data")
    docs = out / "docs.jsonl"
    with open(root / "corpus" / "austen.jsonl", encoding="utf-8") as src:
        text = json.loads(src.readline())["text"][:250_000]
    with open(docs, "w", encoding="utf-8") as dst:   # 25 documents so 10% can be held out
        dst.writelines(json.dumps({"text": text[i:i + 10_000], "source": "austen",
                                   "doc_id": f"austen/slice{i}"}) + "\n"
                       for i in range(0, len(text), 10_000))
    prefix = out / "tok" / "bpe512"
    train_tokenizer([str(docs)], 512, "bpe", str(prefix))
    tokenize_to_shards(TokenizeConfig(inputs=[str(docs)], tokenizer=f"{prefix}.model", seq_len=64,
                                      out=str(out / "shards"), workers=1, valid_fraction=0.1))
    return {"data.train": str(out / "shards" / "train" / "manifest.json"),
            "data.valid": str(out / "shards" / "valid" / "manifest.json"),
            "data.seq_len": "64", "model.vocab_size": "512"}
