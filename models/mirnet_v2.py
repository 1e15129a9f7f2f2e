"""MIRNet-v2 (Zamir et al., "Learning Enriched Features for Fast Image Restoration and
Enhancement", TPAMI 2022).

Lighter than MIRNet: residual context blocks (RCB) with global context modelling
replace the dual attention units, the three streams are fused coarse-to-fine by
two-input SKFF, resampling is average-pool / bilinear with a 1x1 conv, and the four
residual groups use grouped convolutions with 1, 2, 4, 4 groups.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .architecture import Architecture, Variant, count_indices
from .blocks import SKFF, ResidualGroup, ScaleChain, check_input_size

GROUPS_PER_RRG = (1, 2, 4, 4)


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.2)


class ContextBlock(nn.Module):
    """Global context: a softmax-weighted spatial pooling, transformed and added to every pixel."""

    def __init__(self, channels: int, bias: bool = False) -> None:
        super().__init__()
        self.conv_mask = nn.Conv2d(channels, 1, 1, bias=bias)
        self.channel_add_conv = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=bias), _leaky(), nn.Conv2d(channels, channels, 1, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attention = self.conv_mask(x).view(b, 1, h * w).softmax(dim=-1)  # B, 1, HW
        context = torch.bmm(x.view(b, c, h * w), attention.transpose(1, 2)).view(b, c, 1, 1)
        return x + self.channel_add_conv(context)


class ResidualContextBlock(nn.Module):
    """RCB: grouped conv, LeakyReLU, grouped conv, global context, LeakyReLU, plus a skip."""

    def __init__(self, channels: int, bias: bool = False, groups: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias, groups=groups), _leaky(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias, groups=groups))
        self.act = _leaky()
        self.gcnet = ContextBlock(channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.gcnet(self.body(x)))


class PoolDown(nn.Module):
    def __init__(self, channels: int, chan_factor: float, bias: bool = False) -> None:
        super().__init__()
        self.bot = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
                                 nn.Conv2d(channels, int(channels * chan_factor), 1, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bot(x)


class BilinearUp(nn.Module):
    def __init__(self, channels: int, chan_factor: float, bias: bool = False) -> None:
        super().__init__()
        self.bot = nn.Sequential(nn.Conv2d(channels, int(channels // chan_factor), 1, bias=bias),
                                 nn.Upsample(scale_factor=2, mode="bilinear", align_corners=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bot(x)


def _down(channels: int, chan_factor: float) -> ScaleChain:
    return ScaleChain(channels, 2, lambda c: PoolDown(c, chan_factor), lambda c: int(c * chan_factor))


def _up(channels: int, chan_factor: float) -> ScaleChain:
    return ScaleChain(channels, 2, lambda c: BilinearUp(c, chan_factor), lambda c: int(c // chan_factor))


class MultiResolutionBlock(nn.Module):
    """MRB: three streams, two rounds of RCBs with coarse-to-fine two-input SKFF."""

    def __init__(self, n_feat: int, chan_factor: float, bias: bool, groups: int) -> None:
        super().__init__()
        top, mid, bot = (int(n_feat * chan_factor ** i) for i in range(3))
        self.dau_top = ResidualContextBlock(top, bias=bias, groups=groups)
        self.dau_mid = ResidualContextBlock(mid, bias=bias, groups=groups)
        self.dau_bot = ResidualContextBlock(bot, bias=bias, groups=groups)
        self.down2 = _down(top, chan_factor)
        self.down4 = nn.Sequential(_down(top, chan_factor), _down(mid, chan_factor))
        self.up21_1 = _up(mid, chan_factor)
        self.up21_2 = _up(mid, chan_factor)
        self.up32_1 = _up(bot, chan_factor)
        self.up32_2 = _up(bot, chan_factor)
        self.conv_out = nn.Conv2d(n_feat, n_feat, 1, bias=bias)
        self.skff_top = SKFF(top, 2, act=_leaky)
        self.skff_mid = SKFF(mid, 2, act=_leaky)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_top, x_mid, x_bot = x, self.down2(x), self.down4(x)
        for up32, up21 in ((self.up32_1, self.up21_1), (self.up32_2, self.up21_2)):
            x_top, x_mid, x_bot = self.dau_top(x_top), self.dau_mid(x_mid), self.dau_bot(x_bot)
            x_mid = self.skff_mid([x_mid, up32(x_bot)])
            x_top = self.skff_top([x_top, up21(x_mid)])
        return x + self.conv_out(x_top)


class MIRNetV2(nn.Module):
    """MIRNet-v2. Keyword names and defaults follow the official constructor.

    ``task="defocus_deblurring"`` selects the variant whose global skip is in feature
    space (shallow features added before ``conv_out``) instead of image space.
    ``n_RRG`` is honoured (the reference code always builds four groups); groups
    beyond the fourth use 4 convolution groups.
    """

    arch = "mirnet_v2"
    size_multiple = 4

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, n_feat: int = 80, chan_factor: float = 1.5,
                 n_RRG: int = 4, n_MRB: int = 2, height: int = 3, width: int = 2, scale: int = 1,
                 bias: bool = False, task: str | None = None) -> None:
        super().__init__()
        if (height, width) != (3, 2):
            raise ValueError(f"MIRNet-v2 is defined for height=3, width=2 (got height={height}, width={width})")
        if task != "defocus_deblurring" and inp_channels != out_channels:
            raise ValueError("MIRNet-v2 adds its input to its output: inp_channels must equal out_channels "
                             "(except with task='defocus_deblurring')")
        self.task = task
        groups = [GROUPS_PER_RRG[min(i, len(GROUPS_PER_RRG) - 1)] for i in range(n_RRG)]
        self.conv_in = nn.Conv2d(inp_channels, n_feat, 3, padding=1, bias=bias)
        self.body = nn.Sequential(*(
            ResidualGroup([MultiResolutionBlock(n_feat, chan_factor, bias, g) for _ in range(n_MRB)], n_feat, bias)
            for g in groups))
        self.conv_out = nn.Conv2d(n_feat, out_channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.size_multiple, "MIRNet-v2")
        shallow = self.conv_in(x)
        deep = self.body(shallow)
        if self.task == "defocus_deblurring":
            return self.conv_out(deep + shallow)
        return x + self.conv_out(deep)


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """MIRNet-v2's constructor keywords from a state_dict's keys and shapes, or None if it is not v2's."""
    mid = "body.0.body.0.dau_mid.body.0.weight"
    if "conv_in.weight" not in state_dict or "conv_out.weight" not in state_dict or mid not in state_dict:
        return None
    keys = list(state_dict)
    w_in, w_out = state_dict["conv_in.weight"], state_dict["conv_out.weight"]
    n_feat = int(w_in.shape[0])
    config = {
        "inp_channels": int(w_in.shape[1]), "out_channels": int(w_out.shape[0]), "n_feat": n_feat,
        "bias": "conv_in.bias" in state_dict, "chan_factor": float(state_dict[mid].shape[0]) / n_feat,
        "n_RRG": count_indices(keys, r"body\.(\d+)\."),
        "n_MRB": count_indices(keys, r"body\.0\.body\.(\d+)\.dau_top\."),
    }
    if config["inp_channels"] != config["out_channels"]:
        config["task"] = "defocus_deblurring"
    return config


ARCHITECTURE = Architecture(
    "mirnet_v2", MIRNetV2, aliases=("mirnet_v2", "mirnetv2"),
    size_multiple=lambda config: MIRNetV2.size_multiple,
    input_channels=lambda config: int(config["inp_channels"]),
    infer_config=infer_config,
    variants={
        "mirnet-v2-paper": Variant({}, "MIRNet-v2 at the paper's configuration (5.9M parameters)."),
        "mirnet-v2-tiny": Variant({"n_feat": 4, "n_RRG": 1, "n_MRB": 1},
                                  "Smallest MIRNet-v2 configuration (3.4k parameters), for memory and speed tests."),
    })
