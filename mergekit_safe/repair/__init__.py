"""repair: post-hoc safety repair: parameter groups, the in-memory candidate space, the objective, the search
strategies, the report, and the ``repair`` command as named phases. May import ``eval``, ``merge``, ``io``,
``kernels`` and ``errors``; never the CLI."""

from mergekit_safe.repair.command import RepairConfig, RepairResult, repair

__all__ = ["RepairConfig", "RepairResult", "repair"]
