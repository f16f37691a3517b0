"""The one atomic publish used by every command that writes a folder (merge, ema, repair, the organism cache).

A command writes into a hidden staging folder beside the output (``.NAME.partial-PID-RANDOM``) and the folder
appears at the output path in one rename only when complete; on any error or interrupt the staging folder is
removed. The rules that keep users' files safe:

* Without ``overwrite`` an existing output is refused, and the final rename is a no-replace rename, so a
  folder that appears at the output path meanwhile (made by hand, or by a second run) is never replaced.
* With ``overwrite`` only a previous mergekit-safe output is replaced: every output carries a manifest of
  the files written (:data:`MANIFEST`), and a folder holding anything the manifest does not list (or no
  manifest) is refused. Replacing removes only the files the manifest lists.
* A run holds an ``flock`` on its staging folder for its whole life; a later run to the same output removes
  staging folders whose lock is free and whose process is gone (a SIGKILLed run), never a live run's.
* Disk full (ENOSPC, EDQUOT) is one :class:`OutputError` line; parent folders made for the output are removed
  again when the run fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from mergekit_safe.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; a partial folder is then never taken for a dead run's
    fcntl = None  # type: ignore[assignment]

MANIFEST = "mergekit_safe_manifest.json"
_PARTIAL = ".partial-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# renameat2(2) flags (linux/fs.h) and AT_FDCWD (fcntl.h)
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextlib.contextmanager
def staged_output(out: Path, *, overwrite: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty hidden staging folder beside ``out``; publish it atomically at ``out`` on a clean exit.

    On any exception (including ``KeyboardInterrupt``) the staging folder and the parent folders made for it
    are removed and the exception is re-raised; an ``OSError`` of a full disk becomes one ``OutputError``
    line. A manifest of the files in the staging folder is written into it just before it is published.

    Args:
        out: the output folder; a symlink to a folder publishes at the link's target.
        overwrite: replace an existing previous mergekit-safe output at ``out`` (nothing else).
        inputs: input paths the output must not be, contain or lie inside.

    Yields:
        The staging folder to write into.

    Raises:
        OutputError: ``out`` exists (without ``overwrite``), is not a previous output (with it), clashes with
            an input, appeared while the run was writing, or the disk is full.

    Example:
        >>> with staged_output(Path("merged")) as folder:  # doctest: +SKIP
        ...     (folder / "config.json").write_text("{}")
    """
    shown = Path(out)
    target = check_publishable(shown, overwrite=overwrite, inputs=inputs)
    # Every name is recorded before the step that makes it, so an interrupt at any point is cleaned up.
    created: list[Path] = []
    staging = target.parent / f".{target.name}{_PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    lock_fd = -1
    try:
        _make_parents(target.parent, shown, created)
        clean_stale_partials(target)
        lock_fd = _make_staging(staging)
        yield staging
        if overwrite:  # again: the old output may have changed during the run (a new one: see _publish)
            _check_replaceable(shown, target, overwrite)
        try:
            _write_manifest(staging)
            _sync(staging)
            _publish(staging, target, shown, overwrite)
            _sync_dir(target.parent)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise
            raise OutputError(f"{shown}: cannot publish the output ({e.strerror})") from None
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_parents(created)
        err = _as_output_error(e, shown, staging)
        if err is e:
            raise
        raise err from None
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)  # releases the flock


def check_publishable(out: Path, *, overwrite: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """The checks :func:`staged_output` makes first, for a command to fail fast before a long run.

    Returns:
        The absolute folder the output will be published at (a symlink's target).

    Raises:
        OutputError: as :func:`staged_output`, for an output that exists, is not a previous output, or clashes
            with an input.
    """
    shown = Path(out)
    target = _target(shown)
    check_output_path(shown, [str(p) for p in inputs])
    _check_replaceable(shown, target, overwrite)
    return target


def check_output_path(out_dir: Path, inputs: Sequence[str]) -> None:
    """Refuse an output that is, contains, or lies inside an input (symlinks resolved).

    Raises:
        OutputError: naming the clashing input.
    """
    out = Path(out_dir).resolve()
    for inp in inputs:
        p = Path(inp).resolve()
        if out == p or p in out.parents or out in p.parents:
            raise OutputError(f"{out_dir}: output would overwrite or lie inside input {inp}; choose another -o")


def is_previous_output(folder: Path) -> bool:
    """Whether ``--overwrite`` may replace ``folder``: a mergekit-safe output holding only the files its manifest
    lists, or an empty folder."""
    try:
        return _unlisted(folder) is None
    except OutputError:
        return False


def clean_stale_partials(out: Path) -> list[Path]:
    """Remove staging folders of dead runs to ``out`` (their flock is free and their process is gone).

    Returns:
        The folders removed.
    """
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    prefix = f".{out.name}{_PARTIAL}"
    for p in [p for p in parent.iterdir() if p.name.startswith(prefix)]:
        pid = _pid_of(p.name)
        if fcntl is None:
            break
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, or not a folder we made
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run holds it
            except OSError:
                pass  # a filesystem without flock: the process check below decides alone
            # The lock is taken right after mkdir: a free lock with a live owner is a run between the two.
            if pid is None or _alive(pid):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


# --------------------------------------------------------------------------------------------------
# helpers


def _target(shown: Path) -> Path:
    """The absolute folder to publish at: ``-o .`` names the current folder, a symlink its target."""
    target = Path(os.path.abspath(shown))
    if target.is_symlink():
        real = target.resolve()
        if not real.is_dir():
            raise OutputError(f"{shown}: is a symlink to {real}, which is not a folder; choose another -o")
        target = real
    if target.parent == target:
        raise OutputError(f"{shown}: is a filesystem root; choose another -o")
    return target


def _check_replaceable(shown: Path, target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise OutputError(f"{shown}: already exists (pass --overwrite to replace it)")
    if not target.is_dir():
        raise OutputError(f"{shown}: exists and is not a folder; choose another -o")
    unlisted = _unlisted(target, shown)
    if unlisted is not None:
        raise OutputError(f"{shown}: holds {unlisted}, which mergekit-safe did not write; --overwrite replaces only "
                          f"a previous mergekit-safe output (move it away or choose another -o)")


def _walk(folder: Path) -> list[str]:
    """Relative paths of every non-folder entry below ``folder`` (symlinks are entries, never followed)."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        found += [(rel / f).as_posix() for f in files]
        found += [(rel / d).as_posix() for d in dirs if os.path.islink(os.path.join(root, d))]
    return sorted(found)


def _unlisted(folder: Path, shown: Path | None = None) -> str | None:
    """The first entry of ``folder`` its manifest does not list (None: all listed, or the folder is empty).

    Raises:
        OutputError: a non-empty folder without a readable manifest.
    """
    entries = _walk(folder)
    if not entries:
        return None
    shown = shown or folder
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["files"])
    except FileNotFoundError:
        raise OutputError(f"{shown}: is not a mergekit-safe output (no {MANIFEST}); --overwrite replaces only a "
                          f"previous mergekit-safe output, choose another -o") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"{shown}: {MANIFEST} is unreadable; refusing to replace the folder, choose another "
                          f"-o") from None
    return next((e for e in entries if e != MANIFEST and e not in listed), None)


def _write_manifest(staging: Path) -> None:
    from mergekit_safe import __version__

    files = [e for e in _walk(staging) if e != MANIFEST]
    body = {"tool": "mergekit-safe", "version": __version__, "files": files}
    (staging / MANIFEST).write_text(json.dumps(body, indent=1) + "\n")


def _sync(folder: Path) -> None:
    """Flush every file and folder below ``folder`` to disk before it is published.

    Without it a power loss right after the rename can leave a published folder of empty or short files: the
    rename reaches the journal before the delayed data writes do.
    """
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(root))


def _sync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename in it); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a folder: nothing more to do
            os.fsync(fd)
    finally:
        os.close(fd)


def _make_parents(parent: Path, shown: Path, made: list[Path]) -> None:
    """Create the missing parent folders, appending each to ``made`` (deepest last) as it is made."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue  # made by a concurrent run: not ours to remove
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise
            raise OutputError(f"{shown}: cannot create folder {p} ({e.strerror})") from None
        made.append(p)


def _remove_parents(made: list[Path]) -> None:
    for p in reversed(made):
        try:
            p.rmdir()  # only if still empty: something else may have been put there meanwhile
        except OSError:
            return


def _make_staging(staging: Path) -> int:
    """Make the staging folder and lock it for this run's life; returns the descriptor holding the lock."""
    staging.mkdir()
    if fcntl is None:
        return -1
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    with contextlib.suppress(OSError):  # no flock on this filesystem: the owner's pid alone protects it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _pid_of(name: str) -> int | None:
    tail = name.rpartition(_PARTIAL)[2]
    head = tail.partition("-")[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the kernel, libc or filesystem lacks it.

    Raises:
        OSError: the rename failed (EEXIST/ENOTEMPTY: ``dst`` exists under RENAME_NOREPLACE).
    """
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename folder ``src`` to ``dst``, failing with EEXIST if anything is at ``dst``.

    Fallback where renameat2 is missing: check, then ``os.rename``. POSIX ``rename`` of a folder never replaces
    a file or a non-empty folder (ENOTDIR / EEXIST / ENOTEMPTY) and Windows never replaces anything, so the
    only thing that could appear between the check and the rename and still be replaced is an empty folder:
    no data is lost, which is all a lock file around the check would add, at the price of a stray file on kill.
    """
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _publish(staging: Path, target: Path, shown: Path, overwrite: bool) -> None:
    try:
        if not (overwrite and os.path.lexists(target)):
            _rename_noreplace(staging, target)
            return
        if not _renameat2(staging, target, _RENAME_EXCHANGE):
            # no atomic exchange: move the old output aside under our staging name (a dead run's leftover
            # there is cleaned by the next run), then publish; a kill in between leaves no output, never a mix
            aside = staging.with_name(staging.name + "-old")
            os.rename(target, aside)
            _rename_noreplace(staging, target)
            staging = aside
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputError(f"{shown}: appeared while this run was writing (another run or a new folder); it "
                              f"was left alone and this run's output was discarded") from None
        raise
    # The new output is published: failing to remove the previous one (now at the staging name) must not fail
    # the run; what is left there is removed by the next run to this output once this process is gone.
    with contextlib.suppress(OSError):
        _remove_listed(staging)


def _remove_listed(old: Path) -> None:
    """Remove the files a previous output's manifest lists, then its emptied folders."""
    try:
        listed = set(json.loads((old / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()  # an empty folder was replaced
    for entry in _walk(old):
        if entry in listed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old / entry)
    for root, dirs, _ in sorted(os.walk(old), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(root)
    if old.exists():
        # Something unlisted arrived between the last check and the exchange: keep it where the user can see it.
        kept = old.with_name(old.name.partition(_PARTIAL)[0].lstrip(".") + f".kept-{uuid.uuid4().hex[:8]}")
        os.rename(old, kept)


def _as_output_error(e: BaseException, shown: Path, staging: Path) -> BaseException:
    """Name the output (not the hidden staging folder) in errors, and make a full disk one clean line."""
    if isinstance(e, OutputError):
        return OutputError(str(e).replace(str(staging), str(shown)))
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return OutputError(f"{shown}: disk full ({e.strerror}); nothing was written")
    return e
