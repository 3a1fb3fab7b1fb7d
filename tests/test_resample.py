"""``bicubic_upscale`` is PyTorch's bicubic upsampling, computed as a convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import photo_tensor

from models.resample import bicubic_upscale


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 7, 5), (1, 4, 2, 9)])
def test_equals_pytorch_bicubic(scale: int, shape: tuple[int, ...]) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(scale))
    expected = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    torch.testing.assert_close(bicubic_upscale(x, scale), expected, atol=2e-6, rtol=0)


def test_equals_pytorch_bicubic_on_a_photo_in_the_servers_layout() -> None:
    lr = photo_tensor(64, 48)[None].contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(bicubic_upscale(lr, 4), expected, atol=2e-6, rtol=0)
    assert bicubic_upscale(lr, 1) is lr


def test_gradients_reach_the_input() -> None:
    # serving first, under inference mode, then training in the same process: the kernel cached
    # by the first call (a shape no other test uses) must be one autograd can save
    with torch.inference_mode():
        bicubic_upscale(torch.rand(1, 2, 6, 6), 5)
    x = torch.rand(1, 2, 6, 6, requires_grad=True)
    bicubic_upscale(x, 5).sum().backward()
    # each phase's taps sum to one: every input pixel's gradient is the number of outputs it feeds
    assert x.grad is not None and float(x.grad.sum()) == pytest.approx(2 * 30 * 30, rel=1e-5)
