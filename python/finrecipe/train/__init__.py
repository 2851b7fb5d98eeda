"""Training: packed token data, the trainer, checkpoints, metrics, torchrun launch.

Import submodules directly (``finrecipe.train.trainer``); they import torch.
"""
