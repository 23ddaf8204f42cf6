"""Scores: raw cosine similarity of each patch with each class prototype (no softmax, no temperature).

With several models (an ensemble, ``--model a,b``) each model scores with its own prototypes and the
per-class scores are averaged. With prompt screening (``--prompt-screening top-K``, see
:mod:`zeus_qupath.screening`) each model's prototypes are rebuilt from the prompts it keeps on the
slide; nothing else changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .prompts import PromptSet, class_prototypes
from .screening import PromptEmbeddings, screen_prompts

if TYPE_CHECKING:
    from .adapter import Adapter
    from .models.base import Encoder  # for annotations only: importing it imports torch

__all__ = ["cosine_scores", "prototype_sha256", "slide_scores"]


def cosine_scores(features: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(N, C) float32 cosine similarities of unit patch features (N, D) and unit prototypes (C, D)."""
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"feature dim {features.shape[1]} != prototype dim {prototypes.shape[1]}")
    return (features.astype(np.float32) @ prototypes.astype(np.float32).T).astype(np.float32)


def prototype_sha256(weighted_texts: dict[str, list[tuple[str, int]]]) -> str:
    """Hash of what built one model's prototypes: per class, each text and how often it counted."""
    canonical = json.dumps([[cls, [[t, int(w)] for t, w in items]] for cls, items in weighted_texts.items()])
    return hashlib.sha256(canonical.encode()).hexdigest()


def _all_texts(prompts: PromptSet) -> dict[str, list[tuple[str, int]]]:
    return {c.name: [(t, 1) for t in c.texts()] for c in prompts.classes}


def slide_scores(
    features: Sequence[np.ndarray],
    encoders: Sequence[Encoder],
    prompts: PromptSet,
    prototypes: Sequence[np.ndarray] | None = None,
    *,
    screening_k: int | None = None,
    text_embeddings: Sequence[PromptEmbeddings] | None = None,
    model_specs: Sequence[str] | None = None,
    adapter: Adapter | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(N, C) float32 scores of one slide, averaged over the models, and what to record about them.

    ``features``: one (N, D_i) array of unit patch features per model of ``encoders`` (same patches,
    same order). ``prototypes``: one (C, D_i) array per model, computed from ``prompts`` when not
    given (mean of each class's unit text embeddings, normalised). ``screening_k``: keep each model's
    best ``k`` prompt classifiers on this slide (KEEP's screening) and build its prototypes from them;
    ``prototypes`` is then not used. ``text_embeddings`` (one per model, from
    ``screening.embed_prompts``) saves encoding the texts again for every slide. ``model_specs``:
    the ``--model`` values, recorded in the meta. ``adapter`` (``zeus learn``'s, one model only): the scores
    are the adapter's (:meth:`~zeus_qupath.adapter.Adapter.scores`) instead of the text prototypes' cosines,
    and the meta records it as ``adapter``.

    The meta holds ``models`` (names), ``model_specs``, ``ensemble``, ``prompts_sha256`` (the prompt
    file) and per model ``prototype_sha256`` (the texts and weights its prototypes were built from)
    and, with screening, the kept classifiers (``per_model[i]["screening"]``).
    """
    if not encoders or len(features) != len(encoders):
        raise ValueError("one feature array per encoder is needed")
    n = {f.shape[0] for f in features}
    if len(n) != 1:
        raise ValueError(f"the models' feature arrays cover different patch counts: {sorted(n)}")
    for name, seq in (("prototypes", prototypes), ("text_embeddings", text_embeddings), ("model_specs", model_specs)):
        if seq is not None and len(seq) != len(encoders):
            raise ValueError(f"one entry of {name} per encoder is needed")
    n_patches = n.pop()
    screen = screening_k is not None and n_patches > 0
    if adapter is not None and (len(encoders) != 1 or screening_k is not None):
        raise ValueError("an adapter applies to one model without prompt screening")

    per_model_scores: list[np.ndarray] = []
    per_model_meta: list[dict[str, Any]] = []
    for i, (feats, enc) in enumerate(zip(features, encoders, strict=True)):
        entry: dict[str, Any] = {"name": enc.name, "embed_dim": int(feats.shape[1])}
        if model_specs is not None:
            entry["spec"] = model_specs[i]
        if screen:
            emb = text_embeddings[i] if text_embeddings is not None else None
            result = screen_prompts(feats, enc, prompts, int(screening_k), embeddings=emb)
            protos = result.prototypes
            entry["prototype_sha256"] = prototype_sha256(result.weighted_texts())
            entry["screening"] = result.to_meta()
        else:
            if prototypes is not None:
                protos = prototypes[i]
            elif text_embeddings is not None:
                protos = text_embeddings[i].prototypes()
            else:
                protos = class_prototypes(enc, prompts)
            entry["prototype_sha256"] = prototype_sha256(_all_texts(prompts))
            if screening_k is not None:
                entry["screening"] = {"skipped": "no patches to rank prompts on"}
        per_model_scores.append(cosine_scores(feats, protos))
        per_model_meta.append(entry)

    if adapter is not None:
        scores = adapter.scores(features[0])
    elif len(per_model_scores) == 1:
        scores = per_model_scores[0]
    else:
        scores = np.mean(np.stack(per_model_scores), axis=0, dtype=np.float64).astype(np.float32)
    meta: dict[str, Any] = {
        "models": [e.name for e in encoders],
        "ensemble": "mean of the models' per-class cosine scores" if len(encoders) > 1 else None,
        "prompts_sha256": prompts.sha256,
        "prompt_screening": (
            {"method": "KEEP top-k classifiers", "k": int(screening_k)} if screening_k is not None else None
        ),
        "per_model": per_model_meta,
    }
    if model_specs is not None:
        meta["model_specs"] = list(model_specs)
    if adapter is not None:
        meta["adapter"] = adapter.summary()
    return scores, meta
