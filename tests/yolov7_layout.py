"""A yolov7-style detector, pickled as its trainer saves it (issue 23).

Written for these tests from a reading of WongKinYiu/yolov7 (models/common.py, models/yolo.py,
train.py): the class names, child names and forward arithmetic follow upstream (`Conv`,
`RepConv` with `rbr_dense`/`rbr_1x1`/`rbr_identity` as `nn.Sequential(conv, bn)`, `IDetect`
with `ImplicitA` added before and `ImplicitM` multiplied after each detection conv, `Model`
running `self.model` layer by layer by each layer's `f` and `i`), and so do the quirks:
`IDetect.grid` is a plain list of tensors made on first use, `stride` a tensor attribute, the
checkpoint `{'model': model.half(), 'ema': ..., 'optimizer': ..., 'epoch': ...}`.

Pickled modules are found by module path when a file is loaded, so the classes live here, at
the top level of a module the tests import as `yolov7_layout`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def autopad(k: int, p: int | None = None) -> int:
    return k // 2 if p is None else p


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """utils/torch_utils.py's fold: a new conv with a bias, computing conv then bn (eval)."""
    fused = (
        nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            groups=conv.groups,
            bias=True,
        )
        .to(conv.weight.dtype)
        .requires_grad_(False)
    )
    scale = bn.weight / torch.sqrt(bn.eps + bn.running_var)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        if conv.bias is not None:
            bias = conv.bias
        fused.bias.copy_(scale * (bias - bn.running_mean) + bn.bias)
    return fused


class Conv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p=None, g: int = 1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = (
            nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        )

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def fuseforward(self, x):
        return self.act(self.conv(x))


class RepConv(nn.Module):
    def __init__(
        self, c1: int, c2: int, k: int = 3, s: int = 1, p=None, g: int = 1, act=True, deploy=False
    ):
        super().__init__()
        self.deploy, self.groups, self.in_channels, self.out_channels = deploy, g, c1, c2
        padding_11 = autopad(k, p) - k // 2
        self.act = (
            nn.SiLU() if act is True else (act if isinstance(act, nn.Module) else nn.Identity())
        )
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(c1) if c2 == c1 and s == 1 else None
            self.rbr_dense = nn.Sequential(
                nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False), nn.BatchNorm2d(c2)
            )
            self.rbr_1x1 = nn.Sequential(
                nn.Conv2d(c1, c2, 1, s, padding_11, groups=g, bias=False), nn.BatchNorm2d(c2)
            )

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    def fuse_repvgg_block(self):
        # Upstream folds the three branches into `rbr_reparam` and sets `deploy`; a block
        # already in deploy form returns at once.
        if self.deploy:
            return
        dense = fuse_conv_and_bn(self.rbr_dense[0], self.rbr_dense[1])
        one = fuse_conv_and_bn(self.rbr_1x1[0], self.rbr_1x1[1])
        weight = dense.weight + nn.functional.pad(one.weight, [1, 1, 1, 1])
        bias = dense.bias + one.bias
        if isinstance(self.rbr_identity, nn.BatchNorm2d):
            eye = nn.Conv2d(self.in_channels, self.out_channels, 1, groups=self.groups, bias=False)
            with torch.no_grad():
                eye.weight.zero_()
                for c in range(self.out_channels):
                    eye.weight[c, c % (self.in_channels // self.groups)] = 1
            ident = fuse_conv_and_bn(eye.to(weight.dtype), self.rbr_identity)
            weight = weight + nn.functional.pad(ident.weight, [1, 1, 1, 1])
            bias = bias + ident.bias
        dense.weight, dense.bias = nn.Parameter(weight.detach()), nn.Parameter(bias.detach())
        self.rbr_reparam = dense
        self.deploy = True
        self.rbr_identity = self.rbr_1x1 = self.rbr_dense = None


class ImplicitA(nn.Module):
    def __init__(self, channel: int, mean: float = 0.0, std: float = 0.02):
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    def __init__(self, channel: int, mean: float = 1.0, std: float = 0.02):
        super().__init__()
        self.channel, self.mean, self.std = channel, mean, std
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=self.mean, std=self.std)

    def forward(self, x):
        return self.implicit * x


class Concat(nn.Module):
    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class IDetect(nn.Module):
    stride = None
    export = False

    def __init__(self, nc: int = 80, anchors=(), ch=()):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors), len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.ia = nn.ModuleList(ImplicitA(x) for x in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)

    def forward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](self.ia[i](x[i]))
            x[i] = self.im[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
                y = x[i].sigmoid()
                y[..., 0:2] = (y[..., 0:2] * 2.0 - 0.5 + self.grid[i]) * self.stride[i]
                y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                z.append(y.view(bs, -1, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def fuseforward(self, x):
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
                y = x[i].sigmoid()
                y[..., 0:2] = (y[..., 0:2] * 2.0 - 0.5 + self.grid[i]) * self.stride[i]
                y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                z.append(y.view(bs, -1, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def fuse(self):
        # ImplicitA into the conv's bias, then ImplicitM into its weight and bias; the implicit
        # layers stay, and the caller switches `forward` to `fuseforward` (as Model.fuse does).
        for i in range(len(self.m)):
            c1, c2, _, _ = self.m[i].weight.shape
            c1_, c2_, _, _ = self.ia[i].implicit.shape
            self.m[i].bias += torch.matmul(
                self.m[i].weight.reshape(c1, c2), self.ia[i].implicit.reshape(c2_, c1_)
            ).squeeze(1)
        for i in range(len(self.m)):
            c1, c2, _, _ = self.im[i].implicit.shape
            self.m[i].bias *= self.im[i].implicit.reshape(c2)
            self.m[i].weight *= self.im[i].implicit.transpose(0, 1)

    @staticmethod
    def _make_grid(nx: int = 20, ny: int = 20):
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()


class Model(nn.Module):
    """A small yolov7 net: what `parse_model` builds from a yaml (layers in `self.model`, each
    with `f` (from), `i` (index), `type`), run by `forward_once`; two detection levels."""

    def __init__(self, nc: int = 3, ch: int = 3, width: int = 8):
        super().__init__()
        w = width
        anchors = ([10, 13, 16, 30], [30, 61, 62, 45])
        layers = [
            (-1, Conv(ch, w, 3, 2)),
            (-1, RepConv(w, w)),
            (-1, Conv(w, 2 * w, 3, 2)),
            (-1, RepConv(2 * w, 2 * w)),
            ([-1, 2], Concat(1)),
            (-1, RepConv(4 * w, 2 * w, 3, 2)),
            ([3, 5], IDetect(nc, anchors, (2 * w, 2 * w))),
        ]
        for i, (f, m) in enumerate(layers):
            m.f, m.i, m.type = f, i, type(m).__name__
        self.model = nn.Sequential(*(m for _, m in layers))
        self.save = sorted(
            {
                x % i
                for i, (f, _) in enumerate(layers)
                for x in ([f] if isinstance(f, int) else f)
                if x != -1
            }
        )
        self.traced = False
        detect = self.model[-1]
        detect.stride = torch.tensor([4.0, 8.0])
        self.stride = detect.stride
        self.names = [f"class{k}" for k in range(nc)]

    def forward(self, x):
        return self.forward_once(x)

    def forward_once(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def fuse(self):
        for m in self.model.modules():
            if isinstance(m, RepConv):
                m.fuse_repvgg_block()
            elif type(m) is Conv and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.fuseforward
            elif isinstance(m, IDetect):
                m.fuse()
                m.forward = m.fuseforward
        return self


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking values: BN statistics and affine, implicit layers, biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                module.bias.copy_(0.1 * torch.randn(n, generator=g))
            elif isinstance(module, (ImplicitA, ImplicitM)):
                module.implicit.add_(0.1 * torch.randn(module.implicit.shape, generator=g))
    return model.eval()


def trainer_checkpoint(seed: int = 0) -> dict:
    """What yolov7's train.py saves: the model and its EMA in float16, the optimizer's state.
    (The model is saved in train mode, as the trainer holds it.)"""
    model = randomize(Model(), seed).train()
    ema = randomize(Model(), seed + 1).requires_grad_(False)  # as ModelEMA keeps it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return {
        "epoch": 299,
        "best_fitness": 0.5,
        "training_results": "results",
        "model": copy.deepcopy(model).half(),
        "ema": copy.deepcopy(ema).half(),
        "updates": 1000,
        "optimizer": optimizer.state_dict(),
        "wandb_id": None,
    }
