"""What the tab is shown first: a unit's preview (a smaller, shorter render) before its full
render, and an atlas's preview before the full atlas; each only where it is cheaper than what
it stands in for."""

from __future__ import annotations

import dataclasses

from ..analysis.atlas import QUALITIES as ATLAS_QUALITIES
from ..optvis.engine import Quality
from .service import DONE, QUEUED, RUNNING, RenderService
from .work import RenderWork


def render_preview(full: Quality, asked: Quality) -> Quality | None:
    """A unit's preview: `asked` (the server's --microscope_preview_size and
    --microscope_preview_iterations), never larger or longer than the full render; None (no
    previews) where it would not be cheaper, or is asked to be empty."""
    size = min(asked.size, full.size)
    iterations = min(asked.iterations, full.iterations)
    cheaper = 0 < size * size * iterations < full.size * full.size * full.iterations
    return Quality(size, iterations) if size > 0 and cheaper else None


def atlas_qualities(full: Quality) -> dict[str, Quality | None]:
    """An atlas's cells at full quality and as a preview, never larger or longer than a unit's
    render (the server's --microscope_size and --microscope_iterations); no preview where it
    would not be cheaper."""
    top, first = ATLAS_QUALITIES["full"], ATLAS_QUALITIES["preview"]
    full = Quality(min(top.size, full.size), min(top.iterations, full.iterations))
    preview = Quality(min(first.size, full.size), min(first.iterations, full.iterations))
    cheaper = preview.size**2 * preview.iterations < full.size**2 * full.iterations
    return {"full": full, "preview": preview if cheaper else None}


def request_with_previews(
    service: RenderService, group: RenderWork, units: list[int], preview: Quality
) -> dict[int, dict]:
    """The full render's statuses; a unit not rendered yet is also asked for as a preview
    (first, so that the service takes it first), and once that is there, its status says
    `preview: true` (the image route gives it with `quality=preview`)."""
    missing = service.missing(group, units)
    first = dataclasses.replace(
        group, size=preview.size, iterations=preview.iterations, preview=True
    )
    previews = service.request(first, missing) if missing else {}
    statuses = service.request(group, units)
    for unit, status in previews.items():
        if status["status"] == DONE and statuses[unit]["status"] in (QUEUED, RUNNING):
            statuses[unit] = {**statuses[unit], "preview": True}
    return statuses
