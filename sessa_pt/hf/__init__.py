"""Hugging Face interoperability: ``sessa-export`` writes a transformers model directory (our
model code, configuration and tokenizer for ``trust_remote_code``) from any checkpoint."""
