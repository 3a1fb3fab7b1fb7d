"""Real CUDA out-of-memory: cap the allocator, ask for 16 large tiles per batch, and check that
TileRunner splits the batch and still upscales the whole image. Needs a CUDA GPU.

    python benchmarks/cuda_oom_check.py [--cap-gib 4]
"""

from __future__ import annotations

import argparse

import torch

from models import build_student
from models.pipeline import TileRunner, UpscaleJob, Upscaler
from models.presets import load_preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cap-gib", type=float, default=4.0)
    args = p.parse_args()
    torch.manual_seed(0)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(args.cap_gib / total)
    runner = TileRunner(build_student(load_preset("compact-x4")), "cuda", "fp16")
    upscaler = Upscaler(runner, tile=512, overlap=32, max_batch=16)
    (out,) = upscaler.run([UpscaleJob(torch.rand(3, 1400, 1400), (0.0, 1.0))])
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"output {tuple(out.shape)}, oom_retries {runner.oom_retries}, peak {peak:.2f} GiB of {args.cap_gib} GiB cap")
    assert runner.oom_retries > 0 and out.shape == (2, 3, 5600, 5600)


if __name__ == "__main__":
    main()
