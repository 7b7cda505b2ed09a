"""The visual task (scenes, questions, demonstrations) and its tools (zoom_in, image_search)."""

import io
import itertools
import json
import math
import pickle

import numpy as np
import pytest
from PIL import Image

from trainer.tasks.base import box_iou as iou
from trainer.tasks.visual import (
    COLORS,
    MAX_PIXELS,
    PANEL_BOXES,
    SCENE_SIZE,
    Panel,
    Scene,
    SceneBook,
    emblem_cells,
    emblem_distance,
    fit_pixels,
    visual_task,
)
from trainer.tools.base import ToolArgumentError, ToolContext
from trainer.tools.vision import (
    ImageIndex,
    ImageSearchTool,
    ZoomInTool,
    box_of_refs,
    compose,
    crop_box,
)

WHOLE = (0.0, 0.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def task():
    return visual_task(num_scenes=32, num_demos=8, seed=1)


def approx_box(box):
    return pytest.approx(box, abs=1e-9)


def decode(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png))


# --- geometry ---------------------------------------------------------------------------


def test_crop_box_clamps_a_box_partly_outside():
    assert crop_box([-0.2, 0.5, 0.6, 1.3]) == approx_box((0.0, 0.5, 0.6, 1.0))
    assert crop_box((0, 0, 1, 1)) == approx_box(WHOLE)


@pytest.mark.parametrize(
    "bbox",
    [[1.2, 0.0, 1.5, 0.5], [0.2, -0.5, 0.4, 0.0], [-1.0, -1.0, -0.5, -0.5]],
    ids=["right", "above", "top-left"],
)
def test_crop_box_rejects_a_box_outside_the_image(bbox):
    with pytest.raises(ToolArgumentError, match="outside"):
        crop_box(bbox)


@pytest.mark.parametrize(
    "bbox",
    [[0.6, 0.0, 0.4, 1.0], [0.0, 0.7, 1.0, 0.2], [0.3, 0.3, 0.3, 0.5], [0.1, 0.4, 0.5, 0.4]],
    ids=["x-inverted", "y-inverted", "zero-width", "zero-height"],
)
def test_crop_box_rejects_inverted_and_degenerate_boxes(bbox):
    with pytest.raises(ToolArgumentError, match="bbox"):
        crop_box(bbox)


@pytest.mark.parametrize(
    "bbox",
    [
        [0.0, 0.0, 1.0],
        [0.0, 0.0, 0.5, 0.5, 1.0],
        "0,0,1,1",
        ["0", 0, 1, 1],
        [0.0, float("nan"), 1.0, 1.0],
        [0.0, 0.0, float("inf"), 1.0],
        [False, 0, True, 1],
        None,
    ],
    ids=["three", "five", "string", "string-item", "nan", "inf", "bools", "none"],
)
def test_crop_box_rejects_malformed_boxes_naming_bbox(bbox):
    with pytest.raises(ToolArgumentError, match="bbox"):
        crop_box(bbox)


def test_crop_box_grows_a_tiny_box_around_its_centre():
    # centre (0.51, 0.505), sides 0.1
    assert crop_box([0.5, 0.5, 0.52, 0.51]) == approx_box((0.46, 0.455, 0.56, 0.555))
    # near a corner the grown box is shifted back inside: x in [0.9, 1], y in [0, 0.1]
    assert crop_box([0.97, 0.0, 0.99, 0.02]) == approx_box((0.9, 0.0, 1.0, 0.1))
    # only the short side grows
    assert crop_box([0.2, 0.3, 0.8, 0.32], min_size=0.2) == approx_box((0.2, 0.21, 0.8, 0.41))


def test_compose_narrows_in():
    top_right = compose(WHOLE, (0.5, 0.0, 1.0, 0.5))
    assert top_right == approx_box((0.5, 0.0, 1.0, 0.5))
    assert compose(top_right, (0.0, 0.5, 0.5, 1.0)) == approx_box((0.5, 0.25, 0.75, 0.5))


def test_iou():
    assert iou((0.1, 0.2, 0.6, 0.9), (0.1, 0.2, 0.6, 0.9)) == pytest.approx(1.0)
    assert iou((0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)) == 0.0
    assert iou(WHOLE, (0.0, 0.0, 0.5, 0.5)) == pytest.approx(0.25)
    # overlap 0.25 x 0.5 = 0.125, union 0.25 + 0.25 - 0.125 = 0.375
    assert iou((0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5)) == pytest.approx(1 / 3)


def test_fit_pixels():
    assert fit_pixels(448, 448, 112 * 112) == (112, 112)  # the scene, 4x smaller
    assert fit_pixels(224, 224, 112 * 112) == (112, 112)  # a panel, 2x smaller
    assert fit_pixels(44.8, 44.8, 112 * 112) == (112, 112)  # a small crop is enlarged
    # 2:1 scaled to the budget is 158.4 x 79.2; 140 x 84 is the closest grid shape within it
    assert fit_pixels(448, 224, 112 * 112) == (140, 84)
    assert fit_pixels(10, 1000, 112 * 112) == (28, 448)  # the short side stays at 28
    for w, h, budget in [(448, 300, 112 * 112), (100, 37, 200 * 200), (31, 500, 64 * 64)]:
        fw, fh = fit_pixels(w, h, budget)
        assert fw % 28 == 0 and fh % 28 == 0 and fw >= 28 and fh >= 28
        assert fw * fh <= budget
        if max(w / h, h / w) < 4:
            assert abs(math.log(fw / fh) - math.log(w / h)) < math.log(1.5)
    with pytest.raises(ValueError):
        fit_pixels(448, 448, 20 * 20)
    # the task's budget, 84 x 84: the 896-pixel scene 32/3 times smaller (a 112-pixel panel
    # becomes 10.5 pixels), a zoom into one panel (112 pixels) at 84, eight times larger
    assert MAX_PIXELS == 84 * 84 and SCENE_SIZE == 896
    assert fit_pixels(896, 896, MAX_PIXELS) == (84, 84)
    assert fit_pixels(112, 112, MAX_PIXELS) == (84, 84)


# --- zoom_in ----------------------------------------------------------------------------


def test_zoom_returns_the_region_as_a_png(task):
    tool = ZoomInTool(task.scenes)
    context = ToolContext(corpus_id=3, views=(WHOLE,))
    args = tool.check_arguments({"image_index": 0, "bbox": [0.5, 0.0, 1.0, 0.5]})
    result = tool.run(args, context)
    assert result.text == "zoomed region 0.50 0.00 1.00 0.50"
    assert result.refs == ("0.5000,0.0000,1.0000,0.5000",)
    assert box_of_refs(result.refs) == approx_box((0.5, 0.0, 1.0, 0.5))
    image = decode(result.image)
    # a 448 x 448 region fits the 84 x 84 budget exactly
    assert image.format == "PNG" and image.size == (84, 84)
    expected = task.scenes.view(3, (0.5, 0.0, 1.0, 0.5), MAX_PIXELS)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    # 896 x 448 (2:1): 112 x 56 keeps the ratio within 84 * 84 = 7056 (140 x 56 = 7840 does not)
    wide = tool.run({"image_index": 0, "bbox": [0.0, 0.0, 1.0, 0.5]}, context)
    assert decode(wide.image).size == (112, 56)
    # one panel (row 2, column 3: 112 x 112 pixels) is shown at 84 x 84
    panel = tool.run({"image_index": 0, "bbox": [0.25, 0.125, 0.375, 0.25]}, context)
    assert panel.refs == ("0.2500,0.1250,0.3750,0.2500",)
    assert decode(panel.image).size == (84, 84)


def test_zoom_into_a_zoom_composes_with_its_view(task):
    tool = ZoomInTool(task.scenes)
    context = ToolContext(corpus_id=0, views=(WHOLE, (0.5, 0.0, 1.0, 0.5)))
    result = tool.run({"image_index": 1, "bbox": [0.0, 0.5, 0.5, 1.0]}, context)
    assert box_of_refs(result.refs) == approx_box((0.5, 0.25, 0.75, 0.5))
    assert result.text == "zoomed region 0.50 0.25 0.75 0.50"


def test_zoom_rejects_a_missing_image(task):
    tool = ZoomInTool(task.scenes)
    context = ToolContext(corpus_id=0, views=(WHOLE, (0.5, 0.0, 1.0, 0.5)))
    with pytest.raises(ToolArgumentError, match="2 image"):
        tool.run({"image_index": 2, "bbox": [0, 0, 1, 1]}, context)
    with pytest.raises(ToolArgumentError):
        tool.run({"image_index": -1, "bbox": [0, 0, 1, 1]}, context)
    with pytest.raises(ToolArgumentError):
        tool.check_arguments({"image_index": 0, "bbox": "0 0 1 1"})


def test_tools_pickle_and_stay_deterministic(task):
    zoom, search = ZoomInTool(task.scenes), ImageSearchTool(task.scenes)
    context = ToolContext(corpus_id=5, views=(WHOLE, (0.0, 0.5, 0.5, 1.0)))
    args = {"image_index": 0, "bbox": [0.0, 0.5, 0.5, 1.0]}
    before = zoom.run(args, context), search.run({"image_index": 1}, context)
    zoom2, search2 = pickle.loads(pickle.dumps((zoom, search)))
    assert search2._index is None  # rebuilt on first use
    assert (zoom2.run(args, context), search2.run({"image_index": 1}, context)) == before


# --- image_search -----------------------------------------------------------------------


def emblem_panels(task):
    for ex in task.train + task.heldout:
        for panel in task.scenes.scenes[ex.corpus_id].panels:
            if panel.kind == "emblem":
                yield ex.corpus_id, panel


def test_image_index_finds_the_emblem_of_a_zoomed_panel(task):
    book = task.scenes
    index = ImageIndex(book)
    panels = list(emblem_panels(task))
    assert len(panels) >= 20
    for scene_id, panel in panels:
        x1, y1, x2, y2 = panel.box
        hits = index.search_image(book.view(scene_id, panel.box))
        assert [name for name, _ in hits] == [panel.value]
        # an emblem is 5 x 13 = 65 of the panel's 112 pixels (23.5 from each side), a digit
        # 76 tall (18 from each side): a shift by 0.01 (9 pixels) neither cuts the emblem
        # nor brings in a neighbour's content
        shifted = crop_box([x1 + 0.01, y1 - 0.01, x2 + 0.01, y2 - 0.01])
        assert [name for name, _ in index.search_image(book.view(scene_id, shifted))] == [
            panel.value
        ]
        whole = index.search_image(book.view(scene_id, WHOLE), k=3)
        assert panel.value not in [name for name, _ in whole]


def test_image_search_tool_reads_the_view_the_model_saw(task):
    tool = ImageSearchTool(task.scenes)
    scene_id, panel = next(emblem_panels(task))
    context = ToolContext(corpus_id=scene_id, views=(WHOLE, panel.box))
    result = tool.run(tool.check_arguments({"image_index": 1}), context)
    assert result.refs == (panel.value,)
    assert result.text == f"the emblem of {panel.value}"
    assert panel.value not in tool.run({"image_index": 0}, context).refs
    with pytest.raises(ToolArgumentError, match="2 image"):
        tool.run({"image_index": 2}, context)


def test_emblem_cells_mirror_the_free_columns():
    assert emblem_cells(0b1) == [(0, 0), (0, 4)]  # bit 0: row 0, column 0 and its mirror
    assert emblem_cells(0b100) == [(0, 2)]  # the middle column has no mirror
    assert emblem_cells(0b10 << 12) == [(4, 1), (4, 3)]
    assert emblem_distance(0b1, 0) == 2 and emblem_distance(0b100, 0) == 1
    assert emblem_distance(0b101, 0b110) == 4


def test_image_search_finds_no_emblem_in_a_digit_panel(task):
    tool = ImageSearchTool(task.scenes)
    for ex in task.train[:8]:
        for panel in task.scenes.scenes[ex.corpus_id].panels:
            if panel.kind == "digit":
                context = ToolContext(corpus_id=ex.corpus_id, views=(WHOLE, panel.box))
                assert tool.run({"image_index": 1}, context).text == "no match"


def test_image_search_by_text(task):
    tool = ImageSearchTool(task.scenes)
    names = list(task.scenes.entities)
    for name in names[:8]:
        result = tool.run({"query": name.upper()}, ToolContext())
        assert result.refs == (name,)
        assert result.text == f"the emblem of {name}"
    first = names[0].split()[0]
    assert all(first in n.split() for n in tool.index.search_text(first.lower(), k=3))
    assert tool.run({"query": "qwxz"}, ToolContext()).text == "no match"
    for bad in ({}, {"query": "a", "image_index": 0}, {"query": "  "}):
        with pytest.raises(ToolArgumentError):
            tool.check_arguments(bad)


# --- the task ---------------------------------------------------------------------------


def test_task_is_deterministic_in_its_seed():
    a, b = visual_task(num_scenes=16, num_demos=4, seed=7), visual_task(16, num_demos=4, seed=7)
    assert a.train == b.train and a.heldout == b.heldout and a.demos == b.demos
    assert a.corpora == b.corpora and a.scenes.entities == b.scenes.entities
    for scene_id in (0, 9, 17):
        pixels = [np.asarray(t.scenes.render(scene_id)) for t in (a, b)]
        assert pixels[0].shape == (SCENE_SIZE, SCENE_SIZE, 3)
        assert np.array_equal(*pixels)
    c = visual_task(num_scenes=16, num_demos=4, seed=8)
    assert [e.question for e in a.train] != [e.question for e in c.train] or [
        e.answers for e in a.train
    ] != [e.answers for e in c.train]
    assert a.scenes.entities != c.scenes.entities
    assert not np.array_equal(np.asarray(a.scenes.render(0)), np.asarray(c.scenes.render(0)))


def test_splits_scene_ids_and_corpus():
    task = visual_task(num_scenes=20, heldout_fraction=0.25, num_demos=6, seed=2, num_entities=12)
    assert (len(task.train), len(task.heldout), len(task.demos)) == (15, 5, 6)
    ids = [ex.corpus_id for ex in task.train + task.heldout + task.demos]
    assert ids == list(range(26)) and set(task.scenes.scenes) == set(ids)
    assert len(task.corpora[0]) == len(task.scenes.entities) == 12
    assert all(caption.startswith("the emblem of ") for caption in task.corpora[0])
    emblems = [set(emblem_cells(bits)) for bits in task.scenes.entities.values()]
    assert all(len(cells) == len({(r, 4 - c) for r, c in cells} & cells) for cells in emblems)
    assert min(len(a ^ b) for a, b in itertools.combinations(emblems, 2)) >= 5
    only_emblems = visual_task(num_scenes=8, num_demos=2, kinds={"emblem": 1.0})
    assert {ex.kind for ex in only_emblems.train + only_emblems.demos} == {"emblem"}
    with pytest.raises(ValueError, match="unknown question kinds"):
        visual_task(num_scenes=8, kinds={"count": 1.0})


def test_scene_layout(task):
    # an 8 x 8 grid of 0.125-wide cells, row by row
    assert len(PANEL_BOXES) == 64
    assert PANEL_BOXES[0] == approx_box((0.0, 0.0, 0.125, 0.125))
    assert PANEL_BOXES[1] == approx_box((0.125, 0.0, 0.25, 0.125))  # row 1, column 2
    assert PANEL_BOXES[8] == approx_box((0.0, 0.125, 0.125, 0.25))  # row 2, column 1
    assert PANEL_BOXES[10] == approx_box((0.25, 0.125, 0.375, 0.25))  # row 2, column 3
    assert PANEL_BOXES[63] == approx_box((0.875, 0.875, 1.0, 1.0))
    # the panels tile the scene: no overlaps, total area 1
    assert all(iou(a, b) == 0.0 for a, b in itertools.combinations(PANEL_BOXES, 2))
    assert sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in PANEL_BOXES) == pytest.approx(1.0)
    used = set()
    for scene in task.scenes.scenes.values():
        assert [p.box for p in scene.panels] == list(PANEL_BOXES)
        colors = [p.color for p in scene.panels]
        assert set(colors) <= set(COLORS)
        assert len(set(colors)) < len(colors)  # 64 panels, 4 colours: repeats
        assert {p.kind for p in scene.panels} <= {"digit", "emblem"}
        used.update(colors)
    assert used == set(COLORS)  # every colour is used somewhere


def test_gold_box_holds_the_answer(task):
    kinds, positions = set(), set()
    for ex in task.train + task.heldout + task.demos:
        scene = task.scenes.scenes[ex.corpus_id]
        (panel,) = [p for p in scene.panels if p.box == ex.gold_box]
        assert ex.answers == (panel.value,) and ex.evidence == ((panel.value,),)
        assert ex.gold_box in PANEL_BOXES
        x1, y1, x2, y2 = ex.gold_box
        assert (x2 - x1, y2 - y1) == (0.125, 0.125)
        row, column = round(8 * y1) + 1, round(8 * x1) + 1  # 1-based, cells 0.125 wide
        where = f"the panel at row {row}, column {column}?"
        question = {"zoom": "What number is in ", "emblem": "Whose emblem is in "}[ex.kind]
        assert ex.question == question + where
        positions.add((row, column))
        assert panel.kind == {"zoom": "digit", "emblem": "emblem"}[ex.kind]
        assert ex.images == 1 and ex.tool == "zoom_in" and ex.task == "main"
        assert ex.uid == f"visual-{ex.corpus_id}"
        kinds.add(ex.kind)
    assert kinds == {"zoom", "emblem"}
    assert len(positions) >= 8  # 40 questions over 64 panels: the asked panel varies


def test_demonstration_calls(task):
    assert task.demos
    for ex in task.demos:
        calls = [json.loads(text) for text in ex.calls]
        assert calls[0] == {
            "name": "zoom_in",
            "arguments": {"image_index": 0, "bbox": list(ex.gold_box)},
        }
        if ex.kind == "zoom":
            assert len(calls) == 1
        else:
            assert calls[1] == {"name": "image_search", "arguments": {"image_index": 1}}
        assert ex.demo_calls() == [(c["name"], c["arguments"]) for c in calls]


def test_zooming_is_needed_to_read_a_digit():
    """A digit is a faint smudge in the scene's 56 x 56 overview (a panel is 7 x 7 pixels
    there) but dark strokes, different for every pair of digits, in an 84 x 84 zoom into its
    panel (twelve times larger)."""
    book = SceneBook(
        {
            d: Scene(d, tuple(Panel("blue", b, "digit", str(d)) for b in PANEL_BOXES))
            for d in range(10)
        },
        {},
    )

    def ink(scene_id, region):
        return np.asarray(book.view(scene_id, region, MAX_PIXELS).convert("L")) < 64

    whole = [ink(d, WHOLE) for d in range(10)]
    assert whole[0].shape == (56, 56)
    # every panel: rows / columns 7 k .. 7 (k + 1) of the overview
    scene = [
        [w[7 * (i // 8) : 7 * (i // 8 + 1), 7 * (i % 8) : 7 * (i % 8 + 1)] for w in whole]
        for i in range(64)
    ]
    zoom = [[ink(d, PANEL_BOXES[i]) for d in range(10)] for i in range(64)]
    assert zoom[0][0].shape == (84, 84)
    # measured (threshold 64): in a zoom a digit has 493 ("1") to 968 ("8") dark pixels and
    # two digits differ in at least 284, in every panel; in the overview the darkest pixel
    # is 60 to 97 and a panel has at most one pixel below 64 (a "4"; the others none)
    for i in range(64):
        assert all(s.sum() <= 3 for s in scene[i]), [int(s.sum()) for s in scene[i]]
        assert all(z.sum() >= 250 for z in zoom[i])
        for a, b in itertools.combinations(range(10), 2):
            assert (scene[i][a] ^ scene[i][b]).sum() <= 3
            assert (zoom[i][a] ^ zoom[i][b]).sum() >= 140


def test_scene_book_pickles_small_without_images(task):
    book = task.scenes
    size = len(pickle.dumps(book))
    book.render(0)
    assert len(pickle.dumps(book)) == size < 100_000
    copy = pickle.loads(pickle.dumps(book))
    assert copy.scenes == book.scenes and not copy._cache
    assert np.array_equal(np.asarray(copy.render(1)), np.asarray(book.render(1)))
