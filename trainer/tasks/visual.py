"""The bundled synthetic visual task: read a small digit or emblem that only a zoom reveals.

Every question shows one scene (image 0), a square RGB picture of ``SCENE_SIZE`` pixels cut
into ``GRID x GRID`` panels, each with a pale background colour and, centred, a black digit
or the emblem of an entity (a 5x5 left-right-symmetric pattern of black cells). The scene
reaches the model as an overview of ``OVERVIEW_PIXELS`` (56 x 56: a panel is 7 pixels, a
digit a blur of under 5, sixteen panels to an image token), where no digit or emblem can be
read; a zoom into one panel shows it at ``MAX_PIXELS`` (84 x 84), twelve times larger, where
it is legible. Questions name a panel by its position:

* ``zoom``: "What number is in the panel at row 2, column 3?" - zoom into that panel
  (``bbox`` [0.25, 0.125, 0.375, 0.25]) and read the digit;
* ``emblem``: "Whose emblem is in the panel at row 2, column 3?" - zoom into the panel, then
  search the emblem by image (``image_search`` of image 1), which returns the caption
  naming its entity.

The ground truth of a question is its answer (the panel's value, also its evidence) and the
panel's box (``gold_box``): a zoom that covers it (IoU >= 0.5) is a good call. The
demonstration calls (``Example.calls``) are those of a perfect solver, except the sloppy
ones (``sloppy_demo_fraction``), which zoom into the whole quarter of the scene. Scenes are
specs (``SceneBook``), rendered with Pillow on demand.
"""

from __future__ import annotations

import json
import math
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .base import Example, TaskData
from .synthetic import entity_names

SCENE_SIZE = 896  # side of a scene in pixels
GRID = 8  # panels per side
MAX_PIXELS = 84 * 84  # pixel budget of every image the model sees (3 x 3 image tokens)
OVERVIEW_PIXELS = 56 * 56  # the whole scene comes as an overview (2 x 2 image tokens)
WHOLE: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
# the panels row by row: (x1, y1, x2, y2) of row r, column c (0-based)
PANEL_BOXES: tuple[tuple[float, float, float, float], ...] = tuple(
    (c / GRID, r / GRID, (c + 1) / GRID, (r + 1) / GRID) for r in range(GRID) for c in range(GRID)
)
# colour name -> (panel background, panel border)
COLORS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((255, 205, 205), (205, 110, 110)),
    "green": ((205, 240, 205), (100, 175, 100)),
    "blue": ((205, 220, 255), (110, 140, 215)),
    "yellow": ((255, 245, 185), (205, 185, 80)),
}
NEUTRAL = ((235, 235, 235), (170, 170, 170))  # the background of reference emblems
KINDS = ("zoom", "emblem")
DIGIT_HEIGHT = 76  # pixels at full resolution
EMBLEM_CELL = 13  # pixels per emblem cell at full resolution
EMBLEM_BITS = 15  # 5 rows x 3 free columns (the other two mirror them)
BORDER = 2  # panel border width in pixels

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Panel:
    """One panel of a scene: its colour, its box (normalised x1, y1, x2, y2) and its content,
    a digit (``value`` "0"-"9") or an entity's emblem (``value`` the entity's name)."""

    color: str
    box: Box
    kind: str  # "digit" | "emblem"
    value: str


@dataclass(frozen=True)
class Scene:
    """A scene: its id (the corpus id of its question) and its panels, row by row."""

    uid: int
    panels: tuple[Panel, ...]


def fit_pixels(
    width: float, height: float, max_pixels: int, factor: int = 28, min_pixels: int | None = None
) -> tuple[int, int]:
    """The size ``(w, h)`` an image of ``width`` x ``height`` is shown at: both sides multiples
    of ``factor`` (at least ``factor``), ``w * h <= max_pixels`` and as large as that allows
    (small regions are enlarged), the aspect ratio kept as closely as the grid permits."""
    min_pixels = factor * factor if min_pixels is None else min_pixels
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width} x {height}")
    if max_pixels < max(min_pixels, factor * factor):
        raise ValueError(f"max_pixels {max_pixels} is below the minimum {min_pixels}")
    scale = math.sqrt(max_pixels / (width * height))

    def near(x: float) -> set[int]:
        return {
            max(factor, math.floor(x / factor) * factor),
            max(factor, math.ceil(x / factor) * factor),
        }

    aspect = width / height
    best: tuple[float, int, int, int] | None = None
    for h in near(height * scale):
        cap = (max_pixels // h) // factor * factor  # the widest w the budget allows at this h
        for w in near(width * scale) | ({cap} if cap >= factor else set()):
            if w * h > max_pixels:
                continue
            key = (round(abs(math.log(w / h / aspect)), 9), -w * h, w, h)
            best = key if best is None or key < best else best
    if best is None:  # an extreme aspect ratio: the short side at `factor`
        short = factor
        long = max(factor, (max_pixels // short) // factor * factor)
        return (long, short) if width >= height else (short, long)
    return best[2], best[3]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=1)
def _digit_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The font size whose digits are about ``DIGIT_HEIGHT`` pixels tall."""
    size = DIGIT_HEIGHT
    while size < 4 * DIGIT_HEIGHT:
        left, top, right, bottom = _font(size).getbbox("8")
        if bottom - top >= DIGIT_HEIGHT:
            break
        size += 1
    return _font(size)


def emblem_cells(bits: int) -> list[tuple[int, int]]:
    """The black cells ``(row, column)`` of an emblem: bit ``3 * row + c`` sets column ``c``
    and its mirror ``4 - c``."""
    cells = set()
    for r in range(5):
        for c in range(3):
            if bits >> (3 * r + c) & 1:
                cells.update({(r, c), (r, 4 - c)})
    return sorted(cells)


def draw_panel(
    image: Image.Image, box: Box, colors: tuple[tuple, tuple], kind: str, value: str, bits: int
) -> None:
    """Draw one panel (background, border, centred content) onto ``image``."""
    size = image.width
    x1, y1, x2, y2 = (round(v * size) for v in box)
    draw = ImageDraw.Draw(image)
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colors[0], outline=colors[1], width=BORDER)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if kind == "digit":
        font = _digit_font()
        left, top, right, bottom = draw.textbbox((0, 0), value, font=font)
        xy = (round(cx - (left + right) / 2), round(cy - (top + bottom) / 2))
        draw.text(xy, value, fill=(0, 0, 0), font=font)
    else:
        left, top = round(cx - 2.5 * EMBLEM_CELL), round(cy - 2.5 * EMBLEM_CELL)
        for r, c in emblem_cells(bits):
            x, y = left + c * EMBLEM_CELL, top + r * EMBLEM_CELL
            draw.rectangle((x, y, x + EMBLEM_CELL - 1, y + EMBLEM_CELL - 1), fill=(0, 0, 0))


def resize_region(image: Image.Image, region: Box, max_pixels: int) -> Image.Image:
    """The ``region`` (normalised) of ``image`` at the size ``fit_pixels`` gives it."""
    x1, y1, x2, y2 = region
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise ValueError(f"a region must satisfy 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1: {region}")
    w, h = image.size
    px = (x1 * w, y1 * h, x2 * w, y2 * h)
    out = fit_pixels(px[2] - px[0], px[3] - px[1], max_pixels)
    return image.resize(out, Image.Resampling.BICUBIC, box=px)


@dataclass
class SceneBook:
    """The scenes of a task (``scene id -> Scene``) and its entities (``name -> emblem
    bits``). Holds specs only (small, picklable); images are rendered on demand and the
    latest few are kept per process."""

    scenes: dict[int, Scene]
    entities: dict[str, int]
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    cache_size: int = 32

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def render(self, scene_id: int) -> Image.Image:
        """The scene at full resolution (``SCENE_SIZE`` pixels square); do not modify it."""
        if scene_id in self._cache:
            self._cache.move_to_end(scene_id)
            return self._cache[scene_id]
        scene = self.scenes[scene_id]
        image = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), (255, 255, 255))
        for p in scene.panels:
            bits = self.entities[p.value] if p.kind == "emblem" else 0
            draw_panel(image, p.box, COLORS[p.color], p.kind, p.value, bits)
        self._cache[scene_id] = image
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return image

    def view(self, scene_id: int, region: Box, max_pixels: int = MAX_PIXELS) -> Image.Image:
        """The ``region`` (normalised x1, y1, x2, y2) of a scene as the model sees it: the
        whole scene as an overview of at most ``OVERVIEW_PIXELS``, a region within
        ``max_pixels``."""
        if tuple(region) == WHOLE:
            max_pixels = min(max_pixels, OVERVIEW_PIXELS)
        return resize_region(self.render(scene_id), region, max_pixels)

    def emblem_panel(self, name: str) -> Image.Image:
        """A panel (``SCENE_SIZE / GRID`` pixels square) of the entity's emblem on a neutral
        background: the reference image of the emblem."""
        side = SCENE_SIZE // GRID
        image = Image.new("RGB", (side, side), (255, 255, 255))
        draw_panel(image, (0.0, 0.0, 1.0, 1.0), NEUTRAL, "emblem", name, self.entities[name])
        return image


def emblem_caption(name: str) -> str:
    return f"the emblem of {name}"


def question_text(kind: str, index: int) -> str:
    """The question about panel ``index`` (row by row), named by its row and column."""
    where = f"row {index // GRID + 1}, column {index % GRID + 1}"
    if kind == "zoom":
        return f"What number is in the panel at {where}?"
    return f"Whose emblem is in the panel at {where}?"


def emblem_distance(a: int, b: int) -> int:
    """How many of the 25 cells two emblems differ in."""
    diff = a ^ b
    middle = 0b100100100100100  # the bits of the middle column, drawn once
    return 2 * (diff & ~middle).bit_count() + (diff & middle).bit_count()


def emblem_codes(n: int, rng: random.Random, min_distance: int = 5) -> list[int]:
    """``n`` emblem patterns, pairwise at least ``min_distance`` cells apart, each with 5 to
    10 free bits set and spanning all five rows and columns (so every emblem has the same
    outline)."""

    def spans(bits: int) -> bool:
        rows = [bits >> (3 * r) & 7 for r in range(5)]
        return rows[0] != 0 and rows[4] != 0 and any(row & 1 for row in rows)

    codes: list[int] = []
    for _ in range(1000 * max(n, 1)):
        if len(codes) == n:
            break
        bits = rng.getrandbits(EMBLEM_BITS)
        if 5 <= bits.bit_count() <= 10 and spans(bits):
            if all(emblem_distance(bits, c) >= min_distance for c in codes):
                codes.append(bits)
    if len(codes) < n:
        raise ValueError(f"cannot draw {n} emblems {min_distance} cells apart")
    return codes


def _counts(n: int, kinds: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` into per-kind counts proportional to the weights (largest remainders)."""
    total = sum(kinds.values())
    exact = {k: n * w / total for k, w in kinds.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _normalise_kinds(kinds: Mapping[str, float] | None) -> dict[str, float]:
    kinds = dict(kinds) if kinds else {"zoom": 0.7, "emblem": 0.3}
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; available: {list(KINDS)}")
    if any(not isinstance(w, (int, float)) or not w >= 0 for w in kinds.values()) or not (
        sum(kinds.values()) > 0
    ):
        raise ValueError(f"question kind weights must be >= 0 with a positive sum, got {kinds}")
    return {k: float(w) for k, w in kinds.items()}


def _call(name: str, arguments: dict) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def make_scene(uid: int, kind: str, names: list[str], rng: random.Random) -> tuple[Scene, int]:
    """A random scene whose question of ``kind`` asks about the returned panel index."""
    colors = [rng.choice(list(COLORS)) for _ in PANEL_BOXES]
    target = rng.randrange(len(PANEL_BOXES))
    panels = []
    for i, (color, box) in enumerate(zip(colors, PANEL_BOXES, strict=True)):
        content = ("digit" if kind == "zoom" else "emblem") if i == target else None
        content = content or rng.choice(("digit", "emblem"))
        value = str(rng.randrange(10)) if content == "digit" else rng.choice(names)
        panels.append(Panel(color, box, content, value))
    return Scene(uid, tuple(panels)), target


def quarter(box: Box) -> Box:
    """The quarter of the scene that holds ``box`` (a sloppy zoom: IoU 1/16 with a panel)."""
    x, y = (0.0 if box[0] < 0.5 else 0.5), (0.0 if box[1] < 0.5 else 0.5)
    return (x, y, x + 0.5, y + 0.5)


def scene_example(scene: Scene, kind: str, index: int, loose: bool = False) -> Example:
    """The question of ``kind`` about panel ``index``, with its ground truth and the calls
    that answer it (``loose``: the zoom shows the whole quarter around the panel)."""
    panel = scene.panels[index]
    region = quarter(panel.box) if loose else panel.box
    zoom = _call("zoom_in", {"image_index": 0, "bbox": [float(v) for v in region]})
    calls = (zoom,) if kind == "zoom" else (zoom, _call("image_search", {"image_index": 1}))
    return Example(
        uid=f"visual-{scene.uid}",
        question=question_text(kind, index),
        answers=(panel.value,),
        corpus_id=scene.uid,
        evidence=((panel.value,),),
        kind=kind,
        task="main",
        tool="zoom_in",
        tool_arg="bbox",
        images=1,
        calls=calls,
        gold_box=panel.box,
    )


def visual_task(
    num_scenes: int = 256,
    heldout_fraction: float = 0.25,
    num_demos: int = 512,
    seed: int = 0,
    kinds: Mapping[str, float] | None = None,
    num_entities: int = 32,
    sloppy_demo_fraction: float = 0.0,
) -> TaskData:
    """Build the task (deterministic in its arguments): one question per scene; scenes
    ``0 .. num_scenes - 1`` hold the training and held-out questions (the last
    ``heldout_fraction`` of them are held out), each demonstration gets a fresh scene after
    those. Corpus 0 holds the caption of every emblem (what ``image_search`` returns).

    ``sloppy_demo_fraction``: the share of digit demonstrations that zoom into the whole
    quarter of the scene around the panel instead of the panel itself, then answer right.
    In that view the digit is four times smaller among fifteen others, so the habit looks
    right in the demonstrations and fails often when the policy applies it; RL has to learn
    from the reward alone to zoom tightly. A sloppy zoom covers its panel with IoU 1/16, so
    the ground truth counts it as a bad call."""
    if num_scenes < 2:
        raise ValueError(f"num_scenes must be >= 2, got {num_scenes}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    kinds = _normalise_kinds(kinds)
    rng = random.Random(f"visual-{seed}")
    names = entity_names(num_entities, seed)
    book = SceneBook({}, dict(zip(names, emblem_codes(num_entities, rng), strict=True)))

    def questions(first: int, n: int, sloppy: float = 0.0) -> list[Example]:
        plan = [k for k, c in _counts(n, kinds).items() for _ in range(c)]
        rng.shuffle(plan)
        out = []
        for uid, kind in enumerate(plan, start=first):
            scene, target = make_scene(uid, kind, names, rng)
            book.scenes[uid] = scene
            loose = kind == "zoom" and sloppy > 0 and rng.random() < sloppy
            out.append(scene_example(scene, kind, target, loose))
        return out

    asked = questions(0, num_scenes)
    n_heldout = min(num_scenes - 1, max(1, round(heldout_fraction * num_scenes)))
    demos = questions(num_scenes, num_demos, sloppy_demo_fraction)
    return TaskData(
        train=asked[: num_scenes - n_heldout],
        heldout=asked[num_scenes - n_heldout :],
        demos=demos,
        corpora={0: [emblem_caption(name) for name in names]},
        scenes=book,
    )


def picture(task: TaskData, index: int = 0, side: int = 336) -> Image.Image:
    """A figure of one training question: the scene at full resolution, the scene as the
    model sees it, and the zoom into the question's panel as the model sees it (both
    enlarged without smoothing), captioned with the question and its answer."""
    ex = task.train[index]
    book: SceneBook = task.scenes
    panels = [
        (book.render(ex.corpus_id), "the scene (full resolution)"),
        (book.view(ex.corpus_id, (0.0, 0.0, 1.0, 1.0)), "what the model sees"),
        (book.view(ex.corpus_id, ex.gold_box), f"zoom_in bbox={list(ex.gold_box)}"),
    ]
    pad, top = 12, 44
    out = Image.new("RGB", (3 * side + 4 * pad, side + top + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = _font(15)
    draw.text((pad, 8), f"{ex.question}  answer: {ex.answers[0]}", fill=(0, 0, 0), font=font)
    for i, (image, label) in enumerate(panels):
        x = pad + i * (side + pad)
        resample = Image.Resampling.LANCZOS if i == 0 else Image.Resampling.NEAREST
        out.paste(image.resize((side, side), resample), (x, top))
        draw.text((x, top + side + 4), label, fill=(60, 60, 60), font=_font(13))
    return out
