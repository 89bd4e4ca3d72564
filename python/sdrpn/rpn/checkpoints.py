"""Training checkpoints: checkpoints/<name>/ folders (RPN, optimiser, trainer state) and
checkpoints/latest.json naming the newest. The folder latest.json names is never removed
or replaced before the pointer has moved on, so a kill at any moment leaves a resumable run."""

from __future__ import annotations

import glob
import os
import shutil

from safetensors.torch import save_file

from ..io_utils import fsync_dir, read_json, read_safetensors, remove_temporaries, write_atomic, write_json
from ..optim_state import load_optimizer_tensors, optimizer_tensors

LATEST = "latest.json"


def _root(folder: str) -> str:
    return os.path.join(folder, "checkpoints")


def _fresh_name(root: str, step: int) -> str:
    """step-N, or step-N.K when a checkpoint of that step exists already (a re-save at the
    same step must not overwrite the folder that latest.json may name)."""
    name, k = f"step-{step:08d}", 1
    while os.path.exists(os.path.join(root, name)):
        name, k = f"step-{step:08d}.{k}", k + 1
    return name


def save_checkpoint(
    folder: str, rpn, optimizer, scheduler, progress: dict, keep: int, settings: dict | None = None
) -> str:
    """Write a checkpoint as a whole (temporary folder, fsynced, then renamed), point
    latest.json at it, then remove the oldest beyond `keep`. `settings`, the run's
    configuration, is recorded so that a resumption can refuse other settings."""
    root = _root(folder)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, _fresh_name(root, progress["global_step"]))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rpn.save(tmp)
    tensors, meta = optimizer_tensors(optimizer)
    write_atomic(os.path.join(tmp, "optimizer.safetensors"), lambda path: save_file(tensors, path))
    write_json(
        os.path.join(tmp, "trainer_state.json"),
        {"progress": progress, "optimizer": meta, "scheduler": scheduler.state_dict(), "settings": settings},
    )
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(root)
    write_json(os.path.join(root, LATEST), {"path": os.path.basename(final)})
    done = sorted(
        (d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp")),
        key=lambda d: os.path.getmtime(os.path.join(root, d)),
    )
    for old in done[:-keep]:
        if old != os.path.basename(final):
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def remove_unfinished(folder: str) -> None:
    """Delete what a kill left of checkpoints being written (their .tmp folders and the
    temporary files of latest.json); for the one process that writes checkpoints."""
    root = _root(folder)
    for tmp in glob.glob(os.path.join(glob.escape(root), "step-*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
    remove_temporaries(root)


def latest_checkpoint(folder: str) -> str | None:
    pointer = os.path.join(_root(folder), LATEST)
    if not os.path.exists(pointer):
        return None
    path = os.path.join(_root(folder), read_json(pointer)["path"])
    if not os.path.isdir(path):
        raise ValueError(
            f"{pointer} names {path}, which does not exist: the checkpoint folder was "
            f"changed by hand; remove {pointer} to start over"
        )
    return path


def checkpoint_settings(path: str) -> dict | None:
    """The run configuration a checkpoint recorded (None for checkpoints that predate it)."""
    return read_json(os.path.join(path, "trainer_state.json")).get("settings")


def load_checkpoint(path: str, rpn, optimizer, scheduler) -> dict:
    """Restore the RPN, optimiser and scheduler in place; returns the training progress."""
    state = read_json(os.path.join(path, "trainer_state.json"))
    rpn.load_state_dict(read_safetensors(os.path.join(path, "rpn.safetensors")), strict=False)
    load_optimizer_tensors(optimizer, read_safetensors(os.path.join(path, "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["progress"]
