"""ResNet / ResNeXt bodies from torchvision, FPN P3-P7 and modulated deformable convs.

The body returns C3, C4, C5 (strides 8, 16, 32). The FPN follows the official
"R-50-FPN-RETINANET": 1x1 laterals on C3-C5, nearest top-down upsampling, 3x3 output convs,
P6 = 3x3/2 conv on P5, P7 = 3x3/2 conv on ReLU(P6), kaiming_uniform(a=1) init (spec 2.2).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d, deform_conv2d

_BODY_CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
    "resnext101_32x8d": (512, 1024, 2048),
    "resnext101_64x4d": (512, 1024, 2048),
}


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 with one deformable group (``torchvision.ops.deform_conv2d`` with a mask).

    A regular conv (``offset_mask``) predicts ``2*k*k`` offsets and ``k*k`` mask logits. The
    initialisation is the official code's (``DFConv2d`` around ``ModulatedDeformConv``): the
    deformable weights ~ U(+-1/sqrt(in_channels * k * k)), bias 0; the offset conv
    kaiming_uniform(a=1), bias 0, so offsets start small but non-zero and masks near
    ``sigmoid(0) = 0.5``. The head re-initialises its offset convs (see :mod:`detector.head`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)  # official: in_channels, not per group
        nn.init.uniform_(self.weight, -bound, bound)
        taps = kernel_size * kernel_size
        self.offset_mask = nn.Conv2d(in_channels, 3 * taps, kernel_size, stride, padding, dilation, bias=True)
        nn.init.kaiming_uniform_(self.offset_mask.weight, a=1)
        nn.init.zeros_(self.offset_mask.bias)

    def forward(self, x: Tensor) -> Tensor:
        taps = self.kernel_size * self.kernel_size
        om = self.offset_mask(x)
        offset, mask = om[:, : 2 * taps], om[:, 2 * taps:].sigmoid()
        return deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ModulatedDeformConv2d":
        """A DCN with ``conv``'s shape, stride and weights (so pretrained weights still load into it);
        its offset conv is initialised as in the official backbone (kaiming_uniform(a=1))."""
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                conv.dilation[0], conv.groups, conv.bias is not None)
        with torch.no_grad():
            m.weight.copy_(conv.weight)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        return m


class ResNetBody(nn.Module):
    """torchvision ResNet/ResNeXt without the classifier, returning ``[C3, C4, C5]``.

    ``frozen_bn``: FrozenBatchNorm2d everywhere (paper); else BatchNorm2d.
    ``frozen_stages``: 1 = stem, 2 = stem + res2 (layer1), ... get ``requires_grad=False``.
    ``dcn_stages``: stages (3, 4, 5 = layer2..layer4) whose 3x3 convs become DCNv2.
    ``pretrained_path``: a torchvision ImageNet state_dict file loaded before freezing.
    """

    def __init__(self, name: str, frozen_bn: bool = True, frozen_stages: int = 2,
                 dcn_stages: tuple[int, ...] = (), pretrained_path: str = "") -> None:
        super().__init__()
        if name not in _BODY_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_BODY_CHANNELS)}")
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
        if pretrained_path:
            load_pretrained(net, pretrained_path, name)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = _BODY_CHANNELS[name]
        for stage in dcn_stages:
            for block in getattr(self, f"layer{stage - 1}"):
                # Bottleneck: the 3x3 is conv2 (torchvision puts the stride there); BasicBlock: conv2 too.
                block.conv2 = ModulatedDeformConv2d.from_conv(block.conv2)
        modules = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        for module in modules[:frozen_stages]:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.layer1(self.stem(x))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def load_pretrained(net: nn.Module, path: str, name: str) -> None:
    """Load a torchvision ImageNet state_dict from ``path`` into ``net`` (the ``fc`` head may be
    missing or different); raises ``FileNotFoundError``/``ValueError`` naming what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_path {path!r} for backbone {name!r} does not exist (nothing is "
                                f"downloaded; point it at a local torchvision state_dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise ValueError(f"pretrained_path {path!r} is not a readable torch state_dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained_path {path!r} holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    # FrozenBatchNorm2d has no num_batches_tracked; a BN checkpoint carries it.
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if wrong:
            details.append(f"shape mismatch for {wrong[:3]}: file {[tuple(state[k].shape) for k in wrong[:3]]} "
                           f"vs model {[tuple(own[k].shape) for k in wrong[:3]]}")
        raise ValueError(f"pretrained_path {path!r} does not fit backbone {name!r}: " + "; ".join(details))
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


class FPN(nn.Module):
    """Feature pyramid P3-P7 on ``[C3, C4, C5]`` (no norm, no ReLU except before P7)."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        inner = self.lateral[-1](feats[-1])
        outs = [self.output[-1](inner)]
        for i in range(len(feats) - 2, -1, -1):
            lat = self.lateral[i](feats[i])
            inner = lat + F.interpolate(inner, size=lat.shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](inner))
        p6 = self.p6(outs[-1])
        p7 = self.p7(F.relu(p6))
        return outs + [p6, p7]


class BackboneFPN(nn.Module):
    """Body + FPN: image float[B, 3, H, W] -> ``[P3, P4, P5, P6, P7]`` (strides 8..128)."""

    def __init__(self, body: ResNetBody, fpn_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FPN(body.out_channels, fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(x))
