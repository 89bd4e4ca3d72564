"""torchrun's ranks as sdrpn's jobs meet them: the rank, world size and device a process was
started with, and the collectives the jobs use (they exchange counts and wait for each
other, never tensors of the model)."""

from __future__ import annotations

import contextlib
import datetime
import os
import re

import torch
import torch.distributed as dist

from .options import is_int

# How long a rank of a job whose ranks meet only at its end (label, infer) waits there for
# the slowest: hours on a large dataset, not torch's 30 minutes. A rank that dies does not
# leave the others waiting that long: torchrun stops them.
MEET_AT_END_TIMEOUT = datetime.timedelta(days=7)


class RankStopped(RuntimeError):
    """A collective failed because another rank stopped (its own error says why)."""


def from_environment(
    device_arg: str | None, backend: str | None = None, timeout: datetime.timedelta | None = None
) -> tuple[int, int, str]:
    """Rank, world size and device under torchrun (rank 0 of 1 otherwise), with the process
    group started (``timeout``: torch's default when None). Each rank's GPU is its local
    rank's, made the current device, so that what runs on the current device (CUDA graphs
    and their memory pools, streams, collectives of objects) runs on it."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = device_arg or (f"cuda:{local % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        if backend is None:  # NCCL needs a GPU of its own for every rank
            backend = "nccl" if device.startswith("cuda") and torch.cuda.device_count() >= world else "gloo"
        dist.init_process_group(backend, **({"timeout": timeout} if timeout else {}))
    return rank, world, device


# How a rank's files are named (label shards and locks, infer's rank files): three digits
# at least, more from rank 1000 on. The glob finds them whichever rank wrote them, together
# with names that only start alike, which rank_of tells apart.
RANK_NAME_GLOB = "rank[0-9][0-9][0-9]*"
_RANK_NAME = re.compile(r"rank([0-9]{3,})")


def rank_name(rank: int) -> str:
    return f"rank{rank:03d}"


def rank_of(text: str) -> int | None:
    """The rank ``text`` names (rank_name's inverse), or None where it names none."""
    match = _RANK_NAME.fullmatch(text)
    return int(match.group(1)) if match else None


def check_initialized(world_size: int) -> None:
    """A job told it is one of several ranks needs their process group."""
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"world_size={world_size} needs torch.distributed's process group started (run under torchrun)"
        )


def check_rank(rank: int, world_size: int) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")


def finish(world_size: int) -> None:
    """End the process group from_environment started."""
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _from_the_transport(err: RuntimeError) -> bool:
    """Whether an error came from the process group rather than this rank's own work: torch
    raises DistError (NCCL, its own checks); gloo's transport errors (a peer's connection
    reset, a timeout) reach Python as RuntimeErrors that name gloo's sources."""
    return isinstance(err, dist.DistError) or "gloo" in str(err)


@contextlib.contextmanager
def peers_may_stop(mixed: bool = False):
    """A collective's failure as RankStopped: the rank that stopped reports why; the
    others need one line saying so, not a traceback of their own. ``mixed``: the block
    also does this rank's own work (a DDP backward), whose errors stay as they are."""
    try:
        yield
    except RuntimeError as err:
        if mixed and not _from_the_transport(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RankStopped(f"another rank stopped, or did not arrive in time ({first}); see its error") from err


def barrier(world_size: int) -> None:
    if world_size > 1:
        with peers_may_stop():
            dist.barrier()


@contextlib.contextmanager
def together(world_size: int, device: torch.device | str):
    """A block that every rank runs before the ranks go on together: a barrier that carries
    failures. Where the block fails on some rank, every rank stops: those ranks with their
    own error, the others with RankStopped naming the first of them. (A rank left to learn
    of another's failure from the lost connection may be stopped by torchrun before it
    says so.)"""
    if world_size == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as err:  # reported to the other ranks, then raised here as it was
        error = err
    try:
        outcomes = gather_objects(None if error is None else f"{type(error).__name__}: {error}", world_size, device)
    except RankStopped:
        if error is not None:
            raise error from None  # this rank's own reason, whatever stopped the others
        raise
    if error is not None:
        raise error
    failed = [(rank, text) for rank, text in enumerate(outcomes) if text is not None]
    if failed:
        raise RankStopped(f"another rank stopped (rank {failed[0][0]}: {failed[0][1]})")


def gather_objects(obj, world_size: int, device: torch.device | str) -> list:
    """Every rank's ``obj`` (picklable), in rank order; [obj] alone. Under NCCL objects
    travel through a tensor on the current CUDA device, which must be this rank's
    ``device``."""
    if world_size == 1:
        return [obj]
    device = torch.device(device)
    everyone = [None] * world_size
    nccl = dist.get_backend() == "nccl" and device.type == "cuda"
    with torch.cuda.device(device) if nccl else contextlib.nullcontext(), peers_may_stop():
        dist.all_gather_object(everyone, obj)
    return everyone
