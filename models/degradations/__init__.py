"""Synthetic LR/HR training pairs: the Real-ESRGAN second-order degradation model.

Real-world low-resolution images are blurred, resized, noisy and JPEG-compressed, often more than
once (a photo resized and re-uploaded). Real-ESRGAN (Wang et al., "Real-ESRGAN: Training Real-World
Blind Super-Resolution with Pure Synthetic Data", ICCV Workshops 2021) models this with two rounds
of [random blur -> random resize -> Gaussian/Poisson noise -> JPEG] plus a final resize with a sinc
(ringing) filter in random order with a last JPEG. This package reimplements it in torch, Pillow and
NumPy only, with Real-ESRGAN x4plus defaults and every random draw taken from a caller's
``torch.Generator`` so that one seed reproduces a batch exactly.

Typical use::

    gen = torch.Generator().manual_seed(seed)
    lr = degrade(hr, scale=4, generator=gen)  # hr: [B, 3, H, W] float in [0, 1]
    target = usm_sharpen(hr)  # Real-ESRGAN's L1/perceptual target
"""

from .kernels import (
    KERNEL_PROBS,
    KERNEL_SIZES,
    KERNEL_TYPES,
    bessel_j1,
    gaussian_kernel,
    generalized_gaussian_kernel,
    pad_kernel,
    plateau_kernel,
    random_blur_kernel,
    random_mixed_kernel,
    random_sinc_kernel,
    sinc_kernel,
)
from .ops import (
    RESIZE_MODES,
    add_gaussian_noise,
    add_poisson_noise,
    filter2d,
    gaussian_blur,
    jpeg_compress,
    quantize_8bit,
    random_crop,
    random_crop_pair,
    resize,
    usm_sharpen,
)
from .pipeline import (
    SECOND_STAGE,
    DegradationConfig,
    Degrader,
    SamplePlan,
    StageConfig,
    StagePlan,
    apply_plans,
    degrade,
    draw_plan,
)

__all__ = [
    "KERNEL_PROBS",
    "KERNEL_SIZES",
    "KERNEL_TYPES",
    "RESIZE_MODES",
    "SECOND_STAGE",
    "DegradationConfig",
    "Degrader",
    "SamplePlan",
    "StageConfig",
    "StagePlan",
    "add_gaussian_noise",
    "add_poisson_noise",
    "apply_plans",
    "bessel_j1",
    "degrade",
    "draw_plan",
    "filter2d",
    "gaussian_blur",
    "gaussian_kernel",
    "generalized_gaussian_kernel",
    "jpeg_compress",
    "pad_kernel",
    "plateau_kernel",
    "quantize_8bit",
    "random_blur_kernel",
    "random_crop",
    "random_crop_pair",
    "random_mixed_kernel",
    "random_sinc_kernel",
    "resize",
    "sinc_kernel",
    "usm_sharpen",
]
