"""Runs ``mergekit-safe`` commands with a fault injected at a chosen point; used by tests/test_faults.py.

Usage: ``python tests/_fault_driver.py JOBS.json RESULTS.json``. JOBS is a list of
``{"args": [...], "fault": null | {"kind": "SIGKILL" | "SIGTERM" | "ENOSPC" | "EDQUOT", "at": N}, "log": path,
"barrier": null | {"dir": path, "parties": n}, "group": int}``. Jobs of one group run at the same time, groups
one after the other. Each job runs in a forked child, so torch is imported once for all of them (the parent
never runs torch code, so the fork is safe). The points ("events") are the steps that change the disk: every
write of a header or tensor piece, every side file and text file, making the staging folder, the manifest,
the publishing rename and the removal of an old output; each counts once before and once after the step. A
fault fires at event N: a signal sent to the process itself, or (before a step only) the step failing with a
full disk. A barrier makes every job of its group wait before publishing until all of them are there (two
concurrent writers publishing at the same moment). RESULTS gets, per job, its exit status (negative: killed by
that signal) and how many events it passed.
"""

from __future__ import annotations

import errno
import functools
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
    (publish, "_remove_listed"),
]


def _install(job: dict[str, Any], counter: list[int]) -> None:
    fault = job.get("fault")
    barrier = job.get("barrier")

    def event(phase: str) -> None:
        counter[0] += 1
        if fault is None or counter[0] != fault["at"]:
            return
        kind = fault["kind"]
        if kind in ("SIGKILL", "SIGTERM"):
            os.kill(os.getpid(), getattr(signal, kind))
            time.sleep(0.5)  # SIGTERM: the handler raises in the main thread at its next bytecode
        elif phase == "before":
            code = getattr(errno, kind)
            raise OSError(code, os.strerror(code))

    def wrap(fn: Any, name: str) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if barrier and name == "_rename_noreplace":
                _wait(Path(barrier["dir"]), barrier["parties"])
            event("before")
            out = fn(*args, **kwargs)
            event("after")
            return out

        return inner

    for owner, name in _STEPS:
        setattr(owner, name, wrap(getattr(owner, name), name))
    shutil.copy2 = wrap(shutil.copy2, "copy2")  # the side files


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


def run(jobs: list[dict[str, Any]]) -> list[dict[str, int]]:
    results: list[dict[str, int]] = [{} for _ in jobs]
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
    return results


if __name__ == "__main__":
    jobs = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run(jobs)))
