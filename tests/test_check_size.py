"""The figures are taken at a reduced input size when the shape is the default one (issue 25), and
that catches what the full size catches: the model must run on it, and every fused block must see
at least half its kernel's extent (or as much as it sees at the full size)."""

from __future__ import annotations

import pytest
import torch
from helpers import randomized
from torch import nn

import repconv
from repconv import verification as V
from repconv.fused_conv import norm_stats
from repconv.modules import kernel_extent
from repconv.rules import repvgg
from repconv.zoo.blocks import RepVGGBlock, conv_bn


def repvgg_net(width: int = 8) -> nn.Module:
    """A small RepVGG-style net at 224: stride-2 stem, two stages, a pooled linear head."""
    return nn.Sequential(
        RepVGGBlock(3, width, stride=2),
        RepVGGBlock(width, width),
        RepVGGBlock(width, 2 * width, stride=2),
        RepVGGBlock(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 5),
    )


class FixedHead(nn.Module):
    """A head that only takes the size it was built for (a flattened 8x8 map)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(RepVGGBlock(3, 4, stride=2), nn.AvgPool2d(14))
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class LargeKernel(nn.Module):
    """A 31x31 depthwise conv + BN behind a stride-8 stem: at 56x56 it would see 7x7."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 4, 8, stride=8)
        self.large = conv_bn(4, 4, 31, padding=15, groups=4)

    def forward(self, x):
        return self.large(torch.relu(self.stem(x)))


def test_the_default_shape_is_checked_at_a_quarter_of_its_side():
    result = repconv.convert(randomized(repvgg_net()))
    assert result.passed
    assert result.verification.input_shape == [3, 56, 56]
    assert result.reference.full_shape == [3, 224, 224] and result.reference.reduced


def test_a_shape_the_user_gives_is_the_one_checked():
    result = repconv.convert(randomized(repvgg_net()), input_shape=[3, 224, 224])
    assert result.verification.input_shape == [3, 224, 224] and not result.reference.reduced


def test_a_model_that_takes_only_its_own_size_is_checked_at_it():
    result = repconv.convert(randomized(FixedHead()))
    assert result.passed and result.verification.input_shape == [3, 224, 224]


def test_a_large_kernel_keeps_the_size_at_which_it_is_seen_whole():
    result = repconv.convert(randomized(LargeKernel()))
    assert result.passed
    # at 56 the 31x31 conv sees 7x7, at 112 14x14: both under the 16 it needs
    assert result.verification.input_shape == [3, 224, 224]


def test_sees_enough_asks_half_the_extent_or_what_the_full_size_shows():
    blocks = {"a": (31, 31), "b": (3, 3), "pool": None}
    assert V.sees_enough({"a": [1, 4, 16, 16], "b": [1, 4, 2, 2]}, blocks, 4)
    assert not V.sees_enough({"a": [1, 4, 15, 16], "b": [1, 4, 2, 2]}, blocks, 4)
    assert not V.sees_enough({"a": [1, 4, 16, 16]}, blocks, 4)  # b not run at this size
    # a block that sees 1x1 at every size (behind a global pool) asks no more than that
    assert not V.sees_enough({"a": [1, 4, 16, 16], "b": [1, 4, 1, 1]}, blocks, 4)
    assert V.sees_enough({"c": [1, 4, 1, 1]}, {"c": (1, 1)}, 4)
    assert V.reduced_shape([3, 224, 224], 4) == [3, 56, 56]
    assert V.reduced_shape([3, 100, 100], 4) is None  # 25 < MIN_REDUCED_SIDE
    assert V.reduced_shape([3, 16, 112, 112], 2) is None  # volumes keep their size


def test_kernel_extent_counts_dilation():
    block = nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2), nn.Conv2d(2, 2, (1, 7)))
    assert kernel_extent(block) == (5, 7)
    assert kernel_extent(nn.ReLU()) is None


@pytest.fixture
def wrong_eps(monkeypatch):
    """The repvgg rule folding its identity norms with ten times their eps."""

    def stats(norm, **kw):
        found = norm_stats(norm, **kw)
        return found._replace(eps=found.eps * 10)

    monkeypatch.setattr(repvgg, "norm_stats", stats)


def test_a_wrong_eps_still_fails_at_the_reduced_size(wrong_eps):
    model = randomized(repvgg_net())
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.data.uniform_(1e-5, 1e-3)  # where eps matters
    result = repconv.convert(model)
    assert result.reference.reduced
    assert not result.passed
    assert result.verification.suspects  # and the blocks are named


def test_a_dropped_branch_still_fails_at_the_reduced_size(monkeypatch):
    monkeypatch.setattr(repvgg, "identity_branch", _zero_identity(repvgg.identity_branch))
    result = repconv.convert(randomized(repvgg_net()))
    assert result.reference.reduced and not result.passed


def _zero_identity(original):
    def identity_branch(conv, norm, target):
        branch = original(conv, norm, target)
        return branch._replace(kernel=torch.zeros_like(branch.kernel))

    return identity_branch
