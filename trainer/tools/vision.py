"""Tools over the images of the visual task: ``zoom_in`` (a region of an image, enlarged) and
``image_search`` (which entity an emblem belongs to).

Images are regions of the question's scene: ``ToolContext.views[i]`` is the region
(normalised x1, y1, x2, y2) that image ``i`` of the episode shows, image 0 being the whole
scene. A zoom names a box within one of those images; the tool composes it with that image's
region, so zooming twice narrows in. TAPO compares zooms by the overlap (IoU) of the scene
regions they returned, and image searches by the entities they found.
"""

from __future__ import annotations

import io
import math
import threading
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from ..tasks.visual import MAX_PIXELS, SceneBook, emblem_caption, resize_region
from .base import Tool, ToolArgumentError, ToolContext, ToolResult
from .registry import box_of_refs

Box = tuple[float, float, float, float]
HASH_SIZE = 5  # emblem hashes have HASH_SIZE x HASH_SIZE bits (one per emblem cell)
MIN_EMBLEM_PIXELS = 10  # an emblem shown smaller than this (a side) is not recognised
MAX_DISTANCE = 2  # the largest Hamming distance at which an emblem hash still matches


def crop_box(bbox: Any, min_size: float = 0.1) -> Box:
    """A validated box ``(x1, y1, x2, y2)`` in ``[0, 1]`` from a ``bbox`` argument: clamped to
    the image, and grown around its centre (staying inside) to at least ``min_size`` a side."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ToolArgumentError(f"bbox must be a list of 4 numbers [x1, y1, x2, y2], got {bbox!r}")
    for v in bbox:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ToolArgumentError(f"bbox must hold 4 finite numbers, got {bbox!r}")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not (x1 < x2 and y1 < y2):
        raise ToolArgumentError(f"bbox needs x1 < x2 and y1 < y2, got {list(bbox)}")
    if x2 <= 0 or y2 <= 0 or x1 >= 1 or y1 >= 1:
        raise ToolArgumentError(f"bbox {list(bbox)} lies outside the image ([0, 1] x [0, 1])")

    def side(lo: float, hi: float) -> tuple[float, float]:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
        if hi - lo < min_size:
            centre = (lo + hi) / 2
            lo, hi = centre - min_size / 2, centre + min_size / 2
            shift = max(0.0, -lo) - max(0.0, hi - 1)
            lo, hi = max(0.0, lo + shift), min(1.0, hi + shift)
        return lo, hi

    (x1, x2), (y1, y2) = side(x1, x2), side(y1, y2)
    return x1, y1, x2, y2


def compose(view: Box, box: Box) -> Box:
    """The region of the scene that ``box`` (normalised within an image) covers, when the
    image shows the scene region ``view``."""
    vx1, vy1, vx2, vy2 = view
    w, h = vx2 - vx1, vy2 - vy1
    return (vx1 + box[0] * w, vy1 + box[1] * h, vx1 + box[2] * w, vy1 + box[3] * h)


def box_ref(box: Box) -> str:
    return ",".join(f"{v:.4f}" for v in box)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _view_of(arguments: dict[str, Any], context: ToolContext) -> Box:
    index = arguments["image_index"]
    n = len(context.views)
    if not 0 <= index < n:
        raise ToolArgumentError(
            f"image_index {index} is out of range: {n} image(s) available (0..{n - 1})"
        )
    return context.views[index]


class ZoomInTool(Tool):
    """``zoom_in(image_index, bbox)``: the ``bbox`` region of image ``image_index`` at up to
    ``max_pixels`` pixels (a new image, the next index). Boxes are normalised to the image
    (x1, y1, x2, y2 in [0, 1]); parts outside are cut off and boxes are at least ``min_size``
    a side."""

    name = "zoom_in"
    description = (
        "Zoom into a region of an image: image_index selects the image (0 is the question's "
        "image, each zoom adds the next), bbox = [x1, y1, x2, y2] is the region as fractions "
        "of that image's width and height. Returns the region enlarged as a new image."
    )
    sim_kind = "iou"
    witness = "results"
    required = {"image_index": int, "bbox": list}
    argument_schemas = {
        "image_index": {"description": "The image to zoom into.", "minimum": 0},
        "bbox": {
            "description": "[x1, y1, x2, y2]: the region as fractions of the image's size.",
            "items": {"type": "number"},
            "minItems": 4,
            "maxItems": 4,
        },
    }
    box_of_refs = staticmethod(box_of_refs)

    def __init__(self, book: SceneBook, max_pixels: int = MAX_PIXELS, min_size: float = 0.1):
        if not 0 < min_size <= 1:
            raise ValueError(f"min_size must be in (0, 1], got {min_size}")
        self.book = book
        self.max_pixels = max_pixels
        self.min_size = min_size

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        view = _view_of(arguments, context)
        region = compose(view, crop_box(arguments["bbox"], self.min_size))
        image = self.book.view(context.corpus_id, region, self.max_pixels)
        x1, y1, x2, y2 = region
        return ToolResult(
            text=f"zoomed region {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}",
            refs=(box_ref(region),),
            image=png(image),
        )


def _extent(profile: np.ndarray) -> tuple[float, float]:
    """Where a 1-D ink profile first and last crosses 0.5, to a fraction of a pixel (pixel
    ``i`` spans ``[i, i + 1]``)."""
    inked = np.flatnonzero(profile > 0.5)
    i, j = int(inked[0]), int(inked[-1])
    lo = i + 0.5 - (profile[i] - 0.5) / (profile[i] - profile[i - 1]) if i > 0 else 0.0
    last = len(profile) - 1
    hi = j + 0.5 + (profile[j] - 0.5) / (profile[j] - profile[j + 1]) if j < last else j + 1.0
    return float(lo), float(hi)


def emblem_hash(image: Image.Image) -> imagehash.ImageHash | None:
    """A perceptual hash of the emblem an image shows, ``None`` when its ink (the pixels at
    least half as dark as the background, whatever the panel's tint) is not emblem-like:
    none at all, under ``MIN_EMBLEM_PIXELS`` a side (too small to make out) or far from
    square. The hash is an average hash of the ink's bounding box (found to a fraction of
    a pixel): one bit per emblem cell, set when the cell is at least half inked; so it
    depends neither on where the emblem is nor on how large it is shown."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    background = max(float(np.median(gray)), 1.0)
    ink = np.clip((background - gray) / background, 0.0, 1.0)
    if not (ink > 0.5).any():
        return None
    (left, right), (top, bottom) = _extent(ink.max(axis=0)), _extent(ink.max(axis=1))
    width, height = right - left, bottom - top
    if min(width, height) < MIN_EMBLEM_PIXELS or not 0.75 <= height / width <= 4 / 3:
        return None
    light = Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8))
    cells = light.resize(
        (HASH_SIZE, HASH_SIZE), Image.Resampling.BOX, box=(left, top, right, bottom)
    )
    return imagehash.ImageHash(np.asarray(cells) < 128)  # cells at least half inked


class ImageIndex:
    """Perceptual hashes of every entity's emblem as a zoom into its panel shows it."""

    def __init__(self, book: SceneBook, max_pixels: int = MAX_PIXELS) -> None:
        self.names = list(book.entities)
        self.hashes = []
        for name in self.names:
            view = resize_region(book.emblem_panel(name), (0.0, 0.0, 1.0, 1.0), max_pixels)
            self.hashes.append(emblem_hash(view))

    def search_image(
        self, image: Image.Image, k: int = 1, max_distance: int = MAX_DISTANCE
    ) -> list[tuple[str, int]]:
        """The ``k`` entities whose emblem hash is nearest (Hamming distance, ties in entity
        order) to the image's, none further than ``max_distance``."""
        h = emblem_hash(image)
        if h is None:
            return []
        hits = sorted((h - ref, i) for i, ref in enumerate(self.hashes))
        return [(self.names[i], int(d)) for d, i in hits[:k] if d <= max_distance]

    def search_text(self, query: str, k: int = 1) -> list[str]:
        """The ``k`` entities sharing the most words with ``query`` (case-insensitive; ties
        in entity order), none without a shared word."""
        words = set(query.lower().split())
        scores = [(-len(words & set(n.lower().split())), i) for i, n in enumerate(self.names)]
        return [self.names[i] for s, i in sorted(scores)[:k] if s < 0]


class ImageSearchTool(Tool):
    """``image_search(image_index | query)``: the caption of the emblem an image shows
    (image mode), or of the entity a name names (text mode)."""

    name = "image_search"
    description = (
        "Identify an emblem: image_index = an image showing one emblem (e.g. a zoom into its "
        "panel) returns the caption naming whose emblem it is; query = a name returns that "
        "entity's emblem caption. Give exactly one of the two."
    )
    sim_kind = "cosine"
    witness = "results"
    optional = {"image_index": int, "query": str}
    argument_schemas = {
        "image_index": {"description": "An image showing one emblem.", "minimum": 0},
        "query": {"description": "The name of an entity."},
    }

    def __init__(
        self, book: SceneBook, max_pixels: int = MAX_PIXELS, max_distance: int = MAX_DISTANCE
    ):
        self.book = book
        self.max_pixels = max_pixels
        self.max_distance = max_distance
        self._index: ImageIndex | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # each process builds its own index
        state = dict(self.__dict__)
        state["_index"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def index(self) -> ImageIndex:
        with self._lock:
            if self._index is None:
                self._index = ImageIndex(self.book, self.max_pixels)
            return self._index

    def check_arguments(self, arguments: Any) -> dict[str, Any]:
        arguments = super().check_arguments(arguments)
        if len(arguments) != 1:
            raise ToolArgumentError("image_search needs exactly one of 'image_index' and 'query'")
        if "query" in arguments and not arguments["query"].strip():
            raise ToolArgumentError("image_search needs a non-empty 'query'")
        return arguments

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        arguments = self.check_arguments(arguments)
        if "query" in arguments:
            names = self.index.search_text(arguments["query"])
        else:
            image = self.book.view(context.corpus_id, _view_of(arguments, context), self.max_pixels)
            hits = self.index.search_image(image, max_distance=self.max_distance)
            names = [name for name, _ in hits]
        if not names:
            return ToolResult("no match")
        return ToolResult("; ".join(emblem_caption(n) for n in names), refs=tuple(names))
