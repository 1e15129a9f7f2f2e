"""MIRNet (Zamir et al., "Learning Enriched Features for Real Image Restoration and
Enhancement", ECCV 2020).

A full-resolution stream is kept through the network; each multi-scale residual
block (MSRB) runs ``height`` parallel streams at 1, 1/2, 1/4, ... resolution, with
``width`` columns of dual attention units, and the streams exchange information
through selective-kernel feature fusion (SKFF) at every column.

Two weight sharings of the reference implementation are reproduced exactly, since
official checkpoints (and the paper's 31.8M parameter count) depend on them:
the dual attention units of one stream are one module repeated across the columns,
and one PReLU module is shared by every dual attention unit of the network.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import Architecture, Variant, count_indices
from .blocks import SKFF, ResidualGroup, ScaleChain, check_input_size, conv


class SpatialAttention(nn.Module):
    """Sigmoid gate from a 5x5 conv over the channel-wise max and mean."""

    def __init__(self, kernel_size: int = 5) -> None:
        super().__init__()
        self.spatial = nn.Module()
        self.spatial.conv = nn.Conv2d(2, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial.conv(pooled))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate."""

    def __init__(self, channels: int, reduction: int = 8, bias: bool = False) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=bias), nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=bias), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.conv_du(self.avg_pool(x))


class DualAttentionUnit(nn.Module):
    """conv, PReLU, conv, then spatial and channel attention fused by a 1x1 conv, plus a skip."""

    def __init__(self, channels: int, act: nn.Module, kernel_size: int = 3, reduction: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels, kernel_size), act, conv(channels, channels, kernel_size))
        self.SA = SpatialAttention()
        self.CA = ChannelAttention(channels, reduction)
        self.conv1x1 = nn.Conv2d(channels * 2, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        return x + self.conv1x1(torch.cat([self.SA(feats), self.CA(feats)], dim=1))


class AntiAliasDownsample(nn.Module):
    """Blur with a normalised [1, 2, 1] binomial kernel (reflect padding), then stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("filt", (kernel / kernel.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class ResidualDownsample(nn.Module):
    """Halves resolution and doubles channels: conv path plus anti-aliased shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.top = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False), nn.PReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.PReLU(),
            AntiAliasDownsample(channels), nn.Conv2d(channels, channels * 2, 1, bias=False))
        self.bot = nn.Sequential(AntiAliasDownsample(channels), nn.Conv2d(channels, channels * 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(x) + self.bot(x)


class ResidualUpsample(nn.Module):
    """Doubles resolution and halves channels: transposed-conv path plus bilinear shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.top = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=False), nn.PReLU(),
            nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.PReLU(), nn.Conv2d(channels, channels // 2, 1, bias=False))
        self.bot = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                 nn.Conv2d(channels, channels // 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(x) + self.bot(x)


def downsample(channels: int, factor: int, stride: int) -> ScaleChain:
    return ScaleChain(channels, factor, ResidualDownsample, lambda c: int(c * stride))


def upsample(channels: int, factor: int, stride: int) -> ScaleChain:
    return ScaleChain(channels, factor, ResidualUpsample, lambda c: c // stride)


class MultiScaleResidualBlock(nn.Module):
    """MSRB: ``height`` resolution streams x ``width`` columns of dual attention units."""

    def __init__(self, n_feat: int, height: int, width: int, stride: int, bias: bool, act: nn.Module) -> None:
        super().__init__()
        self.height, self.width = height, width
        feats = [int(n_feat * stride ** i) for i in range(height)]
        # One unit per stream, repeated across the columns (shared weights).
        self.blocks = nn.ModuleList(nn.ModuleList([DualAttentionUnit(f, act)] * width) for f in feats)
        self.last_up = nn.ModuleDict({str(i): upsample(feats[i], 2 ** i, stride) for i in range(1, height)})
        scales = [2 ** i for i in range(height - 1, 0, -1)]  # largest first, as in the reference layout
        self.down = nn.ModuleDict()
        for i, f in enumerate(feats):
            for s in scales[i:]:
                self.down[f"{f}_{s}"] = downsample(f, s, stride)
        self.up = nn.ModuleDict()
        for i, f in enumerate(reversed(feats)):
            for s in scales[i:]:
                self.up[f"{f}_{s}"] = upsample(f, s, stride)
        self.conv_out = nn.Conv2d(n_feat, n_feat, 3, padding=1, bias=bias)
        self.selective_kernel = nn.ModuleList(SKFF(int(n_feat * stride ** i), height) for i in range(height))

    def _resample(self, x: torch.Tensor, src: int, dst: int) -> torch.Tensor:
        """Move stream ``src``'s features to stream ``dst``'s resolution."""
        if src == dst:
            return x
        table = self.up if src > dst else self.down
        return table[f"{x.shape[1]}_{2 ** abs(src - dst)}"](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        streams = []
        feats = x
        for j in range(self.height):
            if j > 0:
                feats = self.down[f"{feats.shape[1]}_2"](feats)
            feats = self.blocks[j][0](feats)
            streams.append(feats)
        for col in range(1, self.width):
            fused = [self.selective_kernel[j]([self._resample(s, k, j) for k, s in enumerate(streams)])
                     for j in range(self.height)]
            streams = [self.blocks[j][col](fused[j]) for j in range(self.height)]
        merged = [streams[0]] + [self.last_up[str(k)](streams[k]) for k in range(1, self.height)]
        return x + self.conv_out(self.selective_kernel[0](merged))


class MIRNet(nn.Module):
    """MIRNet. Keyword names and defaults follow the official constructor."""

    arch = "mirnet"

    def __init__(self, in_channels: int = 3, out_channels: int = 3, n_feat: int = 64, kernel_size: int = 3,
                 stride: int = 2, n_RRG: int = 3, n_MSRB: int = 2, height: int = 3, width: int = 2,
                 bias: bool = False) -> None:
        super().__init__()
        if in_channels != out_channels:
            raise ValueError("MIRNet adds its input to its output: in_channels must equal out_channels")
        if stride != 2:
            raise ValueError(f"MIRNet's resampling units change channels by 2; stride={stride} is not supported")
        self.size_multiple = 2 ** (height - 1)
        shared_prelu = nn.PReLU()  # one activation for every dual attention unit, as in the reference code
        self.conv_in = nn.Conv2d(in_channels, n_feat, kernel_size, padding=(kernel_size - 1) // 2, bias=bias)
        self.body = nn.Sequential(*(
            ResidualGroup([MultiScaleResidualBlock(n_feat, height, width, stride, bias, shared_prelu)
                           for _ in range(n_MSRB)], n_feat)
            for _ in range(n_RRG)))
        self.conv_out = nn.Conv2d(n_feat, out_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.size_multiple, "MIRNet")
        return x + self.conv_out(self.body(self.conv_in(x)))


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """MIRNet's constructor keywords from a state_dict's keys and shapes, or None if it is not MIRNet's."""
    keys = list(state_dict)
    if "conv_in.weight" not in state_dict or "conv_out.weight" not in state_dict or not any(".blocks." in k for k in keys):
        return None
    w_in, w_out = state_dict["conv_in.weight"], state_dict["conv_out.weight"]
    return {
        "in_channels": int(w_in.shape[1]), "out_channels": int(w_out.shape[0]), "n_feat": int(w_in.shape[0]),
        "bias": "conv_in.bias" in state_dict, "kernel_size": int(w_in.shape[-1]),
        "n_RRG": count_indices(keys, r"body\.(\d+)\."),
        "n_MSRB": count_indices(keys, r"body\.0\.body\.(\d+)\.blocks\."),
        "height": count_indices(keys, r"body\.0\.body\.0\.blocks\.(\d+)\."),
        "width": count_indices(keys, r"body\.0\.body\.0\.blocks\.0\.(\d+)\."),
    }


ARCHITECTURE = Architecture(
    "mirnet", MIRNet, aliases=("mirnet", "mirnetv1"),
    size_multiple=lambda config: 2 ** (int(config["height"]) - 1),
    input_channels=lambda config: int(config["in_channels"]),
    infer_config=infer_config,
    variants={
        "mirnet-paper": Variant({}, "MIRNet at the paper's configuration (31.8M parameters)."),
        "mirnet-tiny": Variant({"n_feat": 8, "n_RRG": 1, "n_MSRB": 1, "height": 2, "width": 2},
                               "Smallest MIRNet configuration, for tests."),
    })
