"""Residual networks for small images, built from :mod:`swav_ref.nn.layers`.

The backbone knows nothing of SwAV: images (N, C, H, W) in, features (N, D) out, with
``D = out_dim`` the last stage's width. The layout is the usual CIFAR ResNet-18 of
self-supervised papers: the ImageNet network's stages of :class:`BasicBlock` (widths
doubling, the first block of each stage from the second on halving the resolution, with a
1x1-convolution shortcut where the shape changes), but a small-image stem as He et al.
(2016, section 4.2) use for 32x32 images: one 3x3 stride-1 convolution with BatchNorm and
ReLU, no max-pool; then global average pooling. (He et al.'s own CIFAR networks are
narrower, three stages of 16, 32 and 64 channels.) Parameter names
follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.0.weight``), so a state dict can be held against a PyTorch model.

Multi-crop: SwAV sends the crops of one size through the network together (one forward per
size group, so BatchNorm statistics are per group). :meth:`ResNet.forward_groups` and
:meth:`ResNet.backward_groups` do exactly that; the backwards run newest first and the
parameter gradients add up, as with autograd over several forward passes.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import numpy as np

from swav_ref.backend import Random
from swav_ref.nn import functional as F
from swav_ref.nn.layers import BatchNorm2d, Conv2d, GlobalAvgPool, Module, ReLU, Sequential, _as_random

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet_tiny"]


class BasicBlock(Module):
    r"""Two 3x3 convolutions with BatchNorm and a residual connection.

    Parameters
    ----------
    in_planes, planes : int
        Input and output channels.
    stride : int
        Stride of the first convolution (2 halves the resolution).
    rng : Random or int seed
        for the initial weights (``None``: seed 0)
    xp
        array namespace of the parameters, or a backend name (``"numpy"``, ``"cupy"``)
    dtype
        ``"float32"`` (training) or ``"float64"`` (gradient checks)

    Notes
    -----
    .. math:: y = \operatorname{relu}\big(\operatorname{bn}_2(W_2 * \operatorname{relu}(
              \operatorname{bn}_1(W_1 * x))) + S(x)\big)

    where the shortcut :math:`S` is the identity when the shape is kept, and a 1x1
    convolution of stride ``stride`` followed by BatchNorm (``downsample``) when the stride
    or the channel count changes. In the backward the gradient of the sum reaches both
    branches unchanged and the two input gradients add up.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        rng: Random | int | None = None,
        xp: types.ModuleType = np,
        dtype: Any = "float32",
    ):
        super().__init__(xp, dtype)
        xp = self.xp  # the namespace, also when a backend name was given
        rng = _as_random(rng)
        kw = dict(xp=xp, dtype=dtype)
        self.conv1 = Conv2d(in_planes, planes, 3, stride, 1, rng=rng, **kw)
        self.bn1 = BatchNorm2d(planes, **kw)
        self.relu1 = ReLU(**kw)
        self.conv2 = Conv2d(planes, planes, 3, 1, 1, rng=rng, **kw)
        self.bn2 = BatchNorm2d(planes, **kw)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = Sequential(
                Conv2d(in_planes, planes, 1, stride, 0, rng=rng, **kw), BatchNorm2d(planes, **kw)
            )
        self.relu2 = ReLU(**kw)

    def forward(self, x: Any) -> Any:
        out = self.relu1.forward(self.bn1.forward(self.conv1.forward(x)))
        out = self.bn2.forward(self.conv2.forward(out))
        shortcut = x if self.downsample is None else self.downsample.forward(x)
        out, _ = F.add_forward(out, shortcut)
        return self.relu2.forward(out)

    def backward(self, dout: Any) -> Any:
        d_main, d_shortcut = F.add_backward(self.relu2.backward(dout))
        d_main = self.conv2.backward(self.bn2.backward(d_main))
        dx = self.conv1.backward(self.bn1.backward(self.relu1.backward(d_main)))
        if self.downsample is not None:
            d_shortcut = self.downsample.backward(d_shortcut)
        return dx + d_shortcut


class ResNet(Module):
    """A ResNet backbone for small images: features (N, ``out_dim``), no classifier.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for digits, 3 for colour).
    widths : sequence of int
        Channels of each stage; ``out_dim = widths[-1]``.
    blocks : sequence of int
        :class:`BasicBlock` count of each stage (same length as ``widths``).
    zero_init_residual : bool
        Start every block's last BatchNorm at weight 0, so each block begins as the
        identity (an option of the official SwAV ResNet; off by default there too).
    rng : Random or int seed
        for the initial weights
    xp
        array namespace of the parameters, or a backend name (``"numpy"``, ``"cupy"``)
    dtype
        ``"float32"`` (training) or ``"float64"`` (gradient checks)

    Notes
    -----
    Spatial size: the stem keeps H x W; stage ``k >= 2`` halves it (stride-2 first block),
    so 32x32 inputs end at 4x4 after four stages and 8x8 digits at 2x2 after three.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
        *,
        zero_init_residual: bool = False,
        rng: Random | int | None = 0,
        xp: types.ModuleType = np,
        dtype: Any = "float32",
    ):
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {tuple(widths)} and blocks {tuple(blocks)} need the same, non-zero length")
        if min(widths) < 1 or min(blocks) < 1 or in_channels < 1:
            raise ValueError(f"channels and block counts must be positive: {in_channels}, {widths}, {blocks}")
        super().__init__(xp, dtype)
        xp = self.xp  # the namespace, also when a backend name was given
        rng = _as_random(rng)
        kw = dict(xp=xp, dtype=dtype)
        self.in_channels, self.widths, self.blocks = in_channels, tuple(widths), tuple(blocks)
        self.out_dim = int(widths[-1])
        self.conv1 = Conv2d(in_channels, widths[0], 3, 1, 1, rng=rng, **kw)
        self.bn1 = BatchNorm2d(widths[0], **kw)
        self.relu = ReLU(**kw)
        self.stages = []
        in_planes = widths[0]
        for index, (planes, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            stage = Sequential(
                *[BasicBlock(in_planes if b == 0 else planes, planes, stride if b == 0 else 1, rng=rng, **kw)
                  for b in range(count)]
            )  # fmt: skip
            setattr(self, f"layer{index + 1}", stage)
            self.stages.append(stage)
            in_planes = planes
        self.avgpool = GlobalAvgPool(**kw)
        if zero_init_residual:
            for _, module in self.named_modules():
                if isinstance(module, BasicBlock):
                    p = module.bn2.params["weight"]
                    module.bn2.params["weight"] = xp.zeros(p.shape, dtype=p.dtype)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, widths={self.widths}, blocks={self.blocks}, out_dim={self.out_dim}"

    def forward(self, x: Any) -> Any:
        """Images (N, in_channels, H, W) -> features (N, out_dim)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResNet expects images (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        out = self.relu.forward(self.bn1.forward(self.conv1.forward(x)))
        for stage in self.stages:
            out = stage.forward(out)
        return self.avgpool.forward(out)

    def backward(self, dfeatures: Any) -> Any:
        """Gradient of the newest pending forward: d features (N, out_dim) -> d images."""
        self._check_gradient(dfeatures)  # before any layer pops its cache
        d = self.avgpool.backward(dfeatures)
        for stage in reversed(self.stages):
            d = stage.backward(d)
        return self.conv1.backward(self.bn1.backward(self.relu.backward(d)))

    def forward_groups(self, batches: Sequence[Any]) -> list[Any]:
        """One forward per crop-size group: ``[forward(b) for b in batches]``.

        Each group is normalised with its own BatchNorm statistics, as in the official SwAV
        code (which concatenates the crops of one size and runs them together).
        """
        return [self.forward(batch) for batch in batches]

    def backward_groups(self, dfeatures: Sequence[Any]) -> list[Any]:
        """Backwards for :meth:`forward_groups`, ``dfeatures[i]`` matching ``batches[i]``.

        They run last group first (the cache stack is last in, first out) and the parameter
        gradients accumulate. Returns the input gradients in the order of the groups.
        """
        if len(dfeatures) > len(self.conv1._caches):
            raise ValueError(
                f"{len(dfeatures)} gradients given but only {len(self.conv1._caches)} forwards are pending"
            )
        dinputs = [self.backward(d) for d in reversed(list(dfeatures))]
        return dinputs[::-1]


def resnet_tiny(in_channels: int = 1, **kwargs: Any) -> ResNet:
    """16-32-64 channels, one block per stage: for 8x8 digits (out_dim 64, 77k weights)."""
    return ResNet(in_channels, widths=(16, 32, 64), blocks=(1, 1, 1), **kwargs)


def resnet18(in_channels: int = 3, **kwargs: Any) -> ResNet:
    """ResNet-18 in the CIFAR layout: 64-128-256-512, two blocks per stage, 3x3 stride-1
    stem, no max-pool (out_dim 512, 11.17M weights)."""
    return ResNet(in_channels, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), **kwargs)
