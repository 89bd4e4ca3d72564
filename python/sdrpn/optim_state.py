"""Optimiser state as flat tensors and JSON, so checkpoints go through safetensors (no pickle)."""

from __future__ import annotations

import torch


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """({"<param index>.<slot>": tensor}, JSON-able rest of the state dict)."""
    state = optimizer.state_dict()
    tensors = {
        f"{idx}.{name}": value.detach().cpu().contiguous()
        for idx, slots in state["state"].items()
        for name, value in slots.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """The inverse of optimizer_tensors."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
