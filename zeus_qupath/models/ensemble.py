"""A run's models loaded together: every encoder of the ensemble, its identity and class prototypes, the prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..identity import ModelIdentity, model_identity
from ..prompts import PromptSet, class_prototypes, load_prompts
from ..screening import embed_prompts
from . import load_encoder
from .base import Encoder
from .specs import ModelSpec

__all__ = ["RunModels", "load_run_models"]


@dataclass
class RunModels:
    """Loaded encoders, their identities and class prototypes, and the prompts."""

    encoders: list[Encoder]
    identities: list[ModelIdentity]
    prompts: PromptSet
    prototypes: list[np.ndarray]
    score_options: dict[str, Any] = field(default_factory=dict)  # for scoring.slide_scores


def load_run_models(models: Sequence[ModelSpec], prompts_file: str, positive_class: str | None, device: str = "auto",
                    precision: str = "auto", screening_k: int | None = None) -> RunModels:
    """Load every model of an ensemble and its prototypes; one-line errors for bad prompts or models.

    ``screening_k``: KEEP's prompt screening (each model's top-k prompt classifiers per slide), None: every prompt.
    """
    prompts = load_prompts(prompts_file, positive_class)
    encoders = [load_encoder(m.spec, m.pretrained, device, precision, random_weights=m.random_weights)
                for m in models]
    identities = [model_identity(m.spec, m.pretrained, e) for m, e in zip(models, encoders, strict=True)]
    options: dict[str, Any] = {"model_specs": [m.spec for m in models]}
    if screening_k is not None:
        options["screening_k"] = screening_k
        options["text_embeddings"] = [embed_prompts(e, prompts) for e in encoders]
        prototypes = [t.prototypes() for t in options["text_embeddings"]]
    else:
        prototypes = [class_prototypes(e, prompts) for e in encoders]
    return RunModels(encoders, identities, prompts, prototypes, options)
