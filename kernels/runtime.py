"""Where the math runs: the kernel backend and the device.

Library code never changes these for the process. The CLI entry reads the environment once
(``MERGEKIT_SAFE_BACKEND`` -> ``--backend``, ``MERGEKIT_SAFE_DEVICE`` -> ``--device``) and passes the values
down; the backend is set inside a scope that restores the previous value on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from mergekit_safe.errors import KernelError

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "MERGEKIT_SAFE_BACKEND"
DEVICE_ENV = "MERGEKIT_SAFE_DEVICE"
DEVICE_HELP = f"Where the math runs: auto (cuda when available), cpu, cuda or cuda:N [default: ${DEVICE_ENV} or auto]."
# A plain module value, not a ContextVar: the engine's worker threads must see the scope the caller opened.
_backend = "auto"


def current_backend() -> str:
    """The backend the dispatch honours now: ``auto`` unless a :func:`use_backend` scope says otherwise."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Within the scope, dispatch every kernel call to ``name`` (auto, torch or triton); restored on exit.

    Args:
        name: one of :data:`BACKENDS` (case-insensitive).

    Raises:
        KernelError: ``name`` is not a backend.

    Example:
        >>> with use_backend("torch"):
        ...     current_backend()
        'torch'
    """
    global _backend
    name = name.lower()
    if name not in BACKENDS:
        raise KernelError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    before, _backend = _backend, name
    try:
        yield name
    finally:
        _backend = before


def resolve_device(device: str) -> torch.device:
    """The one device rule: ``auto`` is CUDA when available, else the CPU; CUDA must exist when asked for.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The ``torch.device`` to compute on.

    Raises:
        KernelError: an unknown device, or CUDA asked for on a machine without it.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise KernelError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KernelError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise KernelError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev

