"""An exported sessa_pt language model for transformers (``trust_remote_code=True``).

``SessaLMForCausalLM`` wraps the bundled ``DecoderLM`` (our training code, copied verbatim by
``sessa_pt.hf.bundle``) without changing its parameters or its math: the state dict is the
checkpoint's, under ``model.``. Decoding uses the model's own recurrent caches (Sessa: the
attention KV cache and the feedback keys/outputs; Mamba2: conv and SSM state; attention: KV),
so ``generate()`` runs one token per step after the prefill. Not supported, each with an error:
padding inside a batch (``attention_mask`` with zeros: the Sessa feedback and Mamba2 state have
no mask, so pad tokens would change the result; generate unpadded prompts one batch per
length) and beam search (the caches cannot be reordered).
"""

from __future__ import annotations

from typing import TYPE_CHECKING  # noqa: F401  (the copy hints appended by the export use it)

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sessa_lm import SessaLMConfig
from .sessa_pt_models_config import Mamba2Options, ModelConfig, SessaOptions
from .sessa_pt_models_lm import DecoderLM
from .sessa_pt_models_sessa import SessaMixer


def model_config(d: dict) -> ModelConfig:
    """The ModelConfig a training run's ``model:`` section describes."""
    d = dict(d)
    sessa, mamba2 = SessaOptions(**d.pop("sessa", {})), Mamba2Options(**d.pop("mamba2", {}))
    return ModelConfig(**d, sessa=sessa, mamba2=mamba2)


class SessaLMCache:
    """The per-layer recurrent caches of ``DecoderLM`` for one generate() call."""

    is_compileable = False

    def __init__(self, model: DecoderLM) -> None:
        self.layers = model.init_caches()
        self.length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class SessaLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SessaLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True

    def __init__(self, config: SessaLMConfig) -> None:
        super().__init__(config)
        self.model = DecoderLM(model_config(config.sessa_model))
        self.trained_sessa_impl = self.model.cfg.sessa.impl
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False     # our own cache object (SessaLMCache), made on the first forward

    def _init_weights(self, module) -> None:
        # Construction already initialised every parameter the way training does; weights
        # then come from model.safetensors.
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def _select_sessa_impl(self, device: torch.device) -> None:
        """The Triton feedback solve needs CUDA; elsewhere the chunked solve (same math) runs."""
        impl = self.trained_sessa_impl
        if impl == "triton" and device.type != "cuda":
            impl = "chunked"
        for m in self.model.modules():
            if isinstance(m, SessaMixer):
                m.impl = impl

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                past_key_values: SessaLMCache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                inputs_embeds: Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is not None:
            raise ValueError("SessaLMForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padded batches are not supported: the Sessa feedback and the "
                             "Mamba2 state have no attention mask, so pad tokens would change "
                             "the outputs; run prompts of one length per batch, unpadded")
        self._select_sessa_impl(input_ids.device)
        if use_cache is None:
            use_cache = past_key_values is not None
        cache = past_key_values
        if use_cache and cache is None:
            cache = SessaLMCache(self.model)
        logits = self.model(input_ids, caches=cache.layers if use_cache else None)
        if use_cache:
            cache.length += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids: Tensor,
                                      past_key_values: SessaLMCache | None = None,
                                      attention_mask: Tensor | None = None,
                                      use_cache: bool | None = True, **kwargs) -> dict:
        if use_cache is False:
            # no cache: the whole sequence is recomputed every step
            return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.length:]
            attention_mask = None
        return {"input_ids": input_ids, "past_key_values": past_key_values,
                "attention_mask": attention_mask, "use_cache": True}

    def _reorder_cache(self, past_key_values, beam_idx):
        raise NotImplementedError("beam search is not supported: the recurrent caches of "
                                  "sessa_pt models cannot be reordered")
