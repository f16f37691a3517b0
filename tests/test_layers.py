"""The rooms' import directions (issue 9), read from every module's ``import`` statements with ``ast``.

cli -> repair -> (eval, merge) -> io -> kernels -> errors; organism -> (eval, io, training, tiny);
training -> kernels; tiny -> io. Nothing imports cli; eval never imports merge or repair; merge never imports
eval or repair. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mergekit_safe
import mergekit_safe.kernels

PKG = "mergekit_safe"
# A room may import the rooms listed (and, through them, nothing it could not import directly).
_BELOW: dict[str, set[str]] = {
    "errors": set(),
    "kernels": {"errors"},
    "io": {"kernels", "errors"},
    "training": {"kernels", "errors"},
    "tiny": {"io", "kernels", "errors"},
    "eval": {"io", "kernels", "errors"},
    "merge": {"io", "kernels", "errors"},
    "organism": {"eval", "io", "training", "tiny", "kernels", "errors"},
    "repair": {"eval", "merge", "io", "kernels", "errors"},
    "cli": {"repair", "eval", "merge", "io", "kernels", "errors", "organism", "training", "tiny", "root"},
    "__main__": {"cli"},
    # mergekit_safe/__init__.py (``__version__``, the errors; the rest of the public API is loaded lazily by
    # name): it sits beside errors at the bottom, so every room may import it.
    "root": {"errors"},
}


def _allowed(src: str) -> set[str]:
    return _BELOW[src] | ({"root"} if src != "errors" else set())


def _modules() -> list[tuple[str, Path]]:
    """Every module of the package as (dotted name, file); kernels/ is walked where it really lives."""
    roots = [(PKG, Path(mergekit_safe.__file__).parent), (f"{PKG}.kernels", Path(mergekit_safe.kernels.__file__).parent)]
    found = []
    for prefix, root in roots:
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).with_suffix("").parts
            if prefix == PKG and rel[0] == "kernels":
                continue  # the symlink / package-dir copy: walked from its real root
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            found.append((".".join((prefix, *parts)), f))
    return found


def _room(dotted: str) -> str:
    parts = dotted.split(".")
    return "root" if len(parts) == 1 else parts[1]


def _imported(module: str, path: Path) -> set[str]:
    """Dotted names of the package's modules that ``path`` imports (relative imports resolved)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PKG}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != PKG:
                continue
            # "from mergekit_safe import kernels" imports the room, "from mergekit_safe import X" the root
            out |= {f"{base}.{a.name}" if base == PKG and a.name in _BELOW else base for a in node.names}
    return out


def _edges() -> list[tuple[str, str, str]]:
    return [(mod, _room(mod), _room(target)) for mod, path in _modules() for target in _imported(mod, path)]


def test_every_module_belongs_to_a_known_room() -> None:
    rooms = {_room(mod) for mod, _ in _modules()}
    assert rooms <= set(_BELOW), rooms - set(_BELOW)
    assert {"cli", "repair", "eval", "merge", "io", "kernels", "errors", "organism", "training", "tiny"} <= rooms


def test_imports_point_down() -> None:
    bad = sorted(f"{mod} ({src}) imports {dst}" for mod, src, dst in _edges()
                 if src != dst and dst not in _allowed(src))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("room", "never"), [("eval", {"merge", "repair", "cli"}), ("merge", {"eval", "repair", "cli"}),
                                             ("io", {"merge", "eval", "repair", "cli"}), ("kernels", {"io", "cli"})])
def test_named_rules(room: str, never: set[str]) -> None:
    assert not [(m, d) for m, s, d in _edges() if s == room and d in never]


def test_nothing_imports_cli() -> None:
    assert not [(m, d) for m, s, d in _edges() if d == "cli" and s not in ("cli", "__main__")]


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The parser resolves absolute, relative and lazy imports: otherwise the rules above prove nothing."""
    f = tmp_path / "mod.py"
    f.write_text("def lazy():\n    from mergekit_safe.repair import command\n"
                 "from ..merge import engine\nimport mergekit_safe.cli\nfrom mergekit_safe import kernels\n")
    got = {_room(t) for t in _imported(f"{PKG}.eval.mod", f)}
    assert got == {"repair", "merge", "cli", "kernels"}


def test_only_the_cli_turns_errors_into_click_exceptions() -> None:
    """One error-to-ClickException wrapper: no other module builds a ClickException of its own."""
    users = [mod for mod, path in _modules() if "ClickException" in path.read_text()]
    assert users == [f"{PKG}.cli"], users
