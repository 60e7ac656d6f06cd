"""An ultralytics-style `DetectionModel`, pickled as its trainer saves it (issue 23).

Written for these tests from a reading of ultralytics/ultralytics (nn/modules/conv.py, block.py,
head.py, nn/tasks.py, engine/trainer.py): class and child names and forward arithmetic follow
upstream (`Conv` with `forward_fuse`, `RepConv` with `conv1`/`conv2`/`bn`, `fuse_convs` and an
identity kernel built with numpy in float32, `RepC3`, a `Detect` head with `cv2`/`cv3` and a
fixed `DFL` conv, `DetectionModel.fuse()` switching each unit to its fused forward), and so does
the checkpoint: `{'model': None, 'ema': model.half(), 'optimizer': ..., 'train_args': ...}`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def autopad(k: int, p: int | None = None) -> int:
    return k // 2 if p is None else p


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """utils/torch_utils.py's fold: a new conv with a bias, computing conv then bn (eval)."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        groups=conv.groups, bias=True,
    ).requires_grad_(False).to(conv.weight.dtype)  # fmt: skip
    scale = bn.weight / torch.sqrt(bn.eps + bn.running_var)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias - scale * bn.running_mean)
    return fused


class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = (
            self.default_act
            if act is True
            else act
            if isinstance(act, nn.Module)
            else nn.Identity()
        )

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class RepConv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, act=True, bn=False):
        super().__init__()
        assert k == 3 and p == 1
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = (
            self.default_act
            if act is True
            else act
            if isinstance(act, nn.Module)
            else nn.Identity()
        )
        self.bn = nn.BatchNorm2d(c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, Conv):
            kernel, bn = branch.conv.weight, branch.bn
        else:
            if not hasattr(self, "id_tensor"):
                input_dim = self.c1 // self.g
                kernel_value = np.zeros((self.c1, input_dim, 3, 3), dtype=np.float32)
                for i in range(self.c1):
                    kernel_value[i, i % input_dim, 1, 1] = 1
                self.id_tensor = torch.from_numpy(kernel_value).to(branch.weight.device)
            kernel, bn = self.id_tensor, branch
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return kernel * t, bn.bias - bn.running_mean * bn.weight / std

    def fuse_convs(self):
        if hasattr(self, "conv"):
            return
        k3, b3 = self._fuse_bn_tensor(self.conv1)
        k1, b1 = self._fuse_bn_tensor(self.conv2)
        kid, bid = self._fuse_bn_tensor(self.bn)
        c = self.conv1.conv
        self.conv = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups,
            bias=True,
        ).requires_grad_(False)  # fmt: skip
        self.conv.weight.data = k3 + nn.functional.pad(k1, [1, 1, 1, 1]) + kid
        self.conv.bias.data = b3 + b1 + bid
        for para in self.parameters():
            para.detach_()
        self.__delattr__("conv1")
        self.__delattr__("conv2")
        if hasattr(self, "bn"):
            self.__delattr__("bn")
        if hasattr(self, "id_tensor"):
            self.__delattr__("id_tensor")


class RepC3(nn.Module):
    def __init__(self, c1, c2, n=1, e=1.0):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.m = nn.Sequential(*[RepConv(c_, c_) for _ in range(n)])
        self.cv3 = Conv(c_, c2, 1, 1) if c_ != c2 else nn.Identity()

    def forward(self, x):
        return self.cv3(self.m(self.cv1(x)) + self.cv2(x))


class DFL(nn.Module):
    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        x = torch.arange(c1, dtype=torch.float)
        self.conv.weight.data[:] = nn.Parameter(x.view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats, strides, grid_cell_offset=0.5):
    anchor_points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        _, _, h, w = feats[i].shape
        sx = torch.arange(end=w, device=device, dtype=dtype) + grid_cell_offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + grid_cell_offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


def dist2bbox(distance, anchor_points, dim=-1):
    lt, rb = distance.chunk(2, dim)
    x1y1, x2y2 = anchor_points - lt, anchor_points + rb
    return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)


class Detect(nn.Module):
    shape = None

    def __init__(self, nc=80, ch=()):
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), 4
        self.no = nc + self.reg_max * 4
        self.stride = torch.zeros(self.nl)
        c2, c3 = max(8, ch[0] // 4, self.reg_max * 4), max(ch[0], min(self.nc, 16))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
            for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1)) for x in ch
        )
        self.dfl = DFL(self.reg_max)

    def forward(self, x):
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        if self.training:
            return x
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        self.anchors, self.strides = (a.transpose(0, 1) for a in make_anchors(x, self.stride, 0.5))
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), self.anchors.unsqueeze(0), dim=1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1), x


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class DetectionModel(nn.Module):
    """A small RT-DETR-flavoured YOLO: what `parse_model` builds (layers with `f`, `i`,
    `type`), run by `_predict_once`."""

    def __init__(self, nc: int = 3, ch: int = 3, width: int = 8):
        super().__init__()
        w = width
        layers = [
            (-1, Conv(ch, w, 3, 2)),
            (-1, RepC3(w, w, n=2)),
            (-1, Conv(w, 2 * w, 3, 2)),
            (-1, RepC3(2 * w, 2 * w, n=1, e=0.5)),
            ([1, 3], Detect(nc, (w, 2 * w))),
        ]
        for i, (f, m) in enumerate(layers):
            m.f, m.i, m.type = f, i, type(m).__name__
        self.model = nn.Sequential(*(m for _, m in layers))
        self.save = [1, 3]
        self.model[-1].stride = torch.tensor([2.0, 4.0])
        self.stride = self.model[-1].stride
        self.names = {k: f"class{k}" for k in range(nc)}
        self.yaml = {"nc": nc, "ch": ch}

    def forward(self, x):
        return self._predict_once(x)

    def _predict_once(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def fuse(self, verbose=True):
        for m in self.model.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
            if isinstance(m, RepConv):
                m.fuse_convs()
                m.forward = m.forward_fuse
        return self


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
    """What ultralytics' trainer saves: no `model`, the EMA in float16, the optimizer's state."""
    ema = randomize(DetectionModel(), seed).requires_grad_(False)
    optimizer = torch.optim.AdamW(DetectionModel().parameters(), lr=1e-3)
    return {
        "epoch": 99,
        "best_fitness": 0.4,
        "model": None,
        "ema": copy.deepcopy(ema).half(),
        "updates": 500,
        "optimizer": optimizer.state_dict(),
        "train_args": {"imgsz": 32, "task": "detect"},
        "date": "2026-12-07T00:00:00",
        "version": "8.x",
    }
