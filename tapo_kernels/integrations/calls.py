"""Tool calls of generated completions, for the framework adapters.

A completion's tool calls are recorded as ``CallSpan`` s: the token span ``[start, end)``
of each call in the completion (from the first token of its opening tag to the last token
of its closing tag, the tokens the model generated to make the call), the tool's name and
its arguments (canonical JSON text). ``find_call_spans`` finds them in token ids by the
tool-call tags (Hermes / Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
by default). ``tool_calls`` turns the spans of a batch into ``ToolCalls`` and the
similarity kind of each tool, and ``correct_advantages`` runs ``fused_correct`` on them.

Tool ids are given per batch: the distinct names of the batch's valid calls, sorted. TAPO
only compares calls of the same tool, so the numbering needs no registry. A call whose text
is not a JSON object with a ``name`` is malformed (tool id -1: TAPO never lifts it and it
witnesses nothing). Calls of the tools in ``iou_tools`` are compared by the IoU of the box
``arguments[box_arg]`` (``(x1, y1, x2, y2)`` in ``[0, 1]``; a call without a valid box is
malformed), all others by the cosine of ``encode_text`` of their arguments.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..correction import (
    DEFAULT_ALPHA_MIN,
    DEFAULT_BETA,
    DEFAULT_THETA,
    TapoResult,
    ToolCalls,
    fused_correct,
)
from ..params import TEXT_DIM, encode_box, encode_text
from ..reference import SIM_COSINE, SIM_IOU

START_TAG = "<tool_call>"
END_TAG = "</tool_call>"


@dataclass(frozen=True)
class CallSpan:
    """One tool call of a completion: tokens ``[start, end)``, tool name, arguments.

    ``name`` is ``""`` for a malformed call. ``arguments`` is JSON text (``json.dumps`` with
    sorted keys when the call carried an object). ``key``: context key; calls with different
    keys never match (e.g. zoom-ins on different images).
    """

    start: int
    end: int
    name: str
    arguments: str
    key: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value: CallSpan | Mapping[str, Any]) -> CallSpan:
        """A ``CallSpan`` from itself or from a mapping with its fields (``arguments`` may be
        an object, then stored as canonical JSON)."""
        if isinstance(value, CallSpan):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"a tool call record must be a mapping, got {type(value).__name__}")
        missing = {"start", "end"} - set(value)
        if missing:
            raise ValueError(f"tool call record {dict(value)!r} lacks {sorted(missing)}")
        arguments = value.get("arguments", "")
        return cls(
            int(value["start"]),
            int(value["end"]),
            str(value.get("name") or ""),
            arguments if isinstance(arguments, str) else canonical_json(arguments),
            int(value.get("key", 0)),
        )


def canonical_json(value: Any) -> str:
    """JSON text with sorted keys: equal arguments give equal text."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def parse_call(payload: str) -> tuple[str, str]:
    """``(name, arguments)`` of the text between a call's tags; ``("", text)`` when it is not
    a JSON object with a string ``name``. ``arguments`` (or ``parameters``) given as JSON text
    is decoded first, so both spellings give the same canonical text."""
    text = payload.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return "", text
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return "", text
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return obj["name"], args
    return obj["name"], canonical_json(args)


def _token_texts(token_ids: Sequence[int], tokenizer: Any) -> list[str]:
    """The text of each token alone (special tokens kept)."""
    singles = [[t] for t in token_ids]
    if hasattr(tokenizer, "batch_decode"):
        return list(
            tokenizer.batch_decode(
                singles, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )
    return [tokenizer.decode(s) for s in singles]


def find_call_spans(
    token_ids: Sequence[int] | Tensor,
    tokenizer: Any,
    *,
    start_tag: str = START_TAG,
    end_tag: str = END_TAG,
    mask: Sequence[int] | Tensor | None = None,
) -> list[CallSpan]:
    """The tool calls in one completion's token ids, in order.

    Tokens are decoded one at a time and concatenated, so a tag found in that text maps to
    the tokens that produced it, whether the tag is one added token or several (a token
    that is part of a multi-byte character decodes to a replacement character, which never
    belongs to an ASCII tag). A call is an opening tag followed by a closing tag; an opening
    tag without one (a truncated completion) is not a call. With ``mask`` (1 on tokens the
    model generated, 0 on tool output and padding), calls that cover a 0 token are dropped,
    so a tag quoted inside a tool result is never taken for a call. Spans never overlap: a
    token shared by two calls belongs to the first.
    """
    ids = token_ids.tolist() if isinstance(token_ids, Tensor) else [int(t) for t in token_ids]
    if not ids:
        return []
    keep = None
    if mask is not None:
        keep = mask.tolist() if isinstance(mask, Tensor) else list(mask)
        if len(keep) != len(ids):
            raise ValueError(f"mask has {len(keep)} entries for {len(ids)} tokens")
    pieces = _token_texts(ids, tokenizer)
    text = "".join(pieces)
    if start_tag not in text:
        return []
    ends = list(itertools.accumulate(len(p) for p in pieces))  # ends[i]: end of token i's text

    def token_at(char: int) -> int:
        return bisect.bisect_right(ends, char)

    spans: list[CallSpan] = []
    pos, last_end = 0, 0
    while True:
        s = text.find(start_tag, pos)
        if s < 0:
            break
        e = text.find(end_tag, s + len(start_tag))
        if e < 0:
            break
        pos = e + len(end_tag)
        t0, t1 = max(token_at(s), last_end), token_at(pos - 1) + 1
        if t0 >= t1 or (keep is not None and not all(keep[t0:t1])):
            continue
        name, arguments = parse_call(text[s + len(start_tag) : e])
        spans.append(CallSpan(t0, t1, name, arguments))
        last_end = t1
    return spans


def record_spans(
    completion_ids: Tensor | Sequence[Sequence[int]],
    tokenizer: Any,
    *,
    start_tag: str = START_TAG,
    end_tag: str = END_TAG,
    mask: Tensor | Sequence[Sequence[int]] | None = None,
) -> list[list[CallSpan]]:
    """``find_call_spans`` of each row of a batch (``mask``: as there, one row per
    completion, e.g. ``completion_mask * tool_mask``). Rows whose text has no opening tag
    are decoded once, not token by token."""
    rows = completion_ids.tolist() if isinstance(completion_ids, Tensor) else completion_ids
    masks = mask.tolist() if isinstance(mask, Tensor) else mask
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode(
            rows, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
    else:
        texts = [tokenizer.decode(ids) for ids in rows]
    return [
        find_call_spans(
            ids,
            tokenizer,
            start_tag=start_tag,
            end_tag=end_tag,
            mask=None if masks is None else masks[i],
        )
        if start_tag in texts[i]
        else []
        for i, ids in enumerate(rows)
    ]


@dataclass
class TapoSettings:
    """The TAPO settings of an adapter (``fused_correct`` arguments and call encoding)."""

    theta: float = DEFAULT_THETA
    alpha_min: float = DEFAULT_ALPHA_MIN
    beta: float = DEFAULT_BETA
    batch_scope: bool = False
    coverage: bool = True
    param_dim: int = TEXT_DIM
    iou_tools: tuple[str, ...] = ()
    box_arg: str = "bbox"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> TapoSettings:
        """Settings from a config section (dict, OmegaConf ``DictConfig``); an unknown key is an
        error (a misspelt key would otherwise be ignored)."""
        if mapping is None:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        items = {str(k): mapping[k] for k in mapping}
        unknown = set(items) - names
        if unknown:
            raise ValueError(f"unknown TAPO settings {sorted(unknown)}; expected {sorted(names)}")
        if "iou_tools" in items:
            items["iou_tools"] = tuple(str(t) for t in items["iou_tools"] or ())
        return cls(**items)

    def correct_kwargs(self) -> dict[str, Any]:
        return dict(
            theta=float(self.theta),
            alpha_min=float(self.alpha_min),
            beta=float(self.beta),
            batch_scope=bool(self.batch_scope),
            coverage=bool(self.coverage),
        )


def _box(arguments: str, box_arg: str) -> list[float] | None:
    try:
        box = json.loads(arguments).get(box_arg)
        values = [float(v) for v in box]
    except (ValueError, TypeError, AttributeError):
        return None
    ok = len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
    return values if ok and values[0] <= values[2] and values[1] <= values[3] else None


def tool_calls(
    rows: Sequence[Sequence[CallSpan | Mapping[str, Any]] | None],
    *,
    T: int | None = None,
    settings: TapoSettings | None = None,
    device: torch.device | str = "cpu",
) -> tuple[ToolCalls, Tensor]:
    """``ToolCalls`` of a batch's call records (``rows[b]``: the calls of row ``b``, ``None``
    for none) and the ``(num_tools,)`` similarity kind of each tool id.

    Spans are clipped to ``[0, T)`` (a completion truncated after the call was recorded);
    empty ones are dropped, as is a call that overlaps the previous call of its row.
    """
    settings = settings or TapoSettings()
    iou = set(settings.iou_tools)
    flat: list[tuple[int, CallSpan]] = []
    for b, row in enumerate(rows):
        last_end = 0
        for call in sorted((CallSpan.coerce(c) for c in row or ()), key=lambda c: c.start):
            start, end = max(call.start, 0), call.end if T is None else min(call.end, T)
            if end <= start or start < last_end:
                continue
            flat.append((b, dataclasses.replace(call, start=start, end=end)))
            last_end = end
    seqs = [b for b, _ in flat]
    spans = [c for _, c in flat]
    boxes = [_box(c.arguments, settings.box_arg) if c.name in iou else None for c in spans]
    valid = [
        bool(c.name) and (c.name not in iou or boxes[i] is not None) for i, c in enumerate(spans)
    ]
    names = sorted({c.name for i, c in enumerate(spans) if valid[i]})
    ids = {n: i for i, n in enumerate(names)}
    params = torch.zeros(len(spans), settings.param_dim, dtype=torch.float32)
    text_rows = [i for i, c in enumerate(spans) if valid[i] and c.name not in iou]
    if text_rows:
        texts = [spans[i].arguments for i in text_rows]
        params[text_rows] = encode_text(texts, dim=settings.param_dim)
    box_rows = [i for i in range(len(spans)) if valid[i] and boxes[i] is not None]
    if box_rows:
        params[box_rows] = encode_box([boxes[i] for i in box_rows], dim=settings.param_dim)
    calls = ToolCalls.from_lists(
        seqs,
        [c.start for c in spans],
        [c.end for c in spans],
        [ids[c.name] if valid[i] else -1 for i, c in enumerate(spans)],
        params,
        key=[c.key for c in spans],
        device=device,
    )
    kinds = [SIM_IOU if n in iou else SIM_COSINE for n in names] or [SIM_COSINE]
    return calls, torch.tensor(kinds, dtype=torch.int64, device=device)


def correct_advantages(
    advantages: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    rows: Sequence[Sequence[CallSpan | Mapping[str, Any]] | None],
    *,
    seq_advantages: Tensor | None = None,
    settings: TapoSettings | None = None,
) -> TapoResult:
    """``fused_correct`` on a batch of outcome advantages and its call records.

    Args:
        advantages: ``(B,)`` trajectory advantages or ``(B, T)`` token advantages (constant
            along each row's mask, as GRPO's).
        mask: ``(B, T)`` 1 on the tokens the loss trains on.
        group_ids: ``(B,)`` prompt group of each row.
        rows: the call records of each row (``CallSpan`` s or mappings with their fields).
        seq_advantages: ``(B,)`` trajectory advantages; by default ``advantages`` (1-D) or
            the token advantage at each row's first masked token (0 for an empty row).
        settings: ``TapoSettings``.

    Returns:
        ``TapoResult``; ``corrected`` is the ``(B, T)`` float32 advantages ``A_i * mask`` with
        the lift applied.
    """
    settings = settings or TapoSettings()
    B, T = mask.shape
    if len(rows) != B:
        raise ValueError(f"{len(rows)} rows of tool calls for a batch of {B}")
    m = (mask != 0).to(torch.float32)
    a = advantages.to(torch.float32)
    token_adv = (a[:, None] if a.dim() == 1 else a) * m
    if seq_advantages is None and a.dim() == 1:
        seq_advantages = a
    elif seq_advantages is None:  # the value at each row's first trained token (0 if none)
        first = m.argmax(1, keepdim=True)
        seq_advantages = token_adv.gather(1, first).squeeze(1)
    calls, kinds = tool_calls(rows, T=T, settings=settings, device=mask.device)
    return fused_correct(
        token_adv.contiguous(),
        seq_advantages.to(torch.float32).contiguous(),
        group_ids.to(device=mask.device, dtype=torch.int64),
        calls,
        kinds,
        **settings.correct_kwargs(),
    )


def lift_tensors(result: TapoResult, B: int) -> tuple[Tensor, Tensor]:
    """The lift of a batch as per-row tensors that survive reordering and splitting the
    batch by rows: ``(B, K, 2)`` int64 spans and ``(B, K)`` lifts (``K``: most calls in a row;
    padding is the empty span ``[0, 0)`` with lift 0). ``call_map_from_rows`` turns them back
    into the ``call_map`` / ``call_delta`` of ``policy_loss``."""
    calls = result.calls
    seq = calls.seq.cpu()
    counts = torch.bincount(seq, minlength=B) if len(calls) else torch.zeros(B, dtype=torch.int64)
    K = int(counts.max()) if B else 0
    spans = torch.zeros(B, K, 2, dtype=torch.int64)
    delta = torch.zeros(B, K, dtype=result.delta.dtype)
    slot = torch.zeros(B, dtype=torch.int64)
    for k, b in enumerate(seq.tolist()):
        j = int(slot[b])
        spans[b, j, 0], spans[b, j, 1] = int(calls.start[k]), int(calls.end[k])
        delta[b, j] = result.delta[k].cpu()
        slot[b] += 1
    device = result.delta.device
    return spans.to(device), delta.to(device)


def call_map_from_rows(spans: Tensor, delta: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """``(call_map (B, T) int32, call_delta (B*K,))`` from ``lift_tensors``' per-row tensors."""
    from ..reference import build_call_map

    B, K = delta.shape
    seq = torch.arange(B, device=spans.device).repeat_interleave(K)
    start = spans[..., 0].reshape(-1)
    end = spans[..., 1].reshape(-1).clamp(max=T)
    return build_call_map(seq, start, torch.maximum(end, start), B, T), delta.reshape(-1)
