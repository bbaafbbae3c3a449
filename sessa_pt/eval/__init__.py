"""Evaluation: perplexity, long-context tasks, the memory-tail diagnostic, comparison reports."""
