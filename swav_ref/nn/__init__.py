"""A tiny deep-learning kit with hand-written backward passes.

- :mod:`~swav_ref.nn.functional` -- pure ``*_forward`` / ``*_backward`` pairs (convolution
  via im2col, BatchNorm with optional sync, ReLU, linear, pooling, residual add, softmax
  cross-entropy, L2 normalisation).
- :mod:`~swav_ref.nn.layers` -- stateful Modules over them (params/grads/buffers dicts,
  train/eval, state dicts with PyTorch names, a LIFO cache stack for several forwards).
- :mod:`~swav_ref.nn.resnet` -- BasicBlock, ResNet, ``resnet_tiny`` and ``resnet18``.
- :mod:`~swav_ref.nn.optim` -- SGD, LARS and the warm-up + cosine schedule.
- :mod:`~swav_ref.nn.gradcheck` -- central-difference gradient checks.

Nothing here knows about SwAV.
"""

from swav_ref.nn import functional, gradcheck
from swav_ref.nn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    GlobalAvgPool,
    Linear,
    MaxPool2d,
    Module,
    ReLU,
    Sequential,
)
from swav_ref.nn.optim import LARS, SGD, warmup_cosine_schedule
from swav_ref.nn.resnet import BasicBlock, ResNet, resnet18, resnet_tiny

__all__ = [
    "LARS",
    "SGD",
    "BasicBlock",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "GlobalAvgPool",
    "Linear",
    "MaxPool2d",
    "Module",
    "ReLU",
    "ResNet",
    "Sequential",
    "functional",
    "gradcheck",
    "resnet18",
    "resnet_tiny",
    "warmup_cosine_schedule",
]
