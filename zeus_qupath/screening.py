"""Prompt screening (``--prompt-screening top-K``), as KEEP's zero-shot WSI code does it; off by default.

ZEUS itself uses every prompt. KEEP (Zhou et al., arXiv 2412.13126; ``WSI_evaluation/utils.py`` of
MAGIC-AI4Med/KEEP: ``zero_shot_prompt_select`` and ``rank_cls_score``) ranks whole *classifiers* on
unlabelled patches and keeps the best ``topn`` (50 in its scripts):

- a classifier is one text per class: KEEP's prompt files list every (template x tumour name x normal
  name) combination as a group, one template shared by all classes. Built here from a ZEUS prompt
  file: for each template, every combination of one class name per class (when the classes do not
  share one template list, every combination of one text per class);
- its score on the slide: the mean over patches of ``(top1 - top2) - |top1 + top2 - 1|``, where top1
  and top2 are the two largest cosine similarities of the patch's unit feature with the classifier's
  unit text embeddings (a confident margin, with a penalty when the two do not add up to one);
- the kept classifiers are summed and each class vector normalised: a class prototype is the
  normalised sum of the unit embeddings of its texts, each counted once per kept classifier using it.

KEEP ranks on the features of the slide (its single-slide segmentation example) or of a whole test
set (mean of per-slide scores); zeus ranks on each slide's own patches, per model. When every
classifier is kept the prototypes are exactly ZEUS's (every text counted equally often).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import PromptError, ZeusError
from .prompts import PromptSet

if TYPE_CHECKING:
    from .models.base import Encoder  # for annotations only: importing it imports torch

KEEP_TOPN = 50  # KEEP's scripts keep the best 50 classifiers
MAX_CLASSIFIERS = 200_000
_BLOCK_ELEMENTS = 1 << 22  # floats per (patches x classifiers x classes) block: 16 MB

_SCREENING_RE = re.compile(r"^top-?(\d+)$")


def parse_screening(text: str | None) -> int | None:
    """``top-K`` -> K; ``off``/``none``/empty/None -> None (every prompt, as ZEUS). One-line ZeusError otherwise."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("", "off", "none", "all"):
        return None
    match = _SCREENING_RE.match(value)
    if not match or int(match.group(1)) < 1:
        raise ZeusError(f"--prompt-screening: expected top-K with K >= 1 (e.g. top-{KEEP_TOPN}) or off, got {text!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class PromptEmbeddings:
    """One model's unit text embeddings of every text of every class, in prompt order."""

    classes: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]
    embeddings: tuple[np.ndarray, ...]  # per class (T_c, D) float32 unit rows

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings[0].shape[1])

    def prototypes(self, weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """(C, D) unit prototypes: the normalised (weighted) mean of each class's unit text embeddings.

        Without weights, or with equal weights, this is exactly ``prompts.class_prototypes``.
        """
        protos = []
        for c, emb in enumerate(self.embeddings):
            w = None if weights is None else np.asarray(weights[c], dtype=np.float64)
            if w is None or (w.min() == w.max() and w.min() > 0):
                mean = emb.mean(axis=0)
            else:
                mean = (w[:, None] * emb.astype(np.float64)).sum(axis=0) / w.sum()
            protos.append(mean / np.linalg.norm(mean))
        return np.stack(protos).astype(np.float32)


def embed_prompts(encoder: Encoder, prompts: PromptSet) -> PromptEmbeddings:
    """Encode every text of every class once (per class, as ``class_prototypes`` does)."""
    texts = tuple(tuple(c.texts()) for c in prompts.classes)
    return PromptEmbeddings(
        classes=tuple(prompts.class_names),
        texts=texts,
        embeddings=tuple(encoder.encode_texts(list(t)).astype(np.float32) for t in texts),
    )


def classifier_combinations(prompts: PromptSet) -> np.ndarray:
    """(M, C) int: for each classifier, the index of its text in each class's ``texts()``.

    Classes sharing one template list: per template, every combination of one class name per class
    (KEEP's prompt groups). Otherwise every combination of one text per class.
    """
    classes = prompts.classes
    templates = classes[0].templates
    if all(c.templates == templates for c in classes):
        sizes = [len(c.classnames) for c in classes]
        count = len(templates) * math.prod(sizes)
        _check_count(count)
        rows = [
            [t * n + i for i, n in zip(names, sizes, strict=True)]
            for t in range(len(templates))
            for names in itertools.product(*(range(n) for n in sizes))
        ]
    else:
        sizes = [len(c.texts()) for c in classes]
        _check_count(math.prod(sizes))
        rows = [list(r) for r in itertools.product(*(range(n) for n in sizes))]
    return np.asarray(rows, dtype=np.int64).reshape(-1, len(classes))


def _check_count(count: int) -> None:
    if count > MAX_CLASSIFIERS:
        raise PromptError(
            f"prompt screening would rank {count:,} prompt combinations (limit {MAX_CLASSIFIERS:,}); "
            "use fewer class names or templates, or --prompt-screening off"
        )


def rank_scores(features: np.ndarray, embeddings: Sequence[np.ndarray], combinations: np.ndarray) -> np.ndarray:
    """(M,) KEEP's ``rank_cls_score`` of every classifier: mean over patches of (top1 - top2) - |top1 + top2 - 1|.

    ``features`` (N, D) are unit patch features; ``embeddings`` the unit text embeddings per class.
    Computed in blocks of patches and classifiers, so memory stays bounded whatever N and M.
    """
    n, m, n_cls = features.shape[0], combinations.shape[0], len(embeddings)
    if n == 0:
        raise ValueError("no patches to rank prompts on")
    totals = np.zeros(m, dtype=np.float64)
    m_block = max(1, min(m, _BLOCK_ELEMENTS // (n_cls * 1024)))
    n_block = max(1, _BLOCK_ELEMENTS // (n_cls * m_block))
    feats = features.astype(np.float32)
    for start in range(0, n, n_block):
        block = feats[start : start + n_block]
        sims = [block @ e.astype(np.float32).T for e in embeddings]  # per class (B, T_c)
        for m0 in range(0, m, m_block):
            combo = combinations[m0 : m0 + m_block]
            logits = np.stack([sims[c][:, combo[:, c]] for c in range(n_cls)], axis=-1)  # (B, Mb, C)
            if n_cls == 2:
                a, b = logits[..., 0], logits[..., 1]
                top1, top2 = np.maximum(a, b), np.minimum(a, b)
            else:
                part = np.partition(logits, n_cls - 2, axis=-1)
                top1, top2 = part[..., n_cls - 1], part[..., n_cls - 2]
            value = (top1 - top2) - np.abs(top1 + top2 - 1.0)
            totals[m0 : m0 + m_block] += value.sum(axis=0, dtype=np.float64)
    return totals / n


@dataclass(frozen=True)
class ScreeningResult:
    """What screening ranked, what it kept, and the prototypes built from the kept classifiers."""

    k: int
    classes: tuple[str, ...]
    texts: tuple[tuple[str, ...], ...]  # every text of each class, in prompt order
    combinations: np.ndarray  # (M, C) text index per class of every ranked classifier
    scores: np.ndarray  # (M,) KEEP's rank score of every classifier
    kept: np.ndarray  # indices into ``combinations`` of the kept classifiers, best first
    prototypes: np.ndarray  # (C, D) unit prototypes from the kept classifiers
    patches: int

    def weights(self) -> list[np.ndarray]:
        """Per class, how many kept classifiers use each text."""
        chosen = self.combinations[self.kept]
        return [np.bincount(chosen[:, c], minlength=len(t)) for c, t in enumerate(self.texts)]

    @property
    def kept_texts(self) -> dict[str, list[str]]:
        """Per class, the texts the kept classifiers use, in prompt order."""
        return {cls: [t for t, w in zip(texts, ws, strict=True) if w > 0]
                for cls, texts, ws in zip(self.classes, self.texts, self.weights(), strict=True)}

    @property
    def kept_classifiers(self) -> list[dict[str, Any]]:
        """The kept classifiers, best first: one text per class and the score."""
        return [{"texts": {cls: self.texts[c][int(self.combinations[i, c])] for c, cls in enumerate(self.classes)},
                 "score": round(float(self.scores[i]), 6)} for i in self.kept]

    def weighted_texts(self) -> dict[str, list[tuple[str, int]]]:
        """Per class, (text, weight) of every text with a non-zero weight: what built the prototype."""
        return {cls: [(t, int(w)) for t, w in zip(texts, ws, strict=True) if w > 0]
                for cls, texts, ws in zip(self.classes, self.texts, self.weights(), strict=True)}

    def to_meta(self) -> dict[str, Any]:
        """A JSON-able record for the scores file's meta and run.json."""
        return {
            "method": "KEEP top-k classifiers (rank_cls_score)",
            "k": self.k,
            "ranked": int(self.combinations.shape[0]),
            "kept_count": int(len(self.kept)),
            "patches": self.patches,
            "score_range": [round(float(self.scores.min()), 6), round(float(self.scores.max()), 6)],
            "kept": self.kept_classifiers,
            "kept_texts": self.kept_texts,
        }


def screen_prompts(
    features: np.ndarray,
    encoder: Encoder,
    prompts: PromptSet,
    k: int,
    *,
    embeddings: PromptEmbeddings | None = None,
) -> ScreeningResult:
    """Rank every classifier of ``prompts`` on one slide's unit patch features (N, D), keep the best ``k``.

    ``embeddings`` (from :func:`embed_prompts`) saves encoding the texts again for every slide.
    """
    if k < 1:
        raise ZeusError(f"prompt screening needs k >= 1, got {k}")
    emb = embeddings if embeddings is not None else embed_prompts(encoder, prompts)
    if emb.classes != tuple(prompts.class_names):
        raise ValueError("prompt embeddings were made for other classes")
    if features.ndim != 2 or features.shape[1] != emb.embed_dim:
        raise ValueError(f"features must be (N, {emb.embed_dim}), got {features.shape}")
    if features.shape[0] == 0:
        raise ZeusError("prompt screening needs at least one patch")
    combos = classifier_combinations(prompts)
    scores = rank_scores(features, emb.embeddings, combos)
    kept = np.argsort(-scores, kind="stable")[:k]
    chosen = combos[kept]
    weights = [np.bincount(chosen[:, c], minlength=len(t)) for c, t in enumerate(emb.texts)]
    return ScreeningResult(
        k=k,
        classes=emb.classes,
        texts=emb.texts,
        combinations=combos,
        scores=scores,
        kept=kept,
        prototypes=emb.prototypes(weights),
        patches=int(features.shape[0]),
    )
