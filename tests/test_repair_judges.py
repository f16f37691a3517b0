"""``repair --judge keyword,guard`` (issue 12, section 3): the search optimises the first judge; the references and
the chosen candidate report every judge and their agreement.

References: a guard-shaped tiny model that answers "unsafe" to everything (so its column and the confusion table
are known from the keyword judge's counts alone), and Cohen's kappa from its textbook formula on that table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mergekit_safe.cli import main
from tests.test_repair import _base_args, organism  # noqa: F401 - the session's model organism fixture

# under pytest -n (--dist loadgroup) one worker runs every test of the model organism: it is built once
pytestmark = pytest.mark.xdist_group("organism")


def _always_unsafe_guard(folder: Path) -> Path:
    from mergekit_safe.eval.guard import GUARD_FORMATS
    from tests.eval.guard_models import (
        LLAMA_GUARD_TEMPLATE,
        bigram_guard,
        guard_tokenizer,
        save,
    )

    tok = guard_tokenizer(LLAMA_GUARD_TEMPLATE)
    fmt = GUARD_FORMATS["llama_guard"]
    last = tok(fmt.render(tok, "a question", "an answer"), add_special_tokens=fmt.add_special_tokens)["input_ids"][-1]
    return save(bigram_guard(tok, last, "unsafe\nS1"), tok, folder)


def _kappa(table: list[list[int]]) -> float:
    (n00, n01), (n10, n11) = table
    n = n00 + n01 + n10 + n11
    po = (n00 + n11) / n
    pe = ((n10 + n11) / n) * ((n01 + n11) / n) + ((n00 + n01) / n) * ((n00 + n10) / n)
    return math.nan if pe == 1 else (po - pe) / (1 - pe)


def test_repair_reports_every_judge_and_optimises_the_first(organism: Any, tmp_path: Path) -> None:  # noqa: F811
    guard = _always_unsafe_guard(tmp_path / "guard")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [*_base_args(organism, out), "--judge", "keyword,guard", "--judge-model", str(guard),
                                  "--guard-format", "llama_guard", "--trials", "4", "--max-new-tokens", "8",
                                  "--harmful-limit", "12", "--benign-limit", "8", "--utility-limit", "8",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "repair_report.json").read_text())
    for name in ("base", "finetuned", "repaired"):
        row = report["metrics"][name]
        panel = row["judges"]
        kw, gd = panel["rates"]["keyword"]["unsafe"], panel["rates"]["guard"]["unsafe"]
        assert kw == row["unsafe"]  # the row's rate is the first judge's (no framings: direct prompts only)
        assert gd["k"] == gd["n"] == 12  # the guard calls everything unsafe
        (agree,) = panel["agreement"]
        assert (agree["a"], agree["b"]) == ("keyword", "guard")
        k = kw["k"]
        assert agree["table"] == [[0, 12 - k], [0, k]]
        want = _kappa(agree["table"])
        assert (agree["kappa"] is None and math.isnan(want)) or agree["kappa"] == pytest.approx(want, abs=1e-12)
    # the search optimised the keyword judge: the guard's rate is 1 everywhere, the keyword's is not
    judged = [t for t in report["trials"] if t["judged"]]
    assert judged and min(t["unsafe"]["rate"] for t in judged) < 1.0
    assert report["metrics"]["base"]["unsafe"]["rate"] < 1.0
    card = (out / "README.md").read_text()
    assert "Every judge on the direct harmful prompts" in card and "keyword vs guard: kappa" in card


def test_judge_list_is_checked_by_the_shared_parser() -> None:
    from mergekit_safe.errors import EvalError
    from mergekit_safe.eval.judges import judge_names
    from mergekit_safe.repair.command import RepairConfig, _check_settings

    assert judge_names("keyword, guard") == ["keyword", "guard"]
    cfg = RepairConfig(Path("a"), Path("b"), Path("o"), judge="keyword,nope")
    with pytest.raises(EvalError, match="unknown judge nope; choose from keyword"):
        _check_settings(cfg)
    from mergekit_safe.errors import SearchError

    with pytest.raises(SearchError, match="--judge guard needs --judge-model PATH"):
        _check_settings(RepairConfig(Path("a"), Path("b"), Path("o"), judge="keyword,guard"))
