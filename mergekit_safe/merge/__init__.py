"""merge: recipes (YAML), the merge-method registry, the streaming engine and ``inspect``. May import ``io``,
``kernels`` and ``errors``; never ``eval``, ``repair`` or the CLI."""
