"""Vision-language policies: images as tokens, the tiny Qwen2-VL model, 3-D rotary positions.

An image enters the context as ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch
+ ``<|vision_end|>``; the model replaces the pad tokens by the vision tower's embeddings of
the image's pixels (``pixel_values``, ``image_grid_thw``). Image tokens are never sampled by
the policy, so their loss mask is 0 like every observation token. Qwen2-VL's rotary
embedding is 3-D (time, height, width): text tokens advance all three together, an image
block spans a grid, and the text after it continues at one past the block's largest
position (``mrope_positions``). The rollout sampler and the training forward both compute
positions with that one function, so the log-probabilities they see agree.

Without ``model.path`` and with ``model.vision: true`` the trainer builds a tiny Qwen2-VL
(random init, a small vision tower and text model) whose image processor is constructed
locally (no download); with ``model.path`` any local Qwen2-VL / Qwen2.5-VL checkpoint loads
with its own processor.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .modeling import seeded, text_config

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_TOKENS = [VISION_START, IMAGE_PAD, VISION_END]


@dataclass
class ImageInput:
    """One image as the model takes it: ``pixel_values [P, C*t*p*p]`` and its patch grid
    ``(t, h, w)``; it occupies ``t * h * w / merge**2`` pad tokens."""

    pixel_values: Tensor
    grid: tuple[int, int, int]
    merge: int = 2

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w // (self.merge * self.merge)


class ImageCodec:
    """Turns images into ``ImageInput`` and image-token ids for one tokenizer and processor."""

    def __init__(self, processor, tokenizer) -> None:
        self.processor = processor
        self.merge = int(getattr(processor, "merge_size", 2))
        ids = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS)
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(f"the tokenizer lacks the image tokens {IMAGE_TOKENS}")
        self.start_id, self.pad_id, self.end_id = (int(i) for i in ids)

    def encode(self, image) -> ImageInput:
        """A PIL image (or PNG bytes) through the image processor."""
        from PIL import Image

        if isinstance(image, bytes | bytearray):
            image = Image.open(io.BytesIO(image))
            image.load()
        out = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = tuple(int(v) for v in out["image_grid_thw"][0].tolist())
        return ImageInput(out["pixel_values"].float(), grid, self.merge)  # type: ignore[arg-type]

    def token_ids(self, image: ImageInput) -> list[int]:
        return [self.start_id] + [self.pad_id] * image.num_tokens + [self.end_id]


def mrope_positions(token_ids: list[int], image_pad_id: int, images: list[ImageInput]) -> Tensor:
    """``(3, L)`` int64 rotary positions of one sequence (Qwen2-VL's rule).

    Text tokens get ``(p, p, p)`` and advance ``p`` by one; the ``k``-th run of image pad
    tokens (``images[k]``, grid ``(1, h, w)`` merged to ``(h/m, w/m)``) gets
    ``(p, p + row, p + col)`` and the text after it starts at one past its largest position.
    """
    L = len(token_ids)
    out = torch.empty(3, L, dtype=torch.int64)
    p, i, k = 0, 0, 0
    while i < L:
        if token_ids[i] != image_pad_id:
            out[:, i] = p
            p, i = p + 1, i + 1
            continue
        if k >= len(images):
            raise ValueError(f"the sequence has more image blocks than its {len(images)} images")
        img = images[k]
        t, h, w = img.grid
        gh, gw = h // img.merge, w // img.merge
        n = t * gh * gw
        if token_ids[i : i + n] != [image_pad_id] * n:
            raise ValueError(f"image {k} needs {n} consecutive pad tokens at position {i}")
        tt = torch.arange(t).repeat_interleave(gh * gw)
        hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
        ww = torch.arange(gw).repeat(t * gh)
        out[0, i : i + n] = p + tt
        out[1, i : i + n] = p + hh
        out[2, i : i + n] = p + ww
        p = p + max(t, gh, gw)
        i, k = i + n, k + 1
    if k != len(images):
        raise ValueError(f"the sequence has {k} image blocks for {len(images)} images")
    return out


@dataclass
class VisionBatch:
    """The image inputs of a batch of rows: every row's images in row order, with the row
    each image (and each patch) belongs to, and the ``(3, B, T)`` rotary positions."""

    pixel_values: Tensor  # [P, C*t*p*p]
    image_grid_thw: Tensor  # [I, 3] int64
    image_rows: Tensor  # [I] int64
    position_ids: Tensor  # [3, B, T] int64

    def to(self, device) -> VisionBatch:
        return VisionBatch(
            self.pixel_values.to(device),
            self.image_grid_thw.to(device),
            self.image_rows.to(device),
            self.position_ids.to(device),
        )

    def rows(self, rows: slice) -> dict[str, Tensor]:
        """The model's image keyword arguments for rows ``rows``."""
        keep = (self.image_rows >= rows.start) & (self.image_rows < rows.stop)
        patches = self.image_grid_thw.prod(-1)
        patch_keep = keep.repeat_interleave(patches)
        return {
            "pixel_values": self.pixel_values[patch_keep],
            "image_grid_thw": self.image_grid_thw[keep],
            "position_ids": self.position_ids[:, rows],
        }


def vision_batch(
    rows: list[tuple[list[int], list[ImageInput]]], image_pad_id: int, T: int, left: bool = False
) -> VisionBatch | None:
    """The ``VisionBatch`` of padded rows (``None`` when no row has an image). ``left``: rows
    end at column ``T - 1`` (rollout prefill), else start at column 0 (training)."""
    if not any(images for _, images in rows):
        return None
    pos = torch.zeros(3, len(rows), T, dtype=torch.int64)
    pixels, grids, owners = [], [], []
    for r, (ids, images) in enumerate(rows):
        p = mrope_positions(ids, image_pad_id, images)
        if left:
            pos[:, r, T - len(ids) :] = p
        else:
            pos[:, r, : len(ids)] = p
        for img in images:
            pixels.append(img.pixel_values)
            grids.append(img.grid)
            owners.append(r)
    return VisionBatch(
        torch.cat(pixels),
        torch.tensor(grids, dtype=torch.int64),
        torch.tensor(owners, dtype=torch.int64),
        pos,
    )


def is_vision_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def tiny_vl_model(cfg, vocab_size: int, ids: dict[str, int], seed: int) -> nn.Module:
    """A random-init Qwen2-VL with a small vision tower; identical on every rank for a seed.
    ``ids``: the tokenizer's ``pad``, ``eos`` and image token ids."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = text_config(cfg, vocab_size, ids["pad"], ids["eos"])
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": _mrope_section(cfg.hidden_size // cfg.num_heads),
    }
    vision = dict(
        depth=cfg.vision_layers,
        embed_dim=cfg.vision_hidden_size,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.vision_heads,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[IMAGE_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
    )
    config._attn_implementation = cfg.attn_implementation
    return seeded(seed, lambda: Qwen2VLForConditionalGeneration(config))


def _mrope_section(head_dim: int) -> list[int]:
    """The split of a head's rotary frequencies into (time, height, width) sections."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def image_processor(max_pixels: int):
    """Qwen2-VL's image processor built locally (patch 14, merge 2, at most ``max_pixels``)."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=28 * 28,
        max_pixels=max_pixels,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )


def load_image_processor(path, max_pixels: int):
    """The image processor saved in a local directory (a checkpoint's, or a tiny model's
    run directory), its pixel budget capped at ``max_pixels``."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    size = getattr(processor, "size", None)
    if getattr(size, "longest_edge", None) is not None:  # Qwen2-VL: a pixel budget
        size.longest_edge = min(int(size.longest_edge), max_pixels)
    return processor


FULL_VIEW = (0.0, 0.0, 1.0, 1.0)


def scene_images(scenes, max_pixels: int):
    """``question_images`` of the visual task: a question shows its whole scene."""

    def images(example) -> list:
        return [(scenes.view(example.corpus_id, FULL_VIEW, max_pixels), FULL_VIEW)]

    return images
