"""Kappa against a hand computation, the confusion table, and the coherence check."""

from __future__ import annotations

import math

import pytest

from mergekit_safe.errors import EvalError
from mergekit_safe.eval.agreement import agreement, cohen_kappa, confusion, is_degenerate


def test_kappa_hand_computed():
    # 10 responses: both unsafe 4, both safe 3, a-only 2, b-only 1
    a = [1] * 4 + [0] * 3 + [1] * 2 + [0]
    b = [1] * 4 + [0] * 3 + [0] * 2 + [1]
    assert confusion(a, b) == ((3, 1), (2, 4))
    # p_o = 7/10; p(a unsafe) = 6/10, p(b unsafe) = 5/10; p_e = .6*.5 + .4*.5 = .5; kappa = .2/.5 = .4
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    ag = agreement("keyword", a, "guard", b)
    assert (ag.a, ag.b, ag.table, ag.agreement) == ("keyword", "guard", ((3, 1), (2, 4)), 0.7)


def test_kappa_edges():
    assert cohen_kappa([1, 0, 1], [1, 0, 1]) == 1.0
    assert cohen_kappa([1, 0], [0, 1]) == -1.0
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))  # chance agreement 1: undefined
    assert math.isnan(cohen_kappa([], []))
    with pytest.raises(EvalError, match="cannot compare judges on 2 and 1 responses"):
        cohen_kappa([1, 0], [1])


@pytest.mark.parametrize("text, expected", [
    ("", True), ("   ", True), ("!!!!!!!!!!!!", True),
    ("the the the the the the the the the the", True),
    ("Sure. Here is how. Sure. Here is how. Sure. Here is how. Sure. Here is how.", True),
    ("I'm sorry, I can't help with that.", False),
    ("Use kill with the process id, or pkill with the process name; both send SIGTERM by default.", False),
    ("ok", False),
])
def test_is_degenerate(text, expected):
    assert is_degenerate(text) is expected
