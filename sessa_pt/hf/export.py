"""``sessa-export CHECKPOINT_OR_RUN_DIR --out DIR``: a transformers model directory.

The directory holds ``config.json``, ``model.safetensors`` (the checkpoint's parameters under
``model.``, float32 or the dtype asked for), ``generation_config.json``, the run's sentencepiece
model as ``tokenizer.model`` with ``tokenizer_config.json``, and the code transformers runs with
``trust_remote_code=True``: ``configuration_sessa_lm.py``, ``modeling_sessa_lm.py``,
``tokenization_sessa_lm.py`` and our model modules (``sessa_pt_models_*.py``,
``sessa_kernels_*.py``, copied verbatim with rewritten imports by :mod:`sessa_pt.hf.bundle`), so
it loads where sessa_pt is not installed:

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)

The checkpoint is read through :func:`sessa_pt.eval.common.load_model`, so any parallel layout
that trained it exports the same way.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
from dataclasses import asdict

import torch

REMOTE = pathlib.Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_sessa_lm.py", "modeling_sessa_lm.py", "tokenization_sessa_lm.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint: str | pathlib.Path, out: str | pathlib.Path, tokenizer: str | None = None,
           dtype: str = "float32", overwrite: bool = False) -> pathlib.Path:
    """Write the export of ``checkpoint`` (a checkpoint or run directory) into ``out``."""
    from safetensors.torch import save_file

    from sessa_pt.config import load_config
    from sessa_pt.eval.common import load_model
    from sessa_pt.eval.run_tokenizer import find_run_tokenizer
    from sessa_pt.hf.bundle import bundle_sources, copy_hints
    from sessa_pt.hf.remote.configuration_sessa_lm import SessaLMConfig

    if dtype not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}")
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} exists and is not empty: choose another --out or pass "
                             "--overwrite")
        if not (out / "config.json").is_file():
            raise SystemExit(f"--overwrite: {out} does not look like an export (no "
                             "config.json); refusing to delete it")
        shutil.rmtree(out)
    loaded = load_model(checkpoint, device="cpu", dtype="float32")
    run_tok = find_run_tokenizer(loaded.cfg, tokenizer)
    sp = run_tok.processor()
    if sp.get_piece_size() > loaded.cfg.model.vocab_size:
        raise SystemExit(f"{run_tok.path} has {sp.get_piece_size()} pieces but the model's "
                         f"vocabulary is {loaded.cfg.model.vocab_size}: wrong --tokenizer?")
    # the model section as trained (load_model may have switched a Triton solve to chunked
    # for this CPU process; the exported model picks its solve per device itself)
    model_cfg = asdict(load_config(loaded.checkpoint / "config.yaml").model)

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = bundle_sources()
    for name, src in files.items():
        (tmp / name).write_text(src)
    for name in REMOTE_FILES:
        text = (REMOTE / name).read_text()
        if name == "modeling_sessa_lm.py":
            text += copy_hints(list(files))
        (tmp / name).write_text(text)

    ids = {k: (i if i >= 0 else None) for k, i in
           (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id()))}
    config = SessaLMConfig(
        sessa_model=model_cfg, add_bos=run_tok.add_bos, bos_token_id=ids["bos"],
        eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        architectures=["SessaLMForCausalLM"],
        auto_map={"AutoConfig": "configuration_sessa_lm.SessaLMConfig",
                  "AutoModelForCausalLM": "modeling_sessa_lm.SessaLMForCausalLM"},
        sessa_pt={"checkpoint": str(loaded.checkpoint), "step": loaded.step,
                  "max_position_trained": loaded.cfg.data.seq_len},
    )
    config.dtype = dtype
    config.to_json_file(str(tmp / "config.json"))

    state = {f"model.{k}": v.detach().to(DTYPES[dtype]).contiguous()
             for k, v in loaded.model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
           "pad_token_id": ids["pad"] if ids["pad"] is not None else ids["eos"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    shutil.copyfile(run_tok.path, tmp / "tokenizer.model")
    piece = {k: (sp.id_to_piece(i) if i is not None else None) for k, i in ids.items()}
    tok_cfg = {"tokenizer_class": "SessaLMTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_sessa_lm.SessaLMTokenizer", None]},
               "add_bos_token": run_tok.add_bos, "bos_token": piece["bos"],
               "eos_token": piece["eos"], "unk_token": piece["unk"], "pad_token": piece["pad"],
               "model_max_length": int(1e30), "clean_up_tokenization_spaces": False}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(
        {k + "_token": v for k, v in piece.items() if v is not None}, indent=2) + "\n")
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sessa-export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX) or run directory")
    p.add_argument("--out", required=True, help="the export directory to write")
    p.add_argument("--tokenizer", help="the run's sentencepiece .model (default: the one its "
                                       "data manifests name)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tokenizer, args.dtype, args.overwrite)
    except FileNotFoundError as err:
        print(f"sessa-export: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}\n  load with: AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          "trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
