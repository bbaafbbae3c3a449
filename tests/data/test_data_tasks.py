"""Synthetic task shards: SymbolSoup balance and lengths, MQAR answers recoverable from context
(and diffuse lags as configured), passkey answer in the mask, determinism, CLI help."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from sessa_data.cli import build_parser, main
from sessa_data.tasks import symbolsoup as ss
from sessa_pt.data import TokenShardDataset, build_train_loader


def _examples(ds: TokenShardDataset) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    out = []
    for i in range(ds.num_samples):
        meta = ds.meta(i)
        assert meta is not None
        out.append((ds.tokens_numpy(i).astype(np.int64), ds.mask_numpy(i).copy(), meta))
    return out


def test_symbolsoup_balanced_in_range_and_masked(tmp_path: Path) -> None:
    assert main(["symbolsoup", "--out", str(tmp_path), "--min-len", "100", "--max-len", "160",
                 "--train", "100", "--valid", "40", "--test", "0", "--seed", "3"]) == 0
    assert not (tmp_path / "test").exists()
    ds = TokenShardDataset(tmp_path / "train", expected_seq_len=160,
                           expected_tokenizer_hash=ss.VOCAB.sha256)
    labels = Counter()
    for tokens, mask, meta in _examples(ds):
        length = meta["length"]
        assert 100 <= length <= 160 and length == 2 * meta["letters"] + 13
        assert np.flatnonzero(mask).tolist() == [length - 1]  # label of the class token
        assert tokens[length - 1] == ss.ID["<label>"]
        assert tokens[length] == ss.ID[f"<c{meta['label']}>"]
        assert (tokens[length + 1:] == ss.VOCAB.pad_id).all()
        text = ss.decode(tokens[:length].tolist())
        assert text.startswith("<bos>\n") and text.count("<sep1>") == 2
        labels[meta["label"]] += 1
    assert sorted(labels) == list(range(20)) and set(labels.values()) == {5}
    loader = build_train_loader(ds, seed=0, global_batch_size=4, micro_batch_size=4)
    batch = next(iter(loader))
    assert batch["loss_mask"].sum() == 4
    # data.context_loss_weight: every real (non-padding) next token becomes a target with that
    # weight, the class token keeps weight 1, padding stays out.
    weighted = next(iter(build_train_loader(ds, seed=0, global_batch_size=4, micro_batch_size=4,
                                            context_weight=0.25)))
    assert (weighted["input_ids"] == batch["input_ids"]).all()
    for row, answer in zip(weighted["loss_mask"], batch["loss_mask"], strict=True):
        length = int(answer.nonzero()[0, 0]) + 1  # tokens up to <label>, then the class token
        assert row[answer > 0].tolist() == [1.0]
        assert row[:length - 1].eq(0.25).all() and row[length:].eq(0).all()
    with pytest.raises(ValueError, match="context_weight must be >= 0"):
        build_train_loader(ds, seed=0, global_batch_size=4, micro_batch_size=4,
                           context_weight=-1.0)
    again = tmp_path / "again"
    main(["symbolsoup", "--out", str(again), "--min-len", "100", "--max-len", "160",
          "--train", "100", "--valid", "0", "--test", "0", "--seed", "3"])
    assert (again / "train" / "train-000000.tar").read_bytes() == (
        tmp_path / "train" / "train-000000.tar").read_bytes()


def test_symbolsoup_styles_differ_by_class() -> None:
    left, right = ss.styles()
    assert len(left) == 4 and len(right) == 5
    rng_a = ss.example_rng("t", 0, "x", 0)
    block = ss.style_block(left[0], 2000, rng_a)
    counts = Counter(block)
    primaries = [c for c, w in left[0].weights.items() if w == 3.0]
    others = [c for c, w in left[0].weights.items() if w == 1.0]
    assert min(counts[c] for c in primaries) > max(counts[c] for c in others)
    # The authors' rules: the 4 primaries in a cycle and each to itself, each secondary to
    # itself only, and primary i <-> secondary i: 20 preferred bigrams, no secondary pair.
    for style in (*left, *right):
        secondaries = {c for c, w in style.weights.items() if w == 2.0}
        assert len(style.preferred) == 20
        assert {(a, b) for a, b in style.preferred if a in secondaries and b in secondaries} \
            == {(c, c) for c in secondaries}


def test_mqar_zoology_answers_recoverable(tmp_path: Path) -> None:
    assert main(["mqar", "--out", str(tmp_path), "--seq-len", "128", "--num-pairs", "8",
                 "--vocab-size", "512", "--train", "50", "--valid", "0", "--test", "0"]) == 0
    ds = TokenShardDataset(tmp_path / "train", expected_seq_len=128)
    for tokens, mask, meta in _examples(ds):
        d = meta["num_pairs"]
        context = dict(zip(tokens[0:2 * d:2].tolist(), tokens[1:2 * d:2].tolist(), strict=True))
        assert len(context) == d and all(1 <= k < 256 <= v < 512 for k, v in context.items())
        targets = np.flatnonzero(mask) + 1  # positions of target tokens
        assert len(targets) == d
        for t in targets:
            assert t >= 2 * d and context[int(tokens[t - 1])] == tokens[t]


def test_mqar_diffuse_lags_and_answers(tmp_path: Path) -> None:
    args = ["mqar", "--out", str(tmp_path), "--variant", "diffuse", "--seq-len", "400",
            "--num-pairs", "4", "--key-len", "3", "--value-len", "2", "--num-distractors", "6",
            "--vocab-size", "1024", "--lag-min", "60", "--lag-max", "150", "--train", "40",
            "--valid", "0", "--test", "20", "--seed", "1"]
    assert main(args) == 0
    stride, q = 5, 4
    for split, lo, hi in (("train", 60, 150), ("test", 151, 401 - q * stride)):
        ds = TokenShardDataset(tmp_path / split, expected_seq_len=400)
        assert ds.manifest.generator["lag_min"] == lo
        for tokens, mask, meta in _examples(ds):
            query_start = 401 - q * stride
            haystack = tokens[:query_start].tolist()
            targets = (np.flatnonzero(mask) + 1).tolist()
            assert len(targets) == q * 2
            for j, lag in enumerate(meta["lags"]):
                assert lo <= lag <= hi
                at = query_start + j * stride
                key, value = tokens[at:at + 3].tolist(), tokens[at + 3:at + 5].tolist()
                assert targets[2 * j:2 * j + 2] == [at + 3, at + 4]
                hits = [i for i in range(len(haystack) - 2) if haystack[i:i + 3] == key]
                assert hits == [at - lag]  # the full key occurs once, exactly `lag` back
                assert haystack[at - lag + 3:at - lag + 5] == value
                prefix_hits = [i for i in range(len(haystack) - 1)
                               if haystack[i:i + 2] == key[:2]]
                assert len(prefix_hits) >= 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mqar", "--variant", "nope", "--out", "x"])
    assert main([*args[:-2], "--seed", "1", "--lag-min", "5"]) == 1  # impossible lag: error


def test_passkey_answer_in_mask(tokenizer: Path, tmp_path: Path) -> None:
    assert main(["passkey", "--out", str(tmp_path), "--tokenizer", str(tokenizer), "--seq-len",
                 "300", "--valid", "10", "--test", "0"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ds = TokenShardDataset(tmp_path / "valid", expected_seq_len=300,
                           expected_tokenizer_hash=__import__("hashlib").sha256(
                               tokenizer.read_bytes()).hexdigest())
    depths = []
    for tokens, mask, meta in _examples(ds):
        targets = np.flatnonzero(mask) + 1
        answer = tokens[targets].tolist()
        assert answer[-1] == sp.eos_id()
        assert sp.decode(answer[:-1]).strip() == str(meta["passkey"])
        prompt = sp.decode(tokens[:targets[0]].tolist())
        assert f"The pass key is {meta['passkey']}." in prompt
        assert prompt.endswith("What is the pass key? The pass key is")
        depths.append(meta["depth"])
    assert max(depths) - min(depths) > 0.2


@pytest.mark.parametrize("command", ["fetch", "train-tokenizer", "tokenize", "symbolsoup",
                                     "mqar", "passkey", "inspect"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: sessa-data {command}" in capsys.readouterr().out


def test_task_workers_write_identical_shards(tmp_path: Path) -> None:
    """Shards written by forked workers equal the single-process ones byte for byte."""
    from sessa_data.tasks.common import write_task_split

    def make(i: int) -> object:
        return ss.make_example(i, ss.class_of(i, 50, 0, "train"), 0, "train", 60, 80)

    manifests = [write_task_split(tmp_path / str(w), "train", make, 50, 80, ss.VOCAB, None,
                                  {"w": 0}, examples_per_shard=8, workers=w) for w in (1, 3)]
    assert [s.num_tokens for s in manifests[0].shards] == \
        [s.num_tokens for s in manifests[1].shards]
    for a in sorted((tmp_path / "1" / "train").glob("*.tar")):
        assert a.read_bytes() == (tmp_path / "3" / "train" / a.name).read_bytes()


def test_symbolsoup_probe_finds_the_styles() -> None:
    """The linear probe on block letter/bigram frequencies beats chance clearly (0.25 / 0.20),
    even on short sequences: the style blocks carry the label."""
    from sessa_data.tasks import symbolsoup_probe

    res = symbolsoup_probe.main(["--train", "400", "--test", "200", "--min-len", "100",
                                 "--max-len", "150"])
    assert res["left_style_acc"] > 0.4 and res["right_style_acc"] > 0.35
