"""Atomic file writes (a reader never sees half a file, a crash never leaves one) and the
exclusive lock that keeps two jobs off one output."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable

from safetensors import SafetensorError
from safetensors.torch import load_file


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.path.basename(path)}.")  # see remove_temporaries
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 files, and so do writers that replace the file (safetensors):
        # give it the mode open() would.
        os.chmod(tmp, 0o666 & ~current_umask())
        # A rename survives a power loss only once the data it names is on disk.
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_temporaries(folder: str, names: str = "*") -> None:
    """Delete the temporary files that write_atomic left in ``folder`` (``.tmp-NAME.XXXX``)
    for files whose name matches the glob ``names``, when a kill stopped it before the
    rename. Only a holder of the lock of every writer of such files may call it: another's
    temporary file may be in use. The name is matched whole: ``a.jsonl``'s job leaves the
    temporaries of ``a.jsonl.2`` (``.tmp-a.jsonl.2.XXXX``) alone."""
    for path in glob.glob(os.path.join(glob.escape(folder), f".tmp-{names}.*")):
        name = os.path.basename(path)[len(".tmp-") :].rsplit(".", 1)[0]  # mkstemp's suffix holds no dot
        if fnmatch.fnmatchcase(name, names):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def fsync_dir(folder: str) -> None:
    """Make the entries of a folder (new names, renames) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, payload) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)

    write_atomic(path, write)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    write_atomic(path, write)


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks (a 1 GB data file: about a
    second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: str, device: str = "cpu") -> dict:
    """The tensors of a safetensors file; a damaged file is a ValueError naming it
    (safetensors' own error names no file, and for a folder only says "No such device")."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a safetensors file")
    try:
        return load_file(path, device=device)
    except SafetensorError as err:
        raise ValueError(f"{path} cannot be read as safetensors ({err})") from None


def read_json(path: str):
    """A JSON file's value; a file that is not JSON text is refused naming it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors, as is an integer of more digits
    # than Python converts; arrays nested some thousand deep exhaust the recursion limit.
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def read_json_as(path: str, parse):
    """``parse`` of a JSON file's value; what either finds wrong is said naming the file
    once (read_json names it itself)."""
    value = read_json(path)
    try:
        return parse(value)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def read_jsonl(path: str) -> list[dict]:
    """The JSON values of ``path``'s lines; a line that does not parse (damaged, or no UTF-8)
    raises ValueError naming the file and the line."""
    values = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line.decode("utf-8")))
            except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
                raise ValueError(f"{path} line {number} is not JSON ({err})") from None
    return values


class FolderBusy(RuntimeError):
    """Another live process holds the lock of an output."""


# The descriptors of the locks this process holds. A fork (DataLoader workers) copies them,
# and an flock lasts while any copy is open: a worker outliving its killed parent by the
# seconds it takes to notice would hold the output, and refuse the rerun. Children close
# their copies at once; the lock stays the parent's.
_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def exclusive_lock(path: str):
    """Hold an exclusive lock on `path` (created if needed) while the context lasts, so that
    two jobs never write one output at once. A second holder fails at once with the first
    one's pid, host and start time. The lock is the kernel's (flock): it dies with its
    process, however that ends, so a lock file left behind never blocks a later run."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, owner = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), os.getpid()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path, errors="replace") as f:
                holder = f.read().strip() or "unknown"
            raise FolderBusy(
                f"{path} is held by another running job ({holder}); wait for it to end, or stop it "
                f"(the lock goes with its process, so no file needs removing)"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(holder).encode())
        _HELD_LOCKS.add(fd)
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        if os.getpid() == owner:  # (a forked child closed its copy at the fork: the number may be another file's now)
            os.close(fd)  # releases the lock
