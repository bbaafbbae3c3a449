"""Recipes, overrides and the validator: every invalid layout is refused with a message that
says what to change."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sessa_pt.config import ConfigError, check, load_config, validate


def cfg(*overrides):
    return load_config(None, ["data.train=x.json", *overrides])


@pytest.mark.parametrize("overrides,world,cuda,message", [
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, False, "set parallel.zero_stage=1"),
    (["parallel.pp=2", "parallel.zero_stage=3"], 2, False, "supports ZeRO stages 0 and 1"),
    (["parallel.tp=2"], 3, False, "not divisible by tp*pp"),
    (["parallel.tp=3", "model.n_heads=4"], 3, False, "must be divisible by parallel.tp=3"),
    (["parallel.tp=2", "model.vocab_size=1001"], 2, False, "model.vocab_size=1024"),
    (["parallel.pp=2", "train.precision=bf16", "parallel.grad_accum_dtype=bf16"], 2, True,
     "set parallel.grad_accum_dtype=fp32"),
    (["parallel.pp=2", "parallel.zero_stage=0"], 2, False, "stage 0's parameters only"),
    (["parallel.tp=2", "parallel.zero_stage=0", "train.precision=bf16"], 2, True,
     "wrong grad norm"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 1, False, "multiple of"),
    (["model.mixer=mamba2", "parallel.tp=2"], 2, False, "model.mamba2.n_groups=2"),
    (["model.sessa.impl=triton"], 1, False, "impl=chunked on CPU"),
    (["data.context_loss_weight=-0.5"], 1, False, "loss on the answer tokens only"),
    (["model.sessa.impl=triton", "model.sessa.chunk_size=48"], 1, True, "16, 32, 64 or 128"),
    (["model.sessa.panel_mib=0"], 1, False, "panel_mib=0.0 must be positive"),
    (["parallel.zero3_persistence_threshold=-1"], 1, False, "partition every parameter"),
])
def test_invalid_layouts_are_rejected(overrides, world, cuda, message):
    errors = validate(cfg(*overrides), world, cuda)
    assert any(message in e for e in errors), errors
    with pytest.raises(ConfigError):
        check(cfg(*overrides), world, cuda)


def test_valid_layouts_pass():
    for ov, world in [([], 1), (["parallel.tp=2"], 2), (["parallel.pp=2"], 2),
                      (["parallel.tp=2", "parallel.pp=2"], 4), (["parallel.zero_stage=3"], 2)]:
        assert validate(cfg(*ov), world, False) == [], ov


def test_compiled_triton_sessa_and_kernel_settings_are_accepted():
    """train.compile with the Triton solve (custom operators) is no longer refused; the kernel
    settings are config fields (so config.yaml and the mlflow params record them)."""
    from sessa_pt.config import flatten, to_dict

    c = cfg("model.sessa.impl=triton", "train.compile=true", "model.sessa.solve=queue",
            "model.sessa.panel_mib=64", "model.sessa.chunk_size=32",
            "train.activation_checkpointing=blocks")
    assert validate(c, 1, True) == []
    params = flatten(to_dict(c))
    assert params["model.sessa.solve"] == "queue" and params["model.sessa.panel_mib"] == 64.0
    assert params["train.activation_checkpointing"] == "blocks"


def test_recipe_inheritance_and_overrides():
    c = load_config("recipes/tiny/sessa.yaml", ["train.steps=7", "optim.lr=1e-3",
                                                "model.layer_mixers=[sessa,attention,sessa,sessa]"])
    assert c.model.mixer == "sessa" and c.model.d_model == 128      # from base.yaml
    assert c.train.steps == 7 and c.optim.lr == 1e-3 and c.model.layer_mixers[1] == "attention"
    assert c.run.name == "sessa" and c.run.dir == "runs/sessa"


@pytest.mark.parametrize("overrides,message", [
    (["train.stpes=3"], "unknown key(s) train.stpes"),
    (["train.steps=many"], "train.steps='many' has the wrong type"),
    (["steps"], "must look like section.key=value"),
])
def test_bad_overrides_say_what_is_wrong(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("recipes/tiny/sessa.yaml", overrides)


def test_missing_recipe():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("recipes/nope.yaml")


def test_trainer_cli_exits_nonzero_with_the_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sessa_pt.train", "recipes/tiny/sessa.yaml",
                           "train.global_batch_size=10", f"run.dir={tmp_path}"],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "train.global_batch_size=10 must be a multiple of" in proc.stderr


@pytest.mark.parametrize("override,allowed", [
    ("model.sessa.solve=flash", "'panel', 'panel_inverse', 'queue'"),
    ("train.activation_checkpointing=layers", "'none', 'blocks'"),
    ("model.mixer=mamba", "'sessa', 'attention', 'mamba2'"),
    ("model.layer_mixers=[sessa,atention,sessa,sessa]", "'sessa', 'attention', 'mamba2'"),
    ("parallel.zero_stage=4", "0, 1, 2, 3"),
    ("parallel.zero_stage=true", "0, 1, 2, 3"),
    ("optim.schedule=linear", "'cosine', 'wsd', 'constant'"),
    ("model.mamba2.impl=cuda", "'auto', 'chunked', 'sequential', 'triton', 'fla'"),
])
def test_a_typo_in_a_choice_is_refused_with_the_choices(override, allowed):
    with pytest.raises(ConfigError, match="choose one of " + allowed):
        cfg(override)


def test_choice_types_agree_with_the_implementations():
    import typing

    from sessa_pt.models import config as mc
    from sessa_pt.models.feedback import FEEDBACK_IMPLS
    from sessa_pt.models.sessa import SESSA_VARIANTS

    assert typing.get_args(mc.SessaImpl) == tuple(FEEDBACK_IMPLS)
    assert typing.get_args(mc.SessaVariant) == tuple(SESSA_VARIANTS)
    from sessa_kernels.triton_feedback import SOLVES

    assert sorted(typing.get_args(mc.SessaSolve)) == sorted(SOLVES)


def test_config_reference_is_generated_and_complete():
    """docs/config.md is `python -m sessa_pt.config --doc`, and every field has a meaning."""
    import pathlib

    from sessa_pt.config import Config
    from sessa_pt.config_doc import reference

    doc = reference(Config)
    path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert path.read_text() == doc, ("docs/config.md is stale: regenerate it with "
                                     "`python -m sessa_pt.config --doc > docs/config.md`")
    undocumented = [line.split("|")[1].strip() for line in doc.splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert undocumented == [], f"fields without a comment in the dataclass: {undocumented}"


def test_config_cli_prints_the_resolved_recipe(capsys):
    import yaml

    from sessa_pt.config import main

    assert main(["recipes/tiny/sessa.yaml", "train.steps=3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["steps"] == 3 and out["model"]["d_model"] == 128
    with pytest.raises(ConfigError, match="unknown key"):
        main(["recipes/tiny/sessa.yaml", "train.stpes=3"])
