"""The one atomic publish (minimal stand-in on this branch; H3's ``io/publish.py`` replaces it at integration).

A command writes into a hidden staging folder beside the output and the folder appears at the output path in
one rename only when complete; on any error or interrupt the staging folder is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from mergekit_safe.errors import OutputError


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


@contextlib.contextmanager
def staged_output(out: Path, *, overwrite: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty hidden staging folder beside ``out``; publish it atomically at ``out`` on a clean exit.

    Args:
        out: the output folder.
        overwrite: replace an existing ``out`` (only once the new folder is complete).
        inputs: input paths the output must not be, contain or lie inside.

    Yields:
        The staging folder to write into.

    Raises:
        OutputError: ``out`` exists without ``overwrite``, clashes with an input, or cannot be created.
    """
    out = Path(out)
    check_output_path(out, [str(p) for p in inputs])
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output folder ({e.strerror})") from None
    try:
        yield staging
        if out.exists():
            if not overwrite:
                raise OutputError(f"{out}: appeared while this run was writing; not replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "old")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["check_output_path", "staged_output"]
