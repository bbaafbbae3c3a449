"""Training: the torchrun entry point, the loop, checkpoints, tracking, schedules."""
