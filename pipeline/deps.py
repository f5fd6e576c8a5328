"""Optional dependencies: FAISS comes in a CPU and a GPU build, so it is an extra, and its absence gets one clear message.

``pip install ".[cpu]"`` installs ``faiss-cpu``, ``pip install ".[gpu]"`` installs ``faiss-gpu``
(both provide the module ``faiss``; install one). The jobs that need FAISS (train, evaluate,
search, embed) call :func:`require_faiss` before anything starts, so a plain ``pip install .``
ends in one line naming the extra, not in an ImportError inside every Ray worker.
"""

from __future__ import annotations

FAISS_HINT = ('FAISS is not installed: install the project with its CPU or GPU extra, pip install ".[cpu]" '
              '(faiss-cpu) or pip install ".[gpu]" (faiss-gpu)')
"""The message for a missing ``faiss`` module."""


class MissingDependencyError(ImportError):
    """An optional dependency the requested work needs is not installed; the message says what to install."""


def import_faiss():
    """Return the ``faiss`` module; raises :class:`MissingDependencyError` (:data:`FAISS_HINT`) when it is missing."""
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError(FAISS_HINT) from None
    return faiss


def require_faiss() -> None:
    """Check, before a job starts anything, that FAISS imports; raises :class:`MissingDependencyError` otherwise."""
    import_faiss()
