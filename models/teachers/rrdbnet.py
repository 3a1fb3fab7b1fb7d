"""RRDBNet, the ESRGAN / Real-ESRGAN generator, in plain torch.

Parameter names follow the official PyTorch Real-ESRGAN state dicts (``conv_first``,
``body.<i>.rdb<j>.conv<k>``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``,
``conv_last``), so an official ``RealESRGAN_x4plus.pth`` loads with ``load_state_dict`` as it is,
and the ncnn converter (:mod:`.ncnn`) can address every convolution by that name.

x4 works on the LR image directly; x2 and x1 first pixel-unshuffle the input (by 2 and 4), which
is how the official x2plus model gets away with the same x4 upsampling tail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Residual scaling of both the dense blocks and the RRDBs (ESRGAN's "residual scaling" 0.2):
#: keeps a 69-layer-deep residual stack stable without normalisation layers.
RESIDUAL_SCALE = 0.2
#: Negative slope of every LeakyReLU in the network.
LRELU_SLOPE = 0.2
#: scale → pixel-unshuffle factor applied to the input (the tail always upsamples x4).
_UNSHUFFLE = {4: 1, 2: 2, 1: 4}


def _conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)


def _is_plain_conv3x3(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def upsample_conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``conv(nearest ×2 upsampling of x)``, computed without the upsampled tensor.

    Nearest ×2 followed by a zero-padded 3×3 conv is exactly a stride-2 4×4 transposed conv: each
    output row of an even (odd) phase reads input rows i−1 and i (i and i+1), so the 3×3 taps
    collapse to 2×2 per phase, 4 multiply-adds per output pixel instead of 9. On the 2-core CPU
    the two upsampling convs of the x4 tail ran 3.1× (at 128²) and 2.2× (at 256²) faster this way.
    Anything but a plain 3×3 conv (peft's LoRA wrapper while training) takes the literal path;
    both agree to float rounding.
    """
    if not _is_plain_conv3x3(conv):
        literal: torch.Tensor = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return literal
    assert isinstance(conv, nn.Conv2d)

    def collapse(w: torch.Tensor, dim: int) -> torch.Tensor:
        # 3×3 taps up/mid/down (offsets −1, 0, +1) → transposed taps 0..3: down, mid+down, up+mid, up
        up, mid, down = w.unbind(dim)
        return torch.stack([down, mid + down, up + mid, up], dim)

    # Summed in fp32 so that fp16/bf16 weights round once, not once per added tap.
    kernel = collapse(collapse(conv.weight.float(), 2), 3).transpose(0, 1).to(conv.weight.dtype)  # (in, out, 4, 4)
    return F.conv_transpose2d(x, kernel, conv.bias, stride=2, padding=1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs: conv ``k`` sees the input and all earlier outputs.

    The last conv maps back to ``num_feat`` and is added to the input after scaling by 0.2.
    """

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = _conv(num_feat, num_grow_ch)
        self.conv2 = _conv(num_feat + num_grow_ch, num_grow_ch)
        self.conv3 = _conv(num_feat + 2 * num_grow_ch, num_grow_ch)
        self.conv4 = _conv(num_feat + 3 * num_grow_ch, num_grow_ch)
        self.conv5 = _conv(num_feat + 4 * num_grow_ch, num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, dim=1)), LRELU_SLOPE))
        out: torch.Tensor = self.conv5(torch.cat(features, dim=1))
        return out * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks under one more scaled skip."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """The ESRGAN generator: conv_first → ``num_block`` RRDBs → conv_body (+ global skip) →
    two (nearest x2 → conv → LeakyReLU) stages → conv_hr → LeakyReLU → conv_last.

    Output is not clamped (the teacher clamps). With the defaults it has 16,697,987 parameters.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ) -> None:
        super().__init__()
        if scale not in _UNSHUFFLE:
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
        self.scale = scale
        self.unshuffle = _UNSHUFFLE[scale]
        self.num_feat, self.num_block, self.num_grow_ch = num_feat, num_block, num_grow_ch
        self.conv_first = _conv(num_in_ch * self.unshuffle**2, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = _conv(num_feat, num_feat)
        self.conv_up1 = _conv(num_feat, num_feat)
        self.conv_up2 = _conv(num_feat, num_feat)
        self.conv_hr = _conv(num_feat, num_feat)
        self.conv_last = _conv(num_feat, num_out_ch)

    def conv_names(self) -> list[str]:
        """Every conv's state-dict prefix in execution order (the order converters see them)."""
        names = ["conv_first"]
        for b in range(self.num_block):
            names += [f"body.{b}.rdb{r}.conv{c}" for r in (1, 2, 3) for c in range(1, 6)]
        return [*names, "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            # The unshuffle needs sides divisible by its factor: reflect-pad, crop the output back.
            pad_h, pad_w = -h % self.unshuffle, -w % self.unshuffle
            if pad_h or pad_w:
                mode = "reflect" if pad_h < h and pad_w < w else "replicate"  # reflect needs pad < side
                x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        return self.tail(feat)[..., : h * self.scale, : w * self.scale]

    def tail(self, feat: torch.Tensor) -> torch.Tensor:
        """The x4 upsampling tail: LR-sized features → the image (two nearest ×2 + conv stages, conv_hr, conv_last).

        The activations run in place: at 4× resolution each new 64-channel tensor is a fresh
        mapping the kernel must fault in page by page: out of place, this tail took 300 ms instead of
        232 ms at 128→512 on the 2-core CPU.
        """
        feat = F.leaky_relu(upsample_conv(feat, self.conv_up1), LRELU_SLOPE, inplace=True)
        feat = F.leaky_relu(upsample_conv(feat, self.conv_up2), LRELU_SLOPE, inplace=True)
        out: torch.Tensor = self.conv_last(F.leaky_relu(self.conv_hr(feat), LRELU_SLOPE, inplace=True))
        return out
