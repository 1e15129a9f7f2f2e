"""Building blocks shared by MIRNet and MIRNet-v2.

Module and attribute names follow the official checkpoints' state_dict layout, so
that official weights load without renaming.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn


def conv(in_ch: int, out_ch: int, kernel_size: int, bias: bool = False, groups: int = 1) -> nn.Conv2d:
    """Same-size convolution (padding ``kernel_size // 2``)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias, groups=groups)


class SKFF(nn.Module):
    """Selective-kernel feature fusion of ``height`` same-shape streams.

    The streams are summed, squeezed by global average pooling, and each stream gets
    a per-channel weight from a softmax taken across the streams.
    """

    def __init__(self, channels: int, height: int, reduction: int = 8, bias: bool = False,
                 act: Callable[[], nn.Module] = nn.PReLU) -> None:
        super().__init__()
        self.height = height
        squeezed = max(int(channels / reduction), 4)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(nn.Conv2d(channels, squeezed, 1, bias=bias), act())
        self.fcs = nn.ModuleList(nn.Conv2d(squeezed, channels, 1, bias=bias) for _ in range(height))

    def forward(self, streams: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(streams), dim=1)  # B, height, C, H, W
        descriptor = self.conv_du(self.avg_pool(stacked.sum(dim=1)))
        weights = torch.stack([fc(descriptor) for fc in self.fcs], dim=1).softmax(dim=1)
        return (stacked * weights).sum(dim=1)


class ResidualGroup(nn.Module):
    """Recursive residual group: ``blocks``, a 3x3 conv, and a skip connection."""

    def __init__(self, blocks: Sequence[nn.Module], n_feat: int, bias: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(*blocks, conv(n_feat, n_feat, 3, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ScaleChain(nn.Module):
    """Changes resolution by ``factor`` (a power of two) with one ``step`` per octave.

    ``step(channels)`` builds a module acting at that channel count; the channel count
    for the next step is ``next_channels(channels)``.
    """

    def __init__(self, channels: int, factor: int, step: Callable[[int], nn.Module],
                 next_channels: Callable[[int], int]) -> None:
        super().__init__()
        octaves = int(math.log2(factor))
        if 2 ** octaves != factor:
            raise ValueError(f"scale factor must be a power of two, got {factor}")
        steps = []
        for _ in range(octaves):
            steps.append(step(channels))
            channels = next_channels(channels)
        self.body = nn.Sequential(*steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def check_input_size(x: torch.Tensor, multiple: int, arch: str) -> None:
    """Refuse inputs whose spatial size is not a multiple of the network's factor."""
    if x.dim() != 4:
        raise ValueError(f"{arch} expects a 4-D NCHW tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{arch} needs height and width that are multiples of {multiple}, got {h}x{w}; "
            f"pad the input (the restoration engine does this automatically)")
