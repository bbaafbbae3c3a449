"""Data loading for training: shard manifests, the shard dataset, and exact, resumable loaders.

Public API (the trainer's contract)::

    ds = TokenShardDataset(manifest_path, expected_seq_len=L, expected_tokenizer_hash=h,
                           model_vocab_size=V)
    loader = build_train_loader(ds, seed=s, global_batch_size=G, micro_batch_size=b,
                                dp_rank=r, dp_size=n, start_cursor=c, num_workers=w)
    for batch in loader: ...      # input_ids, labels, loss_mask, sample_ids
    loader.cursor                 # int to checkpoint
"""

from sessa_pt.data.cursor import DataCursor
from sessa_pt.data.dataset import TokenIdError, TokenShardDataset
from sessa_pt.data.loader import (
    EvalLoader,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
)
from sessa_pt.data.manifest import Manifest, ManifestError, ShardInfo, read_manifest
from sessa_pt.data.shard_index import ShardCorruptError

__all__ = [
    "DataCursor",
    "EvalLoader",
    "Manifest",
    "ManifestError",
    "ShardCorruptError",
    "ShardInfo",
    "TokenIdError",
    "TokenShardDataset",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "read_manifest",
]
