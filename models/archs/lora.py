"""peft LoRA helpers shared by the families that adapt a frozen pretrained network."""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer


def lora_config(rank: int, targets: list[str] | str) -> LoraConfig:
    """``lora_alpha = rank`` (scale 1) and peft's default init: B = 0, so a new adapter changes nothing."""
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True)


def merge_and_strip(module: torch.nn.Module, adapter: str) -> None:
    """Fold one LoRA adapter into the base weights and remove every LoRA wrapper."""
    for name, sub in list(module.named_modules()):
        if isinstance(sub, LoraLayer):  # peft's LoRA wrappers (BaseTunerLayers with lora_A/lora_B)
            sub.merge(adapter_names=[adapter] if adapter in sub.lora_A else [])
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, sub.get_base_layer())


def base_keys(module: torch.nn.Module) -> dict[str, str]:
    """The wrapped network's own state-dict key → the key it has once peft wrapped its layer."""
    return {k.replace(".base_layer.", "."): k for k in module.state_dict() if "lora_" not in k}


def copy_named_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Copy ``got`` into the live tensors ``expected`` after checking names and shapes (a mismatch
    raises KeyError/ValueError, which checkpoint loading turns into one CheckpointError)."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise KeyError(f"adapter tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    for name, tensor in got.items():
        if expected[name].shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, tensor in got.items():
            expected[name].copy_(tensor)
