"""What ``--model`` and ``--pretrained`` name: one :class:`ModelSpec` per model of a run (several: an ensemble).

Parsing only; loading is :mod:`zeus_qupath.models.ensemble` (a run) or :mod:`zeus_qupath.models.pool` (the service).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError

__all__ = ["ModelSpec", "parse_model_specs"]


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model`` entry and its ``--pretrained``."""

    spec: str
    pretrained: str | None = None
    random_weights: bool = False  # --random-weights: seeded random weights on purpose (open_clip, tests)


def parse_model_specs(model: str, pretrained: str | None, random_weights: bool = False) -> tuple[ModelSpec, ...]:
    """``--model a,b`` with ``--pretrained p`` (one model) or ``--pretrained pa,pb`` (one per model, may be empty).

    ``random_weights`` applies to the models given no ``--pretrained`` entry.
    """
    specs = [s.strip() for s in model.split(",")]
    if not all(specs):
        raise ModelError(f"--model {model!r}: empty model name in the list")
    if len(specs) == 1:
        return (ModelSpec(specs[0], pretrained or None, random_weights and not pretrained),)
    weights: list[str | None] = [None] * len(specs)
    if pretrained:
        parts = [p.strip() or None for p in pretrained.split(",")]
        if len(parts) != len(specs):
            raise ModelError(f"--pretrained needs one entry per model ({len(specs)}), comma-separated; "
                             f"got {len(parts)}")
        weights = parts
    return tuple(ModelSpec(s, w, random_weights and w is None) for s, w in zip(specs, weights, strict=True))
