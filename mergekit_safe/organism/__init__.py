"""organism: the built-in model organism (a tiny aligned model that refuses, and a benign fine-tune that loses
it) used by the demo and the tests. May import ``eval``, ``io``, ``training`` and ``errors``; never ``repair``,
``merge`` or the CLI."""

from mergekit_safe.organism.build import Organism, OrganismError, build_organism, default_cache_dir, is_built

__all__ = ["Organism", "OrganismError", "build_organism", "default_cache_dir", "is_built"]
