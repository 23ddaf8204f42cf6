"""Superseded by :mod:`zeus_qupath.output_set` (the one writer of outputs); nothing in zeus-qupath imports this.

Kept only until the modules are reorganised in one step; it re-exports the single-file helpers.
"""

from __future__ import annotations

from .output_set import atomic_open, atomic_path, remove_stale_temporaries, writable_dir

__all__ = ["atomic_open", "atomic_path", "remove_stale_temporaries", "writable_dir"]
