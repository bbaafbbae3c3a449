"""Checkpoint integrity and rotation without launching a run: the manifest catches 4 KB of
random bytes inside a file and an overwritten header, evaluation refuses a damaged checkpoint by
file name, and rotation never deletes the newest checkpoint nor ones of higher steps."""

from __future__ import annotations

import os
import pathlib

import pytest
import yaml

from sessa_pt.config import load_config, to_dict
from sessa_pt.models.lm import DecoderLM
from sessa_pt.train import checkpoint as ckpt
from sessa_pt.train.ckpt_files import CheckpointCorrupt, verify_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_FILE = "model/rank_00000.safetensors"


@pytest.fixture
def model_ckpt(tmp_path) -> tuple[pathlib.Path, DecoderLM]:
    cfg = load_config(ROOT / "recipes" / "tiny" / "sessa.yaml",
                      ["model.d_model=32", "model.n_layers=2", "model.vocab_size=256",
                       f"run.dir={tmp_path}"])
    model = DecoderLM(cfg.model, seed=cfg.run.seed)
    d = tmp_path / "checkpoints" / "step_00000004"
    ckpt.write_model_checkpoint(d, model.state_dict(),
                                yaml.safe_dump(to_dict(cfg), sort_keys=False), {"step": 4})
    return d, model


def test_a_clean_checkpoint_verifies_and_loads_the_same_weights(model_ckpt):
    d, model = model_ckpt
    verify_checkpoint(d)
    loaded, _ = ckpt.load_plain_model(d.parent.parent)        # a run directory works too
    for k, v in model.state_dict().items():
        assert (loaded.state_dict()[k] == v).all(), k


@pytest.mark.parametrize("where", ["inside", "header"])
def test_damage_is_reported_by_file_name_and_eval_refuses(model_ckpt, where):
    d, _ = model_ckpt
    path = d / MODEL_FILE
    data = bytearray(path.read_bytes())
    if where == "inside":
        mid = len(data) // 2
        data[mid:mid + 4096] = os.urandom(4096)
    else:
        data[:64] = os.urandom(64)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=f"{MODEL_FILE} does not match its sha256"):
        ckpt.load_plain_model(d)
    from sessa_pt.eval.cli import main

    assert main(["ppl", str(d), "--data", "unused"]) == 2


def test_truncated_and_missing_files_are_named(model_ckpt):
    d, _ = model_ckpt
    (d / "config.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointCorrupt, match="config.yaml has .* bytes, the manifest says"):
        verify_checkpoint(d)
    (d / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointCorrupt, match="MANIFEST.json is missing"):
        ckpt.load_plain_model(d)


def _fake(root: pathlib.Path, *steps: int) -> None:
    for s in steps:
        d = ckpt.step_dir(root, s)
        d.mkdir(parents=True)
        (d / "COMPLETE").write_text(f"step {s}\n")


def test_rotation_keeps_the_newest_and_never_touches_higher_steps(tmp_path):
    root = tmp_path / "checkpoints"
    _fake(root, 3, 6, 9)              # an older run's checkpoints, at higher steps
    _fake(root, 2)                    # this run's first save, then its second:
    _fake(root, 4)
    deleted = ckpt.rotate(root, 4, keep_last=2)
    assert [p.name for p in deleted] == ["step_00000002"]   # only older than the new one
    assert [p.name for p in ckpt.complete_checkpoints(root)] == \
        ["step_00000003", "step_00000004", "step_00000006", "step_00000009"]
    ckpt.rotate(root, 4, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == \
        ["step_00000004", "step_00000006", "step_00000009"]
    ckpt.rotate(root, 9, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000009"]


def _saved(tmp_path, **changes):
    base = ["model.d_model=32", "model.n_layers=2", "model.vocab_size=256", "run.seed=7",
            "train.global_batch_size=16", "train.micro_batch_size=4"]
    saved_cfg = load_config(ROOT / "recipes" / "tiny" / "sessa.yaml", base)
    d = tmp_path / "step_00000003"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(saved_cfg), sort_keys=False))
    state = {"seed": 7, "global_batch_size": 16, "consumed_samples": 48,
             "tokenizer_sha256": "a" * 64}
    now = load_config(ROOT / "recipes" / "tiny" / "sessa.yaml",
                      base + [f"{k}={v}" for k, v in changes.items()])
    return d, state, now


@pytest.mark.parametrize("changes,message", [
    ({"model.d_model": 64}, r"another model \(model.d_model: 32 -> 64\)"),
    ({"run.seed": 8}, r"run.seed=7 \(this run: 8\)"),
    ({"train.global_batch_size": 8}, "checkpoint.allow_batch_size_change=true"),
    ({"train.global_batch_size": 32, "checkpoint.allow_batch_size_change": True},
     "consumed 48 samples, not a multiple of train.global_batch_size=32"),
])
def test_resume_refuses_what_cannot_carry_over(tmp_path, changes, message):
    d, state, now = _saved(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        ckpt.check_compatible(d, state, now, "a" * 64)


def test_resume_accepts_layout_kernel_and_allowed_batch_changes(tmp_path):
    d, state, now = _saved(tmp_path, **{"parallel.tp": 2, "model.sessa.impl": "chunked",
                                        "train.global_batch_size": 8,
                                        "checkpoint.allow_batch_size_change": True})
    ckpt.check_compatible(d, state, now, "a" * 64)
    with pytest.raises(ValueError, match="another tokenizer"):
        ckpt.check_compatible(d, state, now, "b" * 64)
