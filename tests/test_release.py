"""``Checkpoint.release`` really drops pages, and a merge's peak memory is set by its chunk, not by the model.

Both read the kernel's own accounting (Linux ``/proc``): a no-op ``release`` fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_safe.io.reader import open_checkpoint

linux = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux /proc accounting")
MB = 1 << 20


def _mapping_rss(addr: int) -> int:
    """Bytes of the mapping that holds ``addr`` resident in this process (``Rss`` in /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {addr:#x}")


@linux
def test_release_drops_the_tensors_pages_from_the_process(tmp_path: Path) -> None:
    save_file({"w": torch.randn(4 * MB), "v": torch.randn(1000)}, tmp_path / "model.safetensors")  # 16 MB + a bit
    with open_checkpoint(tmp_path) as ckpt:
        t = ckpt.get("w")
        expected = t.clone()
        assert float(t.sum()) == float(expected.sum())  # every page touched
        nbytes = t.numel() * t.element_size()
        resident = _mapping_rss(t.data_ptr())
        assert resident >= 0.95 * nbytes, resident
        ckpt.release("w")
        dropped = _mapping_rss(t.data_ptr())
        assert dropped <= 0.05 * nbytes, f"{dropped} of {nbytes} bytes still resident after release"
        assert torch.equal(ckpt.get("w"), expected)  # the pages come back from the file on the next read


_CHILD = """
import json, sys
from pathlib import Path
import torch
from mergekit_safe.merge.engine import merge
from mergekit_safe.merge.recipe import ModelSpec, Recipe

root, chunk = Path(sys.argv[1]), int(sys.argv[2])
recipe = Recipe("linear", [ModelSpec(str(root / "a")), ModelSpec(str(root / "b"))], parameters={"weight": 0.5})
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark: VmHWM now measures the merge alone
merge(recipe, root / f"out{chunk}", chunk_elems=chunk, progress=False, hash_inputs=False, device="cpu")
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def _peak_growth(root: Path, chunk: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(chunk)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["growth"]


@linux
def test_merge_peak_memory_is_set_by_the_chunk(tmp_path: Path) -> None:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the RSS high-water mark here")
    for name, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        (tmp_path / name).mkdir()
        save_file({"w": torch.randn(8 * MB, generator=g), "v": torch.randn(MB, generator=g)},
                  tmp_path / name / "model.safetensors")
    input_bytes = 2 * 9 * MB * 4  # 72 MB of fp32 inputs
    small_chunk, large_chunk = 64 * 1024, 8 * MB
    small, large = _peak_growth(tmp_path, small_chunk), _peak_growth(tmp_path, large_chunk)
    # Measured: ~13 MB with release, ~80 MB (all input pages) when release is a no-op.
    assert small < 0.35 * input_bytes, f"peak grew {small / MB:.0f} MB for {input_bytes / MB:.0f} MB of inputs"
    # A 32 MB chunk needs at least one more 32 MB buffer than a 256 KB one.
    assert large - small >= large_chunk * 4, (small / MB, large / MB)
