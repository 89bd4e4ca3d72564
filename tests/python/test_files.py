"""Files sdrpn writes: atomic, with the mode the umask gives, and checkpoints that a kill at
any moment leaves resumable."""

import os
import stat
from pathlib import Path

import pytest
import torch

from sdrpn.io_utils import read_json, read_jsonl, write_atomic, write_json
from sdrpn.rpn.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, mask, mode):
    from safetensors.torch import save_file

    rpn, opt, sched = make(1.0)
    old = os.umask(mask)
    try:
        write_json(str(tmp_path / "a.json"), {"x": 1})
        # safetensors replaces the file it writes with one of mode 0600
        write_atomic(str(tmp_path / "t.safetensors"), lambda path: save_file({"x": torch.zeros(1)}, path))
        ckpt = save_checkpoint(str(tmp_path / "run"), rpn, opt, sched, {"global_step": 1}, keep=1)
    finally:
        os.umask(old)
    for path in (tmp_path / "a.json", tmp_path / "t.safetensors", *Path(ckpt).iterdir()):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path
    assert read_json(str(tmp_path / "a.json")) == {"x": 1}


class TinyRPN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def save(self, folder):
        from safetensors.torch import save_file

        write_atomic(os.path.join(folder, "rpn.safetensors"), lambda path: save_file({"w": self.w.detach()}, path))


def make(step_value):
    rpn = TinyRPN()
    opt = torch.optim.AdamW(rpn.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rpn.w.grad = torch.full((3,), step_value)
    opt.step()
    sched.step()
    return rpn, opt, sched


def test_a_resave_at_the_same_step_never_replaces_what_latest_names(tmp_path, monkeypatch):
    rpn, opt, sched = make(1.0)
    first = save_checkpoint(str(tmp_path), rpn, opt, sched, {"global_step": 5}, keep=2)
    # Killed after the second checkpoint's rename but before latest.json moved on: the
    # pointer must still name a complete checkpoint.
    import sdrpn.rpn.checkpoints as checkpoints

    real_write = checkpoints.write_json

    def killed(path, payload):
        if path.endswith("latest.json"):
            raise KeyboardInterrupt("killed")
        real_write(path, payload)

    monkeypatch.setattr(checkpoints, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), rpn, opt, sched, {"global_step": 5}, keep=1)
    monkeypatch.undo()
    assert latest_checkpoint(str(tmp_path)) == first and os.path.isdir(first)
    fresh, fresh_opt, fresh_sched = make(0.0)
    assert load_checkpoint(first, fresh, fresh_opt, fresh_sched) == {"global_step": 5}
    assert torch.equal(fresh.w, rpn.w)
    # The next complete save moves the pointer and prunes down to `keep`.
    second = save_checkpoint(str(tmp_path), rpn, opt, sched, {"global_step": 5}, keep=1)
    assert second != first and latest_checkpoint(str(tmp_path)) == second
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest.json", os.path.basename(second)]


def test_the_newest_checkpoints_are_kept_as_many_as_asked(tmp_path):
    """latest.json beside the step folders is not one of the checkpoints `keep` counts; a
    checkpoint holds no file of a save of its step that a kill stopped before."""
    rpn, opt, sched = make(1.0)
    stale = tmp_path / "checkpoints" / "step-00000002.tmp"  # a save of step 2 killed half-way
    stale.mkdir(parents=True)
    (stale / "optimizer.safetensors.part").write_text("half")
    saved = [save_checkpoint(str(tmp_path), rpn, opt, sched, {"global_step": step}, keep=2) for step in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest.json", *map(os.path.basename, saved[1:])]
    assert latest_checkpoint(str(tmp_path)) == saved[-1]
    assert sorted(os.listdir(saved[1])) == ["optimizer.safetensors", "rpn.safetensors", "trainer_state.json"]


def test_a_second_job_on_a_held_output_fails_at_once_naming_the_holder(tmp_path):
    import json
    import signal
    import socket
    import subprocess
    import sys

    from sdrpn.io_utils import FolderBusy, exclusive_lock

    lock = str(tmp_path / "out" / ".rank000.lock")
    with exclusive_lock(lock):
        with pytest.raises(FolderBusy, match=rf'"pid": {os.getpid()}, "host": "{socket.gethostname()}"'):
            with exclusive_lock(lock):
                pass
    with exclusive_lock(lock):  # released on exit
        pass
    # Held by another process that is then killed: the lock goes with it.
    code = (
        f"from sdrpn.io_utils import exclusive_lock\n"
        f"with exclusive_lock({lock!r}):\n print('held', flush=True)\n input()"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=f'"pid": {child.pid}'):
            with exclusive_lock(lock):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with exclusive_lock(lock):
        assert json.loads(open(lock).read())["pid"] == os.getpid()


def test_a_lock_file_names_its_holder_alone(tmp_path):
    """A holder's record replaces a longer one an earlier holder left: it reads as JSON."""
    import json

    from sdrpn.io_utils import exclusive_lock

    lock = tmp_path / ".train.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "an-earlier-holder-on-a-host-of-a-long-name", "started": "then"}))
    with exclusive_lock(str(lock)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_atomic_writes_leave_no_descriptor_open(tmp_path):
    """A labelling or training job writes thousands of files: one descriptor kept a write
    would run it out of them."""
    write_json(str(tmp_path / "warm.json"), {})  # anything opened once per process
    before = len(os.listdir("/proc/self/fd"))
    for i in range(5):
        write_json(str(tmp_path / f"{i}.json"), {"i": i})
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    """DataLoader workers are forks of the job: they must not hold its output once it is
    killed (they notice their parent's death only seconds later)."""
    import signal
    import subprocess
    import sys

    from sdrpn.io_utils import exclusive_lock

    lock = str(tmp_path / ".train.lock")
    code = (
        "import os, time\nfrom sdrpn.io_utils import exclusive_lock\n"
        f"with exclusive_lock({lock!r}):\n"
        " pid = os.fork()\n"
        " if pid == 0:\n  time.sleep(60); os._exit(0)\n"
        " print(pid, flush=True)\n input()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    forked = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(forked, 0)  # the fork still runs
        with exclusive_lock(lock):
            pass
    finally:
        os.kill(forked, signal.SIGKILL)


def test_what_a_kill_left_half_written_is_removed_by_its_writer(tmp_path):
    from sdrpn.io_utils import remove_temporaries
    from sdrpn.labels.folder import LabelFolder
    from sdrpn.rpn.checkpoints import remove_unfinished

    # write_atomic names its temporaries as remove_temporaries finds them.
    seen = []
    write_atomic(str(tmp_path / "a.json"), lambda tmp: seen.append(os.path.basename(tmp)))
    assert seen[0].startswith(".tmp-a.json.") and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    (tmp_path / "a.json").unlink()
    names = [
        ".tmp-rank000-shard00001.safetensors.ab12cd34",
        ".tmp-rank001-shard00000.jsonl.x",
        ".tmp-label_config.json.y",
    ]
    for name in names:
        (tmp_path / name).write_text("half")
    LabelFolder(str(tmp_path)).remove_unfinished(1)  # rank 1's own, not rank 0's or the config's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[2]])
    (tmp_path / ".tmp-label_config.json.2.z").write_text("another file's, a.json.2 beside a.json")
    LabelFolder(str(tmp_path)).remove_unfinished(0)  # rank 0 also writes the config and summary
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-label_config.json.2.z"]
    remove_temporaries(str(tmp_path), "label_config.json.2")
    assert not list(tmp_path.iterdir())
    (tmp_path / "checkpoints" / "step-00000004.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000002").mkdir()
    (tmp_path / "checkpoints" / ".tmp-latest.json.k2j3").write_text("{")
    remove_unfinished(str(tmp_path))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]


def test_a_damaged_json_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"id": 1}\n\n[2, 3]\n')
    assert read_jsonl(str(path)) == [{"id": 1}, [2, 3]]
    # A line nested past the parser's recursion limit is named as a damaged one is.
    for damaged in (b'{"id": "s1", "broken\n', b'{"id": "\xff"}\n', b"[" * 100_000 + b"]" * 100_000 + b"\n"):
        path.write_bytes(b'{"id": 1}\n' + damaged)
        with pytest.raises(ValueError, match=rf"^{path} line 2 is not JSON \("):
            read_jsonl(str(path))
