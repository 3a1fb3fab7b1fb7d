"""The start of the velocity-depth probe (``models/configs/training/ablations/compact-stage2-delta-velocity*.json``).

``python scripts/compact_deeper_velocity.py BLOCKS OUT [--source CKPT]`` writes a ``compact-x4-delta``
student whose velocity has ``BLOCKS`` residual blocks: the source's blocks first, the new ones as
identities (second conv zero), the source's output conv last, every other tensor copied and the
decoder branch ``D`` zero. It decodes exactly like the source (checked before writing), so a run
from it starts where the source is. ``init_weights`` cannot do this: the output conv's index moves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.archs.compact import CompactStudent
from models.checkpoint import build_student, load_student, save_student
from models.presets import load_preset
from models.student import CTSRStudent


def deepen(source: Path, blocks: int) -> CTSRStudent:
    old = load_student(source)
    if not isinstance(old, CompactStudent):
        raise SystemExit(f"{source} is a {old.family} checkpoint, not compact")
    old.config.path_end = None  # compare the trained paths: a calibration's cut is not carried over
    config = load_preset("compact-x4-delta")
    config.arch = {**config.arch, "velocity_blocks": blocks}
    torch.manual_seed(0)  # the new blocks' first convs (their second ones are zero)
    new = build_student(config)
    have, kept = old.state_dict(), old.arch.velocity_blocks
    if blocks < kept:
        raise SystemExit(f"the source's velocity already has {kept} blocks")
    state = new.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            source_name = name
            if name.startswith("velocity_net."):
                index, rest = name.split(".", 2)[1:]
                if int(index) == 2 + blocks:  # the output conv, after the blocks
                    source_name = f"velocity_net.{2 + kept}.{rest}"
                elif int(index) >= 2 + kept:  # a new block: an identity
                    if rest.startswith("conv2."):
                        tensor.zero_()
                    continue
            if source_name in have and have[source_name].shape == tensor.shape:
                tensor.copy_(have[source_name])
    new.load_state_dict(state)
    lr = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = float((new.sweep(lr, [0.0, 0.5, 1.0]) - old.sweep(lr, [0.0, 0.5, 1.0])).abs().max())
    if gap > 1e-5:
        raise SystemExit(f"the deeper student decodes differently from the source (max difference {gap:.2e})")
    return new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("blocks", type=int)
    parser.add_argument("output", type=Path)
    parser.add_argument("--source", type=Path, default=Path("models/weights/ctsr-compact-x4"))
    args = parser.parse_args()
    student = deepen(args.source, args.blocks)
    note = f"{args.source} with the velocity deepened to {args.blocks} blocks (scripts/compact_deeper_velocity.py)"
    save_student(student, args.output, {"init": note})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
