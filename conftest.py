"""Repository-wide pytest setup.

Without CUDA, Triton kernels can only run under Triton's interpreter, and Triton reads
TRITON_INTERPRET when a kernel module is first imported: set it before any test module imports
one, so test order never matters.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
