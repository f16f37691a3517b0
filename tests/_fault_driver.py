"""Runs ``mergekit-safe`` commands with a fault injected at a chosen point; used by tests/test_faults.py.

Usage: ``python tests/_fault_driver.py JOBS.json RESULTS.json``. JOBS is a list of
``{"args": [...], "fault": null | {"kind": "SIGKILL" | "SIGTERM" | "ENOSPC" | "EDQUOT", "at": N}, "log": path,
"barrier": null | {"dir": path, "parties": n}, "group": int}``. Jobs of one group run at the same time, groups
one after the other. Each job runs in a forked child, so torch is imported once for all of them (the parent
never runs torch code, so the fork is safe). The points ("events") are the steps that change the disk: every
write of a header or tensor piece, every side file and text file, making the staging folder, the manifest,
the publishing rename and the removal of an old output; each counts once before and once after the step. A
fault fires at event N: a signal sent to the process itself, or a full disk failing the first step that starts
at or after event N (for a shard write the writer's file fails, so the writer's own error handling runs). A
barrier makes every job of its group wait before publishing until all of them are there (two concurrent
writers publishing at the same moment). ``"snapshot": {"label": folder}`` records, right after the job, every
entry below each folder with its sha256, so one driver run holds both a fault and the rerun after it.
``"preload": [module, ...]`` names modules the driver imports before forking (importing runs no torch code), so
that commands whose cost is mostly imports (``repair`` loads transformers, optuna, matplotlib) do not pay it in
every child. RESULTS gets, per job, its exit status (negative: killed by that signal), how many events it
passed, and its snapshots. ``"keep": {folder: copy}`` copies each folder that exists, after the snapshots, so a
test can read what a faulted run published after a later rerun has replaced it.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mergekit_safe.cli import main
from mergekit_safe.io import publish, writer

_STEPS = [
    (writer.CheckpointWriter, "_raw_write"),
    (writer.CheckpointWriter, "write_text"),
    (publish, "_make_staging"),
    (publish, "_write_manifest"),
    (publish, "_rename_noreplace"),
    (publish, "_publish"),
    (publish, "_remove_listed"),
]


def _install(job: dict[str, Any], counter: list[int]) -> None:
    fault = job.get("fault")
    barrier = job.get("barrier")

    fired = [False]

    def event(phase: str, owner: Any = None) -> None:
        counter[0] += 1
        if fault is None or fired[0] or counter[0] < fault["at"]:
            return
        kind = fault["kind"]
        if kind in ("SIGKILL", "SIGTERM"):
            fired[0] = True
            os.kill(os.getpid(), getattr(signal, kind))
            time.sleep(0.5)  # SIGTERM: the handler raises in the main thread at its next bytecode
        elif phase == "before":  # a full disk fails the first step starting at or after event N
            fired[0] = True
            code = getattr(errno, kind)
            if owner is not None:
                owner._file = _FullDisk(owner._file, code)  # the writer's own write fails, and every one after
            else:
                raise OSError(code, os.strerror(code))

    def wrap(fn: Any, name: str) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if barrier and name == "_rename_noreplace":
                _wait(Path(barrier["dir"]), barrier["parties"])
            event("before", args[0] if name == "_raw_write" else None)
            out = fn(*args, **kwargs)
            event("after")
            return out

        return inner

    for owner, name in _STEPS:
        setattr(owner, name, wrap(getattr(owner, name), name))
    shutil.copy2 = wrap(shutil.copy2, "copy2")  # the side files


class _FullDisk:
    """A shard file on a full disk: every write fails with ``code``, as the real file's would."""

    def __init__(self, file: Any, code: int) -> None:
        self.file, self.code = file, code

    def write(self, data: Any) -> int:
        raise OSError(self.code, os.strerror(self.code))

    def close(self) -> None:
        self.file.close()


def _wait(folder: Path, parties: int) -> None:
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < parties and time.monotonic() < deadline:
        time.sleep(0.01)


def _child(job: dict[str, Any], counts: str) -> None:
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    counter = [0]
    _install(job, counter)
    code = 0
    try:
        main.main(job["args"], prog_name="mergekit-safe", standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        Path(counts).write_text(str(counter[0]))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry below ``folder``, hidden ones included: a file's sha256, or "dir"."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for name in sorted({m for j in jobs for m in j.get("preload", [])}):
        importlib.import_module(name)
    results: list[dict[str, Any]] = [{} for _ in jobs]
    for group in sorted({j.get("group", i) for i, j in enumerate(jobs)}):
        pids = {}
        for i, job in enumerate(jobs):
            if job.get("group", i) != group:
                continue
            counts = job["log"] + ".events"
            if os.path.exists(counts):
                os.unlink(counts)
            pid = os.fork()
            if pid == 0:
                _child(job, counts)
            pids[pid] = (i, counts)
        for pid, (i, counts) in pids.items():
            _, status = os.waitpid(pid, 0)
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            events = int(Path(counts).read_text()) if os.path.exists(counts) else -1
            results[i] = {"rc": rc, "events": events}
        for pid, (i, _) in pids.items():  # the state each job left, before any later job (a rerun) changes it
            results[i]["snapshot"] = {k: snapshot(Path(d)) for k, d in jobs[i].get("snapshot", {}).items()}
            for src, dst in jobs[i].get("keep", {}).items():
                if os.path.isdir(src):
                    shutil.copytree(src, dst)
    return results


if __name__ == "__main__":
    jobs = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run(jobs)))
