"""Train-time and deploy-time reference implementations of the published block conventions.

Each class reproduces the child names, state-dict keys and forward pass of its published release
(DBB's conv-BN unit, RepVGG, ACNet's ACB, DBB), so repconv's tests and demo exercise exactly the
structures found in real checkpoints. Release options that change no key and are not needed here
(RepVGG's `use_checkpoint`, ACB's `reduce_gamma`/`use_last_bn`, DBB's `single_init`) are left out.

Deviations that keep the arithmetic identical: DBB's branch sum is written out-of-place, the
BN-and-pad layer builds its border with `torch.where` instead of writing into the padded tensor,
and the identity-based 1x1 conv derives its identity kernel from the weight on each call, so all
blocks trace with torch.fx and build on the meta device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "ACBlock",
    "BNAndPadLayer",
    "ConvBN",
    "DiverseBranchBlock",
    "IdentityBasedConv1x1",
    "RepVGGBlock",
    "SEBlock",
    "conv_bn",
    "randomize_bn_",
]


# ---- conv-BN units --------------------------------------------------------------------------


class ConvBN(nn.Module):
    """DBB release's conv-BN unit: `conv` + `bn` in training, `conv` with bias once deployed."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deploy: bool = False,
        nonlinear: nn.Module | None = None,
    ):
        super().__init__()
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=deploy, **geometry)
        if not deploy:
            self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "bn"):
            return self.nonlinear(self.bn(self.conv(x)))
        return self.nonlinear(self.conv(x))


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> nn.Sequential:
    """RepVGG/DBB's `conv_bn`: an nn.Sequential with children `conv` (no bias) and `bn`."""
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    result = nn.Sequential()
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, bias=False, padding_mode=padding_mode, **geometry
    )
    result.add_module("conv", conv)
    result.add_module("bn", nn.BatchNorm2d(out_channels))
    return result


# ---- RepVGG ---------------------------------------------------------------------------------


class SEBlock(nn.Module):
    """RepVGG release's squeeze-excitation: avg-pool (window = input width), down, ReLU, up,
    sigmoid, and the input scaled by the result."""

    def __init__(self, input_channels: int, internal_neurons: int):
        super().__init__()
        self.down = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, stride=1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, stride=1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs: Tensor) -> Tensor:
        # The release pools with a window as wide as the input (global on square maps).
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = torch.sigmoid(self.up(F.relu(self.down(x))))
        return inputs * x.view(-1, self.input_channels, 1, 1)


class RepVGGBlock(nn.Module):
    """RepVGG release's block: kxk conv-BN + 1x1 conv-BN (+ identity BN), then SE and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_se: bool = False,
    ):
        super().__init__()
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels
        padding_11 = padding - kernel_size // 2
        self.nonlinearity = nn.ReLU()
        if use_se:
            self.se = SEBlock(out_channels, internal_neurons=out_channels // 16)
        else:
            self.se = nn.Identity()
        geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        if deploy:
            self.rbr_reparam = nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                bias=True,
                padding_mode=padding_mode,
                **geometry,
            )
        else:
            self.rbr_identity = (
                nn.BatchNorm2d(in_channels) if out_channels == in_channels and stride == 1 else None
            )
            # As in the release, the train-time branches always pad with zeros.
            self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, **geometry)
            self.rbr_1x1 = conv_bn(
                in_channels, out_channels, 1, stride=stride, padding=padding_11, groups=groups
            )

    def forward(self, inputs: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


# ---- ACNet ----------------------------------------------------------------------------------


class ACBlock(nn.Module):
    """ACNet release's asymmetric convolution block: kxk + kx1 + 1xk conv-BN branches, summed.

    When `padding < kernel_size // 2` the thin branches cannot pad negatively, so their inputs
    are cropped by `crop` pixels along the axis their kernel does not span.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride=1,
        padding: int = 0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        deploy: bool = False,
        use_affine: bool = True,
    ):
        super().__init__()
        self.deploy = deploy
        common = dict(stride=stride, dilation=dilation, groups=groups, padding_mode=padding_mode)
        if deploy:
            self.fused_conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, padding=padding, bias=True, **common
            )
            return
        self.square_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, bias=False, **common
        )
        self.square_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        offset = padding - kernel_size // 2
        if offset >= 0:
            self.crop = 0
            hor_padding = [offset, padding]
            ver_padding = [padding, offset]
        else:
            self.crop = -offset
            hor_padding = [0, padding]
            ver_padding = [padding, 0]
        self.ver_conv = nn.Conv2d(
            in_channels, out_channels, (kernel_size, 1), padding=ver_padding, bias=False, **common
        )
        self.hor_conv = nn.Conv2d(
            in_channels, out_channels, (1, kernel_size), padding=hor_padding, bias=False, **common
        )
        self.ver_bn = nn.BatchNorm2d(out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(out_channels, affine=use_affine)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.fused_conv(x)
        square = self.square_bn(self.square_conv(x))
        if self.crop > 0:
            ver_in = x[:, :, :, self.crop : -self.crop]
            hor_in = x[:, :, self.crop : -self.crop, :]
        else:
            ver_in = hor_in = x
        vertical = self.ver_bn(self.ver_conv(ver_in))
        horizontal = self.hor_bn(self.hor_conv(hor_in))
        return square + vertical + horizontal


# ---- DBB ------------------------------------------------------------------------------------


class BNAndPadLayer(nn.Module):
    """DBB release's BN followed by padding with the value the BN gives a zero input.

    As in the release the pad value uses the running statistics (also in training mode) and
    does not propagate gradients to the BN's affine parameters.
    """

    def __init__(
        self,
        pad_pixels: int,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def pad_values(self) -> Tensor:
        """Per-channel output of the BN (in eval mode) for a zero input."""
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        if bn.affine:
            return bn.bias.detach() - bn.running_mean * bn.weight.detach() / std
        return -bn.running_mean / std

    def forward(self, x: Tensor) -> Tensor:
        output = self.bn(x)
        if self.pad_pixels > 0:
            pad = [self.pad_pixels] * 4
            inside = F.pad(torch.ones_like(output[:1, :1]), pad).bool()
            values = self.pad_values().to(output.dtype).view(1, -1, 1, 1)
            output = torch.where(inside, F.pad(output, pad), values)
        return output


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB release's 1x1 conv whose effective kernel is `weight` + identity (weight starts at 0).

    Output channel c of group g reads input channel c % (channels // groups) of that group. The
    identity is not part of the state dict; it is rebuilt from the weight on every call.
    """

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(
            channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False
        )
        assert channels % groups == 0
        nn.init.zeros_(self.weight)

    def _identity(self) -> Tensor:
        channels, per_group = self.weight.shape[0], self.weight.shape[1]
        eye = self.weight.new_ones(per_group).diag()
        return eye.repeat(self.groups, 1).view(channels, per_group, 1, 1)

    def get_actual_kernel(self) -> Tensor:
        return self.weight + self._identity()

    def forward(self, input: Tensor) -> Tensor:
        return F.conv2d(
            input,
            self.get_actual_kernel(),
            None,
            stride=1,
            padding=0,
            dilation=self.dilation,
            groups=self.groups,
        )


def _dbb_avg_branch(
    in_channels: int, out_channels: int, kernel_size: int, stride, padding: int, groups: int
) -> nn.Sequential:
    """`dbb_avg`: 1x1 conv, BN-and-pad, avg-pool, BN; without the 1x1 conv when depthwise."""
    branch = nn.Sequential()
    if groups < out_channels:
        conv = nn.Conv2d(
            in_channels, out_channels, 1, stride=1, padding=0, groups=groups, bias=False
        )
        branch.add_module("conv", conv)
        branch.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=out_channels))
        branch.add_module("avg", nn.AvgPool2d(kernel_size, stride=stride, padding=0))
    else:
        branch.add_module("avg", nn.AvgPool2d(kernel_size, stride=stride, padding=padding))
    branch.add_module("avgbn", nn.BatchNorm2d(out_channels))
    return branch


def _dbb_1x1_kxk_branch(
    in_channels: int,
    internal: int,
    out_channels: int,
    kernel_size: int,
    stride,
    padding: int,
    groups: int,
) -> nn.Sequential:
    """`dbb_1x1_kxk`: a 1x1 conv (identity-based when it keeps the width), BN-and-pad, kxk conv
    without padding, BN."""
    branch = nn.Sequential()
    if internal == in_channels:
        branch.add_module("idconv1", IdentityBasedConv1x1(in_channels, groups))
    else:
        conv1 = nn.Conv2d(in_channels, internal, 1, stride=1, padding=0, groups=groups, bias=False)
        branch.add_module("conv1", conv1)
    branch.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal, affine=True))
    conv2 = nn.Conv2d(
        internal, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False
    )
    branch.add_module("conv2", conv2)
    branch.add_module("bn2", nn.BatchNorm2d(out_channels))
    return branch


class DiverseBranchBlock(nn.Module):
    """DBB release's block: kxk, 1x1, 1x1 -> avg-pool and 1x1 -> kxk branches, summed."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride=1,
        padding: int = 0,
        dilation=1,
        groups: int = 1,
        internal_channels_1x1_3x3: int | None = None,
        deploy: bool = False,
        nonlinear: nn.Module | None = None,
    ):
        super().__init__()
        self.deploy = deploy
        self.nonlinear = nn.Identity() if nonlinear is None else nonlinear
        self.kernel_size = kernel_size
        self.out_channels = out_channels
        self.groups = groups
        assert padding == kernel_size // 2
        geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        if deploy:
            self.dbb_reparam = nn.Conv2d(
                in_channels, out_channels, kernel_size, bias=True, **geometry
            )
            return
        self.dbb_origin = conv_bn(in_channels, out_channels, kernel_size, **geometry)
        # Registration order follows the release, so state-dict key order matches too.
        self.dbb_avg = _dbb_avg_branch(
            in_channels, out_channels, kernel_size, stride, padding, groups
        )
        if groups < out_channels:
            self.dbb_1x1 = conv_bn(
                in_channels, out_channels, 1, stride=stride, padding=0, groups=groups
            )
        internal = internal_channels_1x1_3x3
        if internal is None:
            internal = in_channels if groups < out_channels else 2 * in_channels
        self.dbb_1x1_kxk = _dbb_1x1_kxk_branch(
            in_channels, internal, out_channels, kernel_size, stride, padding, groups
        )

    def forward(self, inputs: Tensor) -> Tensor:
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(inputs)
        out = out + self.dbb_avg(inputs)
        out = out + self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


# ---- test helpers ---------------------------------------------------------------------------


@torch.no_grad()
def randomize_bn_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, in place.

    running_mean ~ N(0, 0.5^2), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.5^2);
    tensors a norm does not have (affine=False, no running stats) are skipped. Values are drawn
    on the CPU (so a CPU generator works for any model) and copied into place.
    """

    def normal(t: Tensor, std: float) -> Tensor:
        return torch.randn(t.shape, generator=generator, dtype=torch.float64) * std

    def uniform(t: Tensor, low: float, high: float) -> Tensor:
        return low + torch.rand(t.shape, generator=generator, dtype=torch.float64) * (high - low)

    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        if module.running_mean is not None:
            module.running_mean.copy_(normal(module.running_mean, 0.5))
        if module.running_var is not None:
            module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))
        if module.weight is not None:
            module.weight.copy_(uniform(module.weight, 0.5, 1.5))
        if module.bias is not None:
            module.bias.copy_(normal(module.bias, 0.5))
    return model
