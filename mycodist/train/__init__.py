"""Distributed training: engines (Accelerate, DeepSpeed, torchrun DDP), the step loop, checkpoints,
evaluation, TensorBoard and export. Entry points: launch/train.py (under a launcher) and
`mycodist train --nproc N` (starts the launcher). See docs/training.md."""
