"""Parallelism applied around the plain models: process groups and rank maps (megatron-core
``parallel_state`` + DeepSpeed topology), the tensor-parallel plan, pipeline stages, and the
DeepSpeed engine (data parallel + ZeRO)."""
