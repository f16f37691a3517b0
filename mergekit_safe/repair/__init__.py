"""repair: post-hoc safety repair. ``groups`` (which tensors share a coefficient, and the inverse recipe rules),
``space`` (candidates applied in place), ``objective`` (evaluator, trial bookkeeping, the study), ``strategies``
(the method registry, bracketing, TPE, NSGA-II), ``report`` (report dataclass and plot) and ``command`` (the
``repair`` command as named phases). May import ``eval``, ``merge``, ``io``, ``kernels`` and ``errors``; never
the CLI."""

from mergekit_safe.repair.command import RepairConfig, RepairResult, repair

__all__ = ["RepairConfig", "RepairResult", "repair"]
