"""Configuration of an exported sessa_pt language model (transformers ``trust_remote_code``).

``sessa_model`` is the training run's ``model:`` section as a plain dict (the fields of
``ModelConfig`` in the bundled ``sessa_pt_models_config.py``); it alone decides the architecture.
The usual transformers fields (``vocab_size``, ``hidden_size``, ...) are copies for tools that
read them.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class SessaLMConfig(PretrainedConfig):
    model_type = "sessa_lm"

    def __init__(self, sessa_model: dict | None = None, add_bos: bool = False,
                 **kwargs) -> None:
        self.sessa_model = dict(sessa_model or {})
        self.add_bos = add_bos          # the training shards started documents with bos
        m = self.sessa_model
        kwargs.setdefault("vocab_size", m.get("vocab_size"))
        kwargs.setdefault("hidden_size", m.get("d_model"))
        kwargs.setdefault("num_hidden_layers", m.get("n_layers"))
        kwargs.setdefault("num_attention_heads", m.get("n_heads"))
        # The LM head shares the embedding inside the model itself (no separate lm_head
        # parameter), so transformers must not try to tie anything.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
