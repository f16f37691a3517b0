"""The one atomic publish (mergekit_safe.io.publish): what --overwrite may replace, no-replace publish, stale
partials of dead runs, disk full, parent folders, symlinked outputs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_safe.cli import main
from mergekit_safe.errors import OutputError
from mergekit_safe.io import publish
from mergekit_safe.io.publish import MANIFEST, clean_stale_partials, is_previous_output, staged_output

ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (symlinks as their target text)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = b"-> " + os.fsencode(os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def write_output(out: Path, files: dict[str, str], **kw: object) -> None:
    with staged_output(out, **kw) as folder:
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's (notes and a sub-folder), returned as its contents."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my only copy")
    (path / "sub" / "model.safetensors").write_bytes(b"not ours")
    return tree(path)


@pytest.fixture(params=["renameat2", "portable"])
def rename_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every publish test runs with renameat2 and with the portable fallback (as on a kernel without it)."""
    if request.param == "portable":
        monkeypatch.setattr(publish, "_renameat2", lambda src, dst, flags: False)
    return request.param


def test_publish_writes_a_manifest_and_leaves_nothing_else(tmp_path: Path, rename_impl: str) -> None:
    write_output(tmp_path / "out", {"a.txt": "1", "d/b.txt": "2"})
    assert sorted(os.listdir(tmp_path)) == ["out"]
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["tool"] == "mergekit-safe" and manifest["files"] == ["a.txt", "d/b.txt"]
    assert tree(tmp_path / "out").keys() == {"a.txt", "d/b.txt", MANIFEST}
    assert is_previous_output(tmp_path / "out")


def test_error_removes_staging_and_created_parents(tmp_path: Path, rename_impl: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("x")
    with pytest.raises(RuntimeError, match="boom"), staged_output(tmp_path / "a" / "b" / "c" / "out") as folder:
        (folder / "x.safetensors").write_bytes(b"123")
        raise RuntimeError("boom")
    assert tree(tmp_path) == {"a/mine.txt": b"x"}  # b/ and c/ were made for the run and removed again
    assert sorted(os.listdir(tmp_path / "a")) == ["mine.txt"]


def test_existing_output_is_refused_without_overwrite(tmp_path: Path, rename_impl: str) -> None:
    before = user_folder(tmp_path / "out")
    with pytest.raises(OutputError, match=r"out: already exists \(pass --overwrite to replace it\)$"):
        write_output(tmp_path / "out", {"a.txt": "1"})
    assert tree(tmp_path / "out") == before and sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_refuses_a_folder_it_did_not_write(tmp_path: Path, rename_impl: str) -> None:
    before = user_folder(tmp_path / "work")
    with pytest.raises(OutputError, match=f"work: is not a mergekit-safe output \\(no {MANIFEST}\\)"):
        write_output(tmp_path / "work", {"a.txt": "1"}, overwrite=True)
    assert tree(tmp_path / "work") == before and sorted(os.listdir(tmp_path)) == ["work"]


def test_overwrite_replaces_a_previous_output_and_removes_only_its_files(tmp_path: Path, rename_impl: str) -> None:
    out = tmp_path / "out"
    write_output(out, {"old.txt": "old", "model.safetensors": "old"})
    (tmp_path / "victim.txt").write_text("keep")
    write_output(out, {"model.safetensors": "new"}, overwrite=True)
    assert tree(out) == {"model.safetensors": b"new", MANIFEST: (out / MANIFEST).read_bytes()}
    assert sorted(os.listdir(tmp_path)) == ["out", "victim.txt"]
    # a user file added to an output makes it the user's: refused, nothing removed
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(OutputError, match="out: holds notes.txt, which mergekit-safe did not write"):
        write_output(out, {"model.safetensors": "newer"}, overwrite=True)
    assert tree(out) == before


def test_a_hostile_manifest_cannot_delete_outside_the_output(tmp_path: Path, rename_impl: str) -> None:
    out = tmp_path / "out"
    write_output(out, {"a.txt": "1"})
    (tmp_path / "victim.txt").write_text("keep")
    (out / MANIFEST).write_text(json.dumps({"files": ["a.txt", "../victim.txt", str(tmp_path / "victim.txt")]}))
    write_output(out, {"b.txt": "2"}, overwrite=True)
    assert (tmp_path / "victim.txt").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["out", "victim.txt"] and (out / "b.txt").read_text() == "2"


def test_symlinked_output_is_replaced_at_its_target(tmp_path: Path, rename_impl: str) -> None:
    (tmp_path / "store").mkdir()
    write_output(tmp_path / "store" / "real", {"a.txt": "old"})
    (tmp_path / "link").symlink_to(tmp_path / "store" / "real")
    with pytest.raises(OutputError, match="link: already exists"):
        write_output(tmp_path / "link", {"a.txt": "new"})
    write_output(tmp_path / "link", {"a.txt": "new"}, overwrite=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "a.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link", "store"]  # no hidden .link.old-* entry
    assert sorted(os.listdir(tmp_path / "store")) == ["real"]


def test_a_folder_that_appears_meanwhile_is_never_replaced(tmp_path: Path, rename_impl: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="out: appeared while this run was writing"):
        with staged_output(out) as folder:
            (folder / "model.safetensors").write_text("ours")
            before = user_folder(out)  # e.g. the user made it by hand, or a second merge published first
    assert tree(out) == before and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_user_file_added_to_the_old_output_meanwhile_is_kept(tmp_path: Path, rename_impl: str) -> None:
    out = tmp_path / "out"
    write_output(out, {"a.txt": "old"})
    with pytest.raises(OutputError, match="holds notes.txt"):
        with staged_output(out, overwrite=True) as folder:
            (folder / "a.txt").write_text("new")
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and (out / "a.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_user_file_added_after_the_last_check_survives(tmp_path: Path, rename_impl: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    write_output(out, {"a.txt": "old"})
    real = publish._write_manifest

    def late_write(staging: Path) -> None:  # runs after the last check, right before the publishing rename
        real(staging)
        (out / "notes.txt").write_text("mine")

    monkeypatch.setattr(publish, "_write_manifest", late_write)
    write_output(out, {"a.txt": "new"}, overwrite=True)
    assert (out / "a.txt").read_text() == "new"
    kept = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert len(kept) == 1 and kept[0].name.startswith("out.kept-"), kept  # visible, not a hidden leftover
    assert tree(kept[0]) == {"notes.txt": b"mine"}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path: Path, code: int) -> None:
    with pytest.raises(OutputError) as info, staged_output(tmp_path / "x" / "out") as folder:
        (folder / "a.txt").write_text("1")
        raise OSError(code, os.strerror(code))
    assert str(info.value) == f"{tmp_path / 'x' / 'out'}: disk full ({os.strerror(code)}); nothing was written"
    assert os.listdir(tmp_path) == []


def test_errors_name_the_output_not_the_staging_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError) as info, staged_output(tmp_path / "out") as folder:
        raise OutputError(f"{folder / 'model.safetensors'}: disk full while writing tensor 'w'")
    assert str(info.value) == f"{tmp_path / 'out' / 'model.safetensors'}: disk full while writing tensor 'w'"


def test_output_clashing_with_an_input_or_a_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(OutputError, match="lie inside input"):
        write_output(tmp_path / "model" / "out", {}, inputs=[tmp_path / "model"])
    (tmp_path / "alias").symlink_to(tmp_path / "model")
    with pytest.raises(OutputError, match="lie inside input"):
        write_output(tmp_path / "alias", {}, overwrite=True, inputs=[tmp_path / "model"])
    with pytest.raises(OutputError, match="is a filesystem root"):
        write_output(Path("/"), {}, overwrite=True)
    assert os.listdir(tmp_path / "model") == []


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mergekit_safe.io.publish import staged_output
    with staged_output(Path(sys.argv[1])) as folder:
        (folder / "a.txt").write_text("partial")
        print(folder, flush=True)
        time.sleep(120)
""")


def _holder(out: Path) -> tuple[subprocess.Popen[str], Path]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_stale_partials_of_dead_runs_are_cleaned_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    live, live_partial = _holder(out)
    dead, dead_partial = _holder(out)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        assert dead_partial.is_dir()  # SIGKILL gives no chance to clean up
        # a partial whose owner is alive but has not taken the lock yet (between mkdir and flock)
        unlocked = tmp_path / f".out.partial-{os.getpid()}-0000abcd"
        unlocked.mkdir()
        write_output(out, {"a.txt": "done"})
        assert not dead_partial.exists()
        assert live_partial.is_dir() and (live_partial / "a.txt").read_text() == "partial" and unlocked.is_dir()
        assert clean_stale_partials(out) == []
    finally:
        live.kill()
        live.wait(timeout=30)
    unlocked.rmdir()
    assert clean_stale_partials(out) == [live_partial]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_locked_partial_is_kept_whatever_its_pid(tmp_path: Path) -> None:
    import fcntl

    partial = tmp_path / ".out.partial-99999999-0000abcd"  # no such process (pid reused, another pid namespace)
    partial.mkdir()
    fd = os.open(partial, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # but a live run holds its lock
        assert clean_stale_partials(tmp_path / "out") == [] and partial.is_dir()
    finally:
        os.close(fd)
    assert clean_stale_partials(tmp_path / "out") == [partial] and not partial.exists()


def test_cli_overwrite_of_the_current_folder_is_one_line(tmp_path: Path, tiny_pair: tuple[Path, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    before = user_folder(work)
    monkeypatch.chdir(work)
    for target in (".", str(work)):
        result = CliRunner().invoke(main, ["merge", "--method", "lerp", "--alpha", "0.5", *map(str, tiny_pair),
                                           "-o", target, "--overwrite", "--no-progress"])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip().splitlines() == [
            f"Error: {target}: is not a mergekit-safe output (no {MANIFEST}); --overwrite replaces only a previous "
            "mergekit-safe output, choose another -o"]
    assert tree(work) == before and sorted(os.listdir(tmp_path)) == ["work"]


def test_merge_into_writes_the_same_checkpoint_without_publishing(tmp_path: Path,
                                                                   tiny_pair: tuple[Path, Path]) -> None:
    from mergekit_safe.merge.engine import merge, merge_into
    from mergekit_safe.merge.recipe import ModelSpec, Recipe

    recipe = Recipe("lerp", [ModelSpec(str(tiny_pair[1]))], base_model=str(tiny_pair[0]), parameters={"alpha": 0.3})
    published = merge(recipe, tmp_path / "merged", progress=False)
    assert published.out_dir == tmp_path / "merged"
    (tmp_path / "into").mkdir()
    result = merge_into(recipe, tmp_path / "into", progress=False)
    assert result.out_dir == tmp_path / "into"
    assert MANIFEST not in os.listdir(tmp_path / "into")  # not published: the caller's staging adds it
    assert sorted(os.listdir(tmp_path / "into")) == sorted(set(os.listdir(tmp_path / "merged")) - {MANIFEST})
    got, want = load_file(tmp_path / "into" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    a, b = load_file(tiny_pair[0] / "model.safetensors"), load_file(tiny_pair[1] / "model.safetensors")
    for name, t in want.items():
        assert torch.equal(got[name], t), name
        ref = 0.7 * a[name].double() + 0.3 * b[name].double()  # float64 reference
        assert torch.allclose(t.double(), ref, atol=1e-6, rtol=0), name  # fp32 math on values < 1: a few ulp
    with pytest.raises(OutputError, match="not an existing folder"):
        merge_into(recipe, tmp_path / "missing", progress=False)
