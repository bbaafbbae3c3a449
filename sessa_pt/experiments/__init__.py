"""Reproductions of the paper's comparisons: the experiment runner (GPU slots), the two-phase
tuned comparison, the results writer, and one module per experiment (SymbolSoup, diffuse MQAR,
language modelling). Evaluation itself lives in :mod:`sessa_pt.eval`."""
