"""``POST /learn`` of ``zeus serve``: learn an adapter from a QuPath project's corrections, written into the project.

What the QuPath extension's "Learn from this project's corrections" sends: the project (its folder or its
``project.qpproj``, under one of the service's ``--root`` folders) and optionally the images to learn from
(default: the images an annotator changed after ZEUS's import, as ``zeus learn`` picks them), the model,
weights, prompt set and positive class (default: the service's), a class map (annotator class -> prompt
class) and ``force``. The corrections are read as ``zeus learn`` reads a project (paquo, else what
``export_training_data.groovy`` wrote into ``<project>/export/``); every slide they belong to must lie under
the folders too. The embeddings come from the service's disk cache (``--cache``) when it has them.

The answer (200): ``written`` (bool), ``adapter`` (the path of ``<project>/zeus/adapter-<sha256[:16]>.npz``,
or null when cross-validation found it no better than zero-shot and ``force`` was not given), ``sha256``,
``cv`` (the cross-validation table, per slide: zero-shot and adapted Dice), ``table`` (the same as
``zeus learn`` prints it), ``message`` (one line for a person), ``notes`` (images skipped and why) and
``seconds``. Refusals: 400 malformed, 403 outside the folders, 404 missing, 422 nothing to learn from or
unusable (no corrected image, bad corrections, an ensemble, a read-only project), 503 while another
learn request runs.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zeus_qupath.errors import ZeusError

from .project_files import PROJECT_FILE
from .service_schema import LearnBody, RequestError, validate_model

ADAPTER_FOLDER = "zeus"
_USAGE = {
    "project": "project must be the absolute path of a QuPath project folder (or its project.qpproj)",
    "images": "images must be a list of image names",
    "class_map": "class_map must map annotator class names to prompt class names",
    "force": "force must be true or false",
}


@dataclass(frozen=True)
class LearnRequest:
    """A checked ``POST /learn``: the project folder and what ``zeus learn`` needs."""

    project: Path
    images: tuple[str, ...] | None
    model: str
    pretrained: str | None
    prompts: Path
    positive_class: str | None
    class_map: dict[str, str] | None
    force: bool


def validate_learn_body(data: Any) -> LearnBody:
    """The body as a :class:`LearnBody`, or a 400 that names the first bad field."""
    return validate_model(data, LearnBody, "project", "the QuPath project folder", "/path/to/project", _USAGE)


class ProjectLearner:
    """Turns learn requests into ``zeus learn``'s stage for a service; one learn at a time (503 otherwise)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._busy = threading.Lock()

    def parse(self, body: Any) -> LearnRequest:
        """Validate a ``POST /learn`` body (400 bad shape, 403 outside the folders, 404 missing, 422 unusable)."""
        service = self.service
        req = validate_learn_body(body)
        path = service.roots.check(req.project, "project", kind="any")
        project = path.parent if path.is_file() and path.name == PROJECT_FILE else path
        if not (project / PROJECT_FILE).is_file():
            raise RequestError(422, f"project {req.project[:200]} is not a QuPath project (no {PROJECT_FILE})")
        if req.images is not None and (not req.images or not all(n.strip() for n in req.images)):
            raise RequestError(400, "images must be a non-empty list of image names (leave it out: the changed ones)")
        if req.class_map is not None and not all(k.strip() and v.strip() for k, v in req.class_map.items()):
            raise RequestError(400, "class_map must map non-empty class names to non-empty class names")
        positive = req.positive_class
        if positive is not None and not positive.strip():
            raise RequestError(400, "positive_class must be a class name")
        models = service._models(req.model, req.pretrained)
        if len(models) != 1:
            raise RequestError(422, "an adapter is learned for one model, not an ensemble: name one model")
        prompts = service.roots.prompts(req.prompts, service.default_prompts)
        return LearnRequest(project=project, images=tuple(n.strip() for n in req.images) if req.images else None,
                            model=models[0].spec, pretrained=models[0].pretrained, prompts=prompts,
                            positive_class=positive.strip() if positive else service.config.positive_class,
                            class_map=dict(req.class_map) if req.class_map else None, force=req.force)

    def learn(self, req: LearnRequest) -> dict[str, Any]:
        """Read the corrections, learn, write the adapter into the project; ZeusError (-> 422) when it cannot."""
        if not self._busy.acquire(blocking=False):
            raise RequestError(503, "another learn request is running; try again when it has finished",
                               {"Retry-After": "30"})
        try:
            return self._learn(req)
        finally:
            self._busy.release()

    def _learn(self, req: LearnRequest) -> dict[str, Any]:
        from zeus_qupath.learn import LearnConfig, format_table, learn_from_corrections
        from zeus_qupath.prompts import load_prompts

        from .corrections import read_corrections
        from .service import resolve_cache_dir

        service = self.service
        positive = load_prompts(req.prompts, req.positive_class).positive_class  # which images an annotator changed
        images, notes = read_corrections(req.project, images=list(req.images) if req.images else None,
                                         backend="auto", positive_class=positive)  # as zeus learn reads a project
        for im in images:  # the service reads only files under its folders
            service.roots.check(str(Path(im.slide).absolute()), f"the slide of {im.name}")
        folder = req.project / ADAPTER_FOLDER
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise ZeusError(f"cannot write the adapter into the project ({exc.strerror or type(exc).__name__}: "
                            f"{folder})") from None
        pending = folder / f".adapter-learning-{os.getpid()}-{threading.get_ident()}.npz"
        cache = resolve_cache_dir(service.config.cache_dir)
        config = LearnConfig(out=str(pending), model=req.model, pretrained=req.pretrained, prompts=str(req.prompts),
                             positive_class=req.positive_class, device=service.config.device,
                             precision=service.config.precision, params=service.config.params,
                             cache_dir=str(cache) if cache is not None else None, class_map=req.class_map,
                             force=req.force)
        log: list[str] = []
        try:
            result = learn_from_corrections(images, config, log=log.append)
            adapter_path = None
            if result.written:
                adapter_path = folder / f"adapter-{result.adapter.sha256[:16]}.npz"
                os.replace(pending, adapter_path)  # same bytes for the same inputs: replacing a twin changes nothing
        finally:
            pending.unlink(missing_ok=True)
        cv = result.cv
        if result.written:
            message = (f"adapter learned from {len(images)} image(s): cross-validated Dice {cv.mean(cv.best):.3f} "
                       f"vs zero-shot {cv.zero_shot_mean:.3f}" + ("" if cv.better else " (forced: not better)"))
        else:
            message = (f"not written: the adapter is not better than zero-shot in cross-validation (Dice "
                       f"{cv.mean(cv.best):.3f} vs {cv.zero_shot_mean:.3f}); correct more images or send force")
        return {"written": result.written, "adapter": str(adapter_path) if adapter_path else None,
                "sha256": result.adapter.sha256 if result.written else None, "message": message,
                "images": [im.name for im in images], "cv": cv.table(), "table": format_table(cv),
                "notes": [*notes, *log], "seconds": result.seconds}
