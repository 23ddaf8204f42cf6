"""The end-of-run table printed after a run: every slide's status, patches, time, and why a slide failed."""

from __future__ import annotations

from ..outputs import SlideReport
from .jobs import SlideFailure


def format_summary(reports: list[SlideReport], failures: list[SlideFailure], seconds: float) -> str:
    """The end-of-run table: every slide with its status, patch count, time, and the reason of a failure."""
    rows = [["slide", "status", "patches", "regions", "time s", "patches/s", "note"]]
    for r in reports:
        note = "; ".join(r.warnings) if r.status == "done" else "same parameters, outputs intact"
        if r.status == "done" and r.cache in ("hit", "partial"):
            note = (note + "; " if note else "") + f"embeddings from cache ({r.cache})"
        rows.append([r.stem, r.status, str(r.patches), str(r.regions),
                     f"{r.seconds.get('total', 0.0):.1f}" if r.status == "done" else "-",
                     f"{r.patches_per_s:.0f}" if r.status == "done" and r.patches_per_s else "-", note])
    for f in failures:
        rows.append([f.stem, "failed", "-", "-", f"{f.seconds:.1f}", "-", f.reason])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ----")
    done = sum(r.status == "done" for r in reports)
    skipped = sum(r.status == "skipped" for r in reports)
    lines.append(f"{len(reports) + len(failures)} slides: {done} done, {skipped} skipped, {len(failures)} failed "
                 f"in {seconds:.1f} s")
    return "\n".join(line.rstrip() for line in lines)
