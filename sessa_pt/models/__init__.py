"""Plain-PyTorch models: Sessa, attention and Mamba2 mixers, blocks, and the decoder LM.

Nothing here imports deepspeed or megatron: parallelism is applied around these modules by
``sessa_pt.parallel``.
"""

from sessa_pt.models.attention import AttentionMixer, KVCache
from sessa_pt.models.blocks import GatedBlock, SessaBlock, TransformerBlock
from sessa_pt.models.config import Mamba2Options, ModelConfig, SessaOptions
from sessa_pt.models.feedback import feedback_dense, sessa_feedback
from sessa_pt.models.lm import DecoderLM
from sessa_pt.models.sessa import SessaMixer

__all__ = [
    "AttentionMixer", "DecoderLM", "GatedBlock", "KVCache", "Mamba2Options", "ModelConfig",
    "SessaBlock", "SessaMixer", "SessaOptions", "TransformerBlock", "feedback_dense",
    "sessa_feedback",
]
