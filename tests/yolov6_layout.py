"""A YOLOv6-style detector, pickled as its trainer saves it (issue 23).

Written for these tests from a reading of meituan/YOLOv6 (yolov6/layers/common.py,
yolov6/utils/checkpoint.py, yolov6/core/engine.py): `RepVGGBlock` with `rbr_dense`/`rbr_1x1` as
`ConvModule(conv, bn)` and an identity BN, `se` and `nonlinearity`, `ConvModule` with
`forward_fuse`; no model-level fuse: the loader's `fuse_model` folds every `ConvModule` that
still `hasattr(m, "bn")`. The checkpoint is `{'model': model.half(), 'ema': ema.half(),
'updates': ..., 'optimizer': ..., 'epoch': ...}`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ConvModule(nn.Module):
    def __init__(self, cin, cout, k, s, act=None, padding=None, groups=1, bias=False):
        super().__init__()
        padding = k // 2 if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, k, s, padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)
        if act is not None:
            self.act = act

    def forward(self, x):
        if hasattr(self, "act"):
            return self.act(self.bn(self.conv(x)))
        return self.bn(self.conv(x))

    def forward_fuse(self, x):
        if hasattr(self, "act"):
            return self.act(self.conv(x))
        return self.conv(x)


class RepVGGBlock(nn.Module):
    def __init__(self, cin, cout, k=3, s=1, padding=1):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(cin) if cout == cin and s == 1 else None
        self.rbr_dense = ConvModule(cin, cout, k, s, padding=padding)
        self.rbr_1x1 = ConvModule(cin, cout, 1, s, padding=padding - k // 2)

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class Detect(nn.Module):
    """Decoupled head: per level a stem, a cls and a reg branch (ConvBNSiLU units), preds."""

    def __init__(self, nc, ch):
        super().__init__()
        self.nc, self.nl = nc, len(ch)
        self.stride = torch.tensor([4.0, 8.0])
        self.stems = nn.ModuleList(ConvModule(c, c, 1, 1, nn.SiLU()) for c in ch)
        self.cls_convs = nn.ModuleList(ConvModule(c, c, 3, 1, nn.SiLU()) for c in ch)
        self.reg_convs = nn.ModuleList(ConvModule(c, c, 3, 1, nn.SiLU()) for c in ch)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, nc, 1) for c in ch)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4, 1) for c in ch)

    def forward(self, x):
        outs = []
        for i in range(self.nl):
            f = self.stems[i](x[i])
            cls = self.cls_preds[i](self.cls_convs[i](f)).sigmoid()
            reg = self.reg_preds[i](self.reg_convs[i](f))
            outs.append(torch.cat([reg, cls], 1).flatten(2))
        return torch.cat(outs, 2).permute(0, 2, 1)


class Model(nn.Module):
    def __init__(self, nc: int = 3, w: int = 8):
        super().__init__()
        self.backbone = nn.ModuleList(
            [RepVGGBlock(3, w, 3, 2), RepVGGBlock(w, w), RepVGGBlock(w, 2 * w, 3, 2)]
        )
        self.neck = RepVGGBlock(2 * w, 2 * w)
        self.detect = Detect(nc, (w, 2 * w))
        self.stride = self.detect.stride

    def forward(self, x):
        x = self.backbone[0](x)
        p1 = self.backbone[1](x)
        p2 = self.neck(self.backbone[2](p1))
        return self.detect([p1, p2])


def fuse_model(model: nn.Module) -> nn.Module:
    """yolov6/utils/torch_utils.py: fold every ConvModule that still has a `bn`."""
    for m in model.modules():
        if type(m) is ConvModule and hasattr(m, "bn"):
            scale = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
            fused = nn.Conv2d(
                m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.stride,
                m.conv.padding, groups=m.conv.groups, bias=True,
            ).requires_grad_(False).to(m.conv.weight.dtype)  # fmt: skip
            with torch.no_grad():
                fused.weight.copy_(m.conv.weight * scale.view(-1, 1, 1, 1))
                fused.bias.copy_(m.bn.bias - scale * m.bn.running_mean)
            m.conv = fused
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def trainer_checkpoint(seed: int = 0) -> dict:
    model = randomize(Model(), seed).train()
    ema = randomize(Model(), seed + 1).requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return {
        "model": copy.deepcopy(model).half(),
        "ema": copy.deepcopy(ema).half(),
        "updates": 800,
        "optimizer": optimizer.state_dict(),
        "epoch": 399,
    }
