"""Giving back the pages of consumed memory-mapped tensors (repconv.pages).

Measured through /proc/self/smaps: the resident bytes of this process's mapping of the file.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from repconv import checkpoint, pages, pipeline

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="page release works on Linux only"
)
MIB = 2**20


def resident_bytes_of(path) -> int:
    """Resident bytes of every mapping of `path` in this process."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def mapped(tmp_path, tensors: dict[str, torch.Tensor]):
    path = tmp_path / "train.pth"
    torch.save(tensors, path)
    return path, checkpoint.read_checkpoint(path).state_dict


def test_release_gives_back_read_pages_and_the_tensor_reads_the_same(tmp_path):
    original = torch.randn(4 * MIB // 4)
    path, state = mapped(tmp_path, {"w": original})
    assert torch.equal(state["w"], original)  # reads every page
    assert resident_bytes_of(path) >= 4 * MIB - 4096
    with pages.PageReleaser() as releaser:
        released = releaser.release([state["w"]])
    assert released >= 4 * MIB - 2 * 4096
    assert resident_bytes_of(path) < 64 * 1024
    assert torch.equal(state["w"], original)  # mapped again from the file


def test_written_pages_are_never_released(tmp_path):
    _, state = mapped(tmp_path, {"w": torch.zeros(MIB // 4)})
    state["w"][5000] = 7.0  # copy-on-write: this page is now the process's own
    with pages.PageReleaser() as releaser:
        assert releaser.release([state["w"]]) == 0
    assert state["w"][5000] == 7.0 and state["w"].sum() == 7.0


def test_anonymous_memory_is_never_released():
    tensor = torch.randn(MIB)
    copy = tensor.clone()
    with pages.PageReleaser() as releaser:
        assert releaser.release([tensor]) == 0
    assert torch.equal(tensor, copy)


def test_tensors_still_in_use_are_kept(tmp_path):
    path, state = mapped(tmp_path, {"w": torch.randn(MIB // 4)})
    state["w"].sum()
    with pages.PageReleaser() as releaser:
        assert releaser.release([state["w"]], keep=[state["w"]]) == 0
    assert resident_bytes_of(path) >= MIB - 4096


class Stack(nn.Sequential):
    def __init__(self) -> None:
        layers = []
        for _ in range(3):
            layers += [nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU()]
        super().__init__(*layers)


@pytest.mark.parametrize("options", [{"verify": False}, {}, {"verify_dtype": "float32"}])
def test_a_converted_checkpoint_leaves_its_train_pages_behind(tmp_path, options):
    train = Stack().eval()
    for module in train.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
    path, state = mapped(tmp_path, train.state_dict())
    model = Stack()
    model.load_state_dict(state, assign=True)
    # `state` stays alive, as a caller's would: the mapping is not simply closed at the end.
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        reference = train(x)
    result = pipeline.convert(model, input_shape=(64, 8, 8), **options)
    assert [e.status for e in result.plan.entries] == ["fused"] * 3
    # Three 64x64x3x3 float kernels (432 KiB) were read; only partial edge pages may remain.
    assert resident_bytes_of(path) <= 64 * 1024
    with torch.no_grad():
        deploy = result.model.float()(x)
    assert torch.allclose(deploy, reference, atol=1e-5)
