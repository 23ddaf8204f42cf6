"""Loaded models kept for reuse, at most ``max_models`` of them (least recently used go first), with their
identities (the embedding cache's model key) and class prototypes per prompt set.

Used by the service, which loads the models its requests name; a cohort run loads its models once
(:func:`zeus_qupath.models.ensemble.load_run_models`). Loading a model touches no process-wide registry
(see :mod:`zeus_qupath.models.openclip`), so one request's model files cannot change another's model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..identity import ModelIdentity, effective_precision, model_identity
from ..prompts import PromptSet, class_prototypes
from . import load_encoder
from .base import Encoder
from .specs import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_MODELS = 2
PROTOTYPE_CACHE_SIZE = 64


@dataclass
class LoadedModel:
    """One loaded encoder, what identifies its features, and the lock its calls are made under."""

    spec: ModelSpec
    encoder: Encoder
    identity: ModelIdentity
    precision: str  # what it really runs in (fp32, bf16, fp16)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class ModelPool:
    """An LRU of :class:`LoadedModel` by (spec, pretrained), and of prototypes by (model, prompt set)."""

    def __init__(self, device: str = "auto", precision: str = "auto", max_models: int = DEFAULT_MAX_MODELS) -> None:
        if max_models < 1:
            raise ValueError("the model pool needs room for at least one model")
        self.device = device
        self.precision = precision
        self.max_models = max_models
        self._models: OrderedDict[ModelSpec, LoadedModel] = OrderedDict()
        self._loading: dict[ModelSpec, threading.Lock] = {}
        self._lock = threading.Lock()
        self._prototypes: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
        self.loads = 0
        self.unloads = 0

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The model of ``spec``, loaded on first use (once, however many requests ask at the same time)."""
        with self._lock:
            hit = self._models.get(spec)
            if hit is not None:
                self._models.move_to_end(spec)
                return hit
            loading = self._loading.setdefault(spec, threading.Lock())
        with loading:
            with self._lock:
                hit = self._models.get(spec)
                if hit is not None:
                    self._models.move_to_end(spec)
                    return hit
            try:
                t0 = time.perf_counter()
                encoder = load_encoder(spec.spec, spec.pretrained, self.device, self.precision)
                loaded = LoadedModel(spec, encoder, model_identity(spec.spec, spec.pretrained, encoder),
                                     effective_precision(encoder))
                log.info("loaded model %s (%s, dim %d) on %s in %.1f s", spec.spec, encoder.name, encoder.embed_dim,
                         encoder.device, time.perf_counter() - t0)
            finally:
                with self._lock:
                    self._loading.pop(spec, None)
            with self._lock:
                self._models[spec] = loaded
                self.loads += 1
                while len(self._models) > self.max_models:
                    old, gone = self._models.popitem(last=False)  # requests still using it keep their reference
                    self.unloads += 1
                    self._prototypes = OrderedDict((k, v) for k, v in self._prototypes.items()
                                                   if k[0] != gone.identity.digest)
                    log.info("unloaded model %s (keeping at most %d)", old.spec, self.max_models)
            return loaded

    def prototypes(self, model: LoadedModel, prompts: PromptSet) -> np.ndarray:
        """The (C, D) class prototypes of ``prompts`` for ``model`` (computed once per prompt set and class)."""
        key = (model.identity.digest, prompts.sha256, prompts.positive_class)
        with self._lock:
            hit = self._prototypes.get(key)
            if hit is not None:
                self._prototypes.move_to_end(key)
                return hit
        with model.lock:
            protos = class_prototypes(model.encoder, prompts)
        with self._lock:
            self._prototypes[key] = protos
            while len(self._prototypes) > PROTOTYPE_CACHE_SIZE:
                self._prototypes.popitem(last=False)
        return protos

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())
