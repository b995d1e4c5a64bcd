"""The one place that picks a backend (docs/design.md section 4).

``backend=`` argument, else the ``ZEROMASK_BACKEND`` environment variable, else ``auto``:

* CUDA tensors: ``triton`` if importable and it supports the call, else the ``cuda``
  extension, else ``reference``;
* CPU tensors: the ``cpp`` extension if built and it supports the call, else ``reference``.

An explicitly requested backend that cannot serve the call raises :class:`BackendError`
naming why. Each automatic choice is logged once (logger ``zeromask``), not printed.

Backends live in :mod:`zeromask.backends` (one module each, exposing ``BACKEND``) and are
imported lazily, so a missing compiler, extension or Triton never breaks ``import zeromask``.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import torch

from .backends import Backend

logger = logging.getLogger("zeromask")

#: every backend's name; :func:`_import_backend` maps each to its module.
NAMES = ("reference", "triton", "cuda", "cpp")


def _import_backend(name: str):
    """The backend's module, by plain import statements: Dynamo traces these (it refuses
    ``importlib.import_module``), so a backend first loaded inside
    ``torch.compile(fullgraph=True)`` compiles."""
    if name == "reference":
        from .backends import reference as module
    elif name == "triton":
        from .backends import triton as module
    elif name == "cuda":
        from .backends import cuda as module
    else:
        from .backends import cpp as module
    return module


#: preference when backend="auto", by device type of the inputs.
_AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton", "cuda", "reference"],
    "cpu": ["cpp", "reference"],
}
BACKENDS = ("auto",) + NAMES

_loaded: Dict[str, object] = {}
_logged: set = set()


class BackendError(RuntimeError):
    """A requested backend cannot serve this call; the message says why."""


def load(name: str) -> "Backend | str":
    """The backend object, or the reason it cannot be loaded (import errors are reasons)."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name not in _loaded:
        try:
            backend = _import_backend(name).BACKEND
            reason = backend.available()
            _loaded[name] = backend if reason is None else reason
        except ImportError as exc:  # the backend's code or its dependency is absent
            _loaded[name] = f"{name} backend could not be imported: {exc}"
    return _loaded[name]


def available_backends() -> Dict[str, Optional[str]]:
    """{name: None if usable in this process, else the reason it is not}."""
    out = {}
    for name in NAMES:
        b = load(name)
        out[name] = None if isinstance(b, Backend) else b
    return out


def requested_backend(backend: Optional[str]) -> str:
    name = backend if backend is not None else os.environ.get("ZEROMASK_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        source = "backend=" if backend is not None else "ZEROMASK_BACKEND="
        raise ValueError(f"{source}{name!r} is not a backend; choose one of {BACKENDS}")
    return name


def _reason(name: str, op: str, device_type: str, args) -> "Backend | str":
    b = load(name)
    if not isinstance(b, Backend):
        return b
    if device_type not in b.device_types:
        return f"{name} backend does not run on {device_type} tensors"
    if getattr(b, f"{op}_forward") is None:
        return f"{name} backend has no {op} kernel"
    why = b.supports(op, args)
    return b if why is None else why


def select(op: str, device_type: str, backend: Optional[str], args) -> Backend:
    """The backend that runs ``op`` ("attention" or "rotary") for the call whose normalised
    arguments are ``args`` (:class:`zeromask.backends.AttentionArgs` or ``RotaryArgs``)."""
    name = requested_backend(backend)
    if name != "auto":
        got = _reason(name, op, device_type, args)
        if isinstance(got, str):
            raise BackendError(f"backend {name!r} cannot run this {op} call: {got}")
        return got
    order = _AUTO_ORDER.get(device_type, ["reference"])
    skipped = []
    for candidate in order:
        got = _reason(candidate, op, device_type, args)
        if isinstance(got, Backend):
            key = (op, device_type, candidate, tuple(skipped))
            # (not while torch.compile traces: logging is not traceable, and the eager
            # call or the compiled graph's first run logs it anyway)
            if key not in _logged and not torch.compiler.is_compiling():
                _logged.add(key)
                why = "; ".join(skipped) if skipped else "first choice"
                logger.info("zeromask: %s on %s uses the %s backend (%s)", op, device_type,
                            candidate, why)
            return got
        skipped.append(got)
    raise BackendError(f"no backend can run this {op} call: " + "; ".join(skipped))


def fast_path(device_type: str = "cpu"):
    """The ``attention_forward_fast`` entry of the backend that ``auto`` picks first on
    ``device_type`` tensors (the ``cpp`` backend's on CPUs), or None where there is none or
    that backend cannot load. The entry itself declines (returns None for) every call that
    does not resolve to its backend (``backend=`` or ``ZEROMASK_BACKEND``), so it never
    overrides a choice; the choice it makes is logged once, as :func:`select` logs."""
    first = _AUTO_ORDER.get(device_type, ["reference"])[0]
    b = load(first)
    if not isinstance(b, Backend) or b.attention_forward_fast is None:
        return None
    key = ("attention", device_type, first, ())
    if key not in _logged:
        _logged.add(key)
        logger.info("zeromask: attention on %s uses the %s backend (first choice; its fast "
                    "path for eager calls)", device_type, first)
    return b.attention_forward_fast
