"""Batched multi-turn rollouts with a KV-cached sampling loop.

Each turn, the active trajectories are left-padded into one batch, prefilled once and then
extended a token at a time from the KV cache until every row has written a stop tag
(``</tool_call>``, ``</answer>``), EOS, or reached its token budget. Tool calls are parsed
and executed (concurrently, with timeouts); their observations are appended as tokens with
mask 0, and the next turn starts. The sampler is our own loop rather than ``generate`` so
the recorded log-probability of each sampled token is exactly ``log_softmax(logits / T)``,
the quantity the loss recomputes (no hidden top-k / top-p processors).

Prompts: the embedded tiny policy reads ``rollout.prompt_template`` as plain text. A real
checkpoint (``rollout.use_chat_template``) gets a system message and the question through
its tokenizer's chat template. Where that template renders tools
(``rollout.chat_template_tools``), the tool list goes in as the template's ``tools``
argument, one function schema per tool (``Tool.schema``), and the system message is
``rollout.tools_system_prompt``: it lists no tool but keeps the call syntax the rollout
parses (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one call per turn) and
the observation and answer tags, since a template's own call format may differ from it.
Otherwise the system message is ``rollout.system_prompt`` (which names the tools itself).

Determinism: sampling draws from an explicit ``torch.Generator`` seeded by the caller, so a
rollout is a function of (weights, prompts, seed), which makes resumed runs reproducible.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, RolloutConfig
from ..modeling import EOS, TAGS, ChatTags
from ..tasks import Example
from ..tools import ParsedCall, ToolContext, ToolOutcome, ToolRegistry
from ..tools.registry import box_of_refs
from ..vision import ImageCodec, vision_batch
from .episode import CallRecord, Episode

# rollout.chat_template_tools values (YAML 1.1 reads a bare on / off as true / false)
CHAT_TEMPLATE_TOOLS = {"auto": "auto", "on": "on", "off": "off", True: "on", False: "off"}


def template_tools_problem(tokenizer, messages: list[dict], tools: Sequence[dict]) -> str | None:
    """Why the tokenizer's chat template does not show ``tools`` (function schemas) to the
    model, or ``None`` when it does.

    The test renders ``messages`` with and without ``tools``: the template supports them when
    the rendering with them names every tool more often than the one without. Searching the
    template's source for ``tools`` would also accept templates that name them only to
    reject them or in a comment, and miss the ``tool_use`` entry of tokenizers that hold
    several named templates (``apply_chat_template`` picks it when tools are given); a
    template that raises on ``tools`` does not support them either.
    """
    render = functools.partial(
        tokenizer.apply_chat_template, messages, add_generation_prompt=True, tokenize=False
    )
    try:
        plain = render()
    except Exception as exc:  # any template error is the answer
        return f"the chat template cannot render the prompt ({type(exc).__name__}: {exc})"
    try:
        with_tools = render(tools=list(tools))
    except Exception as exc:
        return f"the chat template fails on tools ({type(exc).__name__}: {exc})"
    names = [t["function"]["name"] for t in tools]
    missing = [n for n in names if with_tools.count(n) <= plain.count(n)]
    if missing:
        return f"the chat template does not render the tools {missing}"
    return None


@dataclass
class TurnOutput:
    tokens: list[int]
    logp: list[float]
    stop: str  # tool | answer | eos | budget


class PromptFormatter:
    """Turns a question into prompt token ids and observations into observation token ids.

    With a vision-language policy (``images``: an ``ImageCodec``), a question's images
    (``question_images(example)``: ``(image, region)`` pairs) open the prompt and an image a
    tool returns opens its observation, each as image tokens; the episode records them.

    ``tools``: the function schemas of the registry's tools (``ToolRegistry.schemas``), passed
    to the chat template as its ``tools`` argument as ``cfg.chat_template_tools`` decides
    (``template_tools``: the schemas when they are, else ``None``).
    """

    def __init__(
        self,
        tokenizer,
        cfg: RolloutConfig,
        tags: ChatTags = TAGS,
        max_obs_tokens: int = 48,
        images: ImageCodec | None = None,
        question_images: Callable[[Example], list] | None = None,
        tools: Sequence[dict] | None = None,
    ) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        self.tags = tags
        self.max_obs_tokens = max_obs_tokens
        self.images = images
        self.question_images = question_images
        self._obs_open = self.encode(tags.obs_open)
        self._obs_close = self.encode(tags.obs_close)
        self.template_tools = self._template_tools(list(tools or []))
        self.system_prompt = cfg.tools_system_prompt if self.template_tools else cfg.system_prompt

    def _template_tools(self, schemas: list[dict]) -> list[dict] | None:
        """The schemas to pass as the chat template's ``tools``, or ``None`` (the tools are
        then described by ``cfg.system_prompt`` alone); an error where
        ``chat_template_tools`` is ``on`` and the template cannot show them."""
        key = "rollout.chat_template_tools"
        mode = CHAT_TEMPLATE_TOOLS.get(self.cfg.chat_template_tools)
        if mode is None:
            raise ConfigError(
                f"{key}: must be auto, on (true) or off (false), "
                f"got {self.cfg.chat_template_tools!r}"
            )
        if mode == "on" and not self.cfg.use_chat_template:
            raise ConfigError(f"{key}: on needs rollout.use_chat_template: true")
        if mode == "off" or not self.cfg.use_chat_template:
            return None
        problem = "there is no tool to describe" if not schemas else None
        if problem is None:
            messages = [
                {"role": "system", "content": self.cfg.tools_system_prompt},
                {"role": "user", "content": self.cfg.prompt_template.format(question="?")},
            ]
            problem = template_tools_problem(self.tok, messages, schemas)
        if problem is None:
            return schemas
        if mode == "on":
            raise ConfigError(f"{key}: on, but {problem}")
        return None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def prompt_ids(self, example: Example, num_images: int = 0) -> list[int]:
        """The prompt's token ids; through the chat template, ``num_images`` image entries
        open the user message (the template writes one placeholder per image)."""
        text = self.cfg.prompt_template.format(question=example.question)
        if self.cfg.use_chat_template:
            content: str | list = text
            if num_images:
                content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
            messages = [
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": content},
            ]
            return list(
                self.tok.apply_chat_template(
                    messages,
                    tools=self.template_tools,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            )
        return self.encode(text)

    def _with_images(self, example: Example, images: list) -> list[int]:
        """The prompt with the question's images: where the chat template placed one
        placeholder per image, each becomes the image's pad tokens; otherwise (no chat
        template, or one that ignores images) the image blocks precede the prompt."""
        codec = self.images
        if self.cfg.use_chat_template:
            ids = self.prompt_ids(example, len(images))
            runs = [
                i for i, t in enumerate(ids) if t == codec.pad_id and (i == 0 or ids[i - 1] != t)
            ]
            if len(runs) == len(images):
                out, last = [], 0
                for start, img in zip(runs, images, strict=True):
                    end = start
                    while end < len(ids) and ids[end] == codec.pad_id:
                        end += 1
                    out += ids[last:start] + [codec.pad_id] * img.num_tokens
                    last = end
                return out + ids[last:]
        return [t for img in images for t in codec.token_ids(img)] + self.prompt_ids(example)

    def observation_ids(
        self, text: str, budget: int | None = None, image_ids: Sequence[int] = ()
    ) -> list[int]:
        """``<obs>`` + the image tokens (if any) + the text (truncated to ``max_obs_tokens``)
        + ``</obs>``."""
        limit = self.max_obs_tokens
        if budget is not None:
            limit = min(limit, budget - len(self._obs_open) - len(self._obs_close) - len(image_ids))
        body = self.encode(text)[: max(0, limit)]
        return self._obs_open + list(image_ids) + body + self._obs_close

    def start_episode(self, example: Example, group: int = 0) -> Episode:
        """A new episode holding the prompt (after the question's images, if any)."""
        images, views = [], []
        if example.images and (self.images is None or self.question_images is None):
            raise ValueError(
                f"question {example.uid!r} shows an image: it needs a vision-language policy"
            )
        if example.images:
            for image, region in self.question_images(example):
                images.append(self.images.encode(image))
                views.append(tuple(region))
            ids = self._with_images(example, images)
        else:
            ids = self.prompt_ids(example)
        ep = Episode(example, int(group), len(ids), ids, [0] * len(ids), [0.0] * len(ids))
        ep.images, ep.views = images, views
        return ep

    def add_observation(self, ep: Episode, outcome: ToolOutcome, budget: int | None = None) -> bool:
        """Append a call's observation (its image, then its text) to ``ep`` with mask 0;
        ``False`` (nothing appended) when it does not fit in ``budget`` tokens."""
        img = None
        if outcome.image is not None and self.images is not None:
            img = self.images.encode(outcome.image)
        image_ids = self.images.token_ids(img) if img is not None else []
        obs = self.observation_ids(outcome.observation, budget, image_ids)
        if budget is not None and len(obs) > budget:
            return False
        ep.append(obs, policy=False)
        if img is not None:
            ep.images.append(img)
            ep.views.append(box_of_refs(outcome.refs) if outcome.refs else (0.0, 0.0, 1.0, 1.0))
        return True

    def context(self, ep: Episode) -> ToolContext:
        """What the episode's tool calls may depend on: its corpus and its images."""
        return ToolContext(ep.example.corpus_id, tuple(ep.views))

    def call_record(
        self, ep: Episode, start: int, end: int, parsed, outcome, registry
    ) -> CallRecord:
        """The record of one executed call of ``ep`` (tokens ``[start, end)``) with its ground
        truth: a region call is good when it covers the question's gold region (IoU >= 0.5),
        another call when its observation holds gold evidence."""
        ok = parsed.valid and outcome.ok
        tool = registry.tools[parsed.tool_id] if parsed.valid else None
        box = box_of_refs(outcome.refs) if ok and tool.sim_kind == "iou" else None
        if ok:
            good = ep.example.is_good_call(outcome.observation, box)
        else:
            good = False if (ep.example.evidence or ep.example.gold_box) else None
        return CallRecord(
            start=start,
            end=end,
            tool_id=parsed.tool_id if ok else -1,
            key=ep.example.corpus_id,
            name=parsed.name,
            arguments=parsed.arguments,
            param_text=tool.param_text(parsed.arguments) if tool is not None else "",
            valid=ok,
            error=parsed.error if not parsed.valid else outcome.error,
            observation=outcome.observation,
            refs=outcome.refs,
            good=good,
        )


def find_call(fmt: PromptFormatter, tokens: Sequence[int]) -> tuple[int, int, str, bool] | None:
    """Token span ``[i0, i1)`` of the first tool call in a turn, its JSON body and whether it closed.

    Works for tags of any tokenisation: token ``i`` covers characters ``[ends[i-1], ends[i])``
    of the decoded turn; the span is the smallest run of tokens covering the tag-to-tag text.
    """
    open_ids, close_ids = fmt.encode(fmt.tags.tool_open), fmt.encode(fmt.tags.tool_close)
    if len(open_ids) == 1 and len(close_ids) == 1:  # single-token tags: find them by id
        if open_ids[0] not in tokens:
            return None
        i0 = list(tokens).index(open_ids[0])
        rest = list(tokens[i0 + 1 :])
        closed = close_ids[0] in rest
        i1 = i0 + 1 + (rest.index(close_ids[0]) + 1 if closed else len(rest))
        body = fmt.decode(tokens[i0 + 1 : i1 - 1 if closed else i1])
        return i0, i1, body, closed
    text = fmt.decode(tokens)
    c0 = text.find(fmt.tags.tool_open)
    if c0 < 0:
        return None
    c_body = c0 + len(fmt.tags.tool_open)
    c1 = text.find(fmt.tags.tool_close, c_body)
    closed = c1 >= 0
    c_end = c1 + len(fmt.tags.tool_close) if closed else len(text)
    ends = [len(fmt.decode(tokens[: i + 1])) for i in range(len(tokens))]
    i0 = next(i for i, e in enumerate(ends) if e > c0)
    i1 = next((i + 1 for i, e in enumerate(ends) if e >= c_end), len(tokens))
    return i0, i1, text[c_body : c1 if closed else len(text)], closed


def extract_answer(fmt: PromptFormatter, text: str) -> str | None:
    """The text between the last ``<answer>`` and the following ``</answer>`` (None if absent)."""
    start = text.rfind(fmt.tags.answer_open)
    if start < 0:
        return None
    start += len(fmt.tags.answer_open)
    end = text.find(fmt.tags.answer_close, start)
    return text[start:end].strip() if end >= 0 else None


class RolloutEngine:
    """Generates episodes for a list of questions with one policy model (no gradients)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        registry: ToolRegistry,
        cfg: RolloutConfig,
        *,
        max_obs_tokens: int = 48,
        tags: ChatTags = TAGS,
        malformed_call_rate: float = 0.0,
        fault_tool_rate: float = 0.0,
        images: ImageCodec | None = None,
        question_images: Callable[[Example], list] | None = None,
    ) -> None:
        self.model = model
        self.registry = registry
        self.cfg = cfg
        self.fmt = PromptFormatter(
            tokenizer,
            cfg,
            tags,
            max_obs_tokens,
            images=images,
            question_images=question_images,
            tools=registry.schemas(),
        )
        # image tokens are placed by the formatter, never sampled
        self.banned = [images.start_id, images.pad_id, images.end_id] if images else []
        self.pad_id = tokenizer.pad_token_id
        self.malformed_call_rate = malformed_call_rate
        self.fault_tool_rate = fault_tool_rate
        self.fault_tools = [name for name in ("failing", "slow") if name in registry.by_name]
        eos_ids = {tokenizer.eos_token_id}
        if tokenizer.convert_tokens_to_ids(EOS) not in (None, tokenizer.unk_token_id):
            eos_ids.add(tokenizer.convert_tokens_to_ids(EOS))
        self.eos_ids = {i for i in eos_ids if i is not None}
        # stop tags that are single tokens are checked by id; others by decoding the tail
        self.stop_ids: dict[int, str] = {i: "eos" for i in self.eos_ids}
        self.text_stops: dict[str, str] = {}
        for tag, reason in ((tags.tool_close, "tool"), (tags.answer_close, "answer")):
            ids = self.fmt.encode(tag)
            if len(ids) == 1:
                self.stop_ids[ids[0]] = reason
            else:
                self.text_stops[tag] = reason

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        tokenizer,
        registry: ToolRegistry,
        cfg,
        images: ImageCodec | None = None,
        question_images: Callable[[Example], list] | None = None,
    ) -> RolloutEngine:
        """The engine of a run's ``Config``; the model's generation-config EOS ids (e.g.
        ``<|im_end|>`` of chat models) also stop a turn."""
        engine = cls(
            model,
            tokenizer,
            registry,
            cfg.rollout,
            max_obs_tokens=cfg.tools.max_obs_tokens,
            malformed_call_rate=cfg.debug.malformed_call_rate,
            fault_tool_rate=cfg.debug.fault_tool_rate,
            images=images,
            question_images=question_images,
        )
        engine.stop_at_generation_eos(model)
        return engine

    def stop_at_generation_eos(self, model) -> None:
        """Also end a turn at the EOS ids of ``model``'s generation config (e.g. the
        ``<|im_end|>`` of chat models)."""
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for eos in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
            self.stop_ids.setdefault(int(eos), "eos")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def rollout(
        self,
        examples: Sequence[Example],
        group_ids: Sequence[int],
        *,
        seed: int,
        temperature: float | None = None,
        greedy: bool = False,
    ) -> list[Episode]:
        """One episode per example (repeat an example G times for a group)."""
        episodes = [
            self.fmt.start_episode(ex, g) for ex, g in zip(examples, group_ids, strict=True)
        ]
        return self.continue_episodes(episodes, seed=seed, temperature=temperature, greedy=greedy)

    @torch.no_grad()
    def continue_episodes(
        self,
        episodes: list[Episode],
        *,
        seed: int,
        temperature: float | None = None,
        greedy: bool = False,
    ) -> list[Episode]:
        """Generate until every episode is done, in place; an episode may end inside an
        assistant turn (``Episode.open_turn`` tokens of it), which is then continued."""
        temperature = self.cfg.temperature if temperature is None else temperature
        generator = torch.Generator(device=self.device).manual_seed(seed)
        fault_rng = random.Random(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(episodes), self.cfg.batch_size):
                self._run(
                    episodes[i : i + self.cfg.batch_size], generator, temperature, greedy, fault_rng
                )
        finally:
            self.model.train(was_training)
        return episodes

    # ------------------------------------------------------------------ internals

    def _run(
        self,
        episodes: list[Episode],
        generator: torch.Generator,
        temperature: float,
        greedy: bool,
        fault_rng: random.Random,
    ) -> None:
        cfg = self.cfg
        for ep in episodes:
            if len(ep.token_ids) >= cfg.max_total_tokens:
                ep.finish = "max_tokens"
        for _ in range(cfg.max_turns):
            active = [ep for ep in episodes if not ep.done]
            if not active:
                break
            budgets = [
                min(cfg.max_new_tokens_per_turn, cfg.max_total_tokens - len(ep.token_ids))
                for ep in active
            ]
            outputs = self._generate_turn(active, budgets, generator, temperature, greedy)
            pending: list[tuple[Episode, int, int, ParsedCall]] = []
            for ep, out in zip(active, outputs, strict=True):
                # the turn starts before the new tokens when an open turn is continued
                start = len(ep.token_ids) - ep.open_turn
                ep.open_turn = 0
                ep.append(out.tokens, policy=True, logp=out.logp)
                turn = ep.token_ids[start:]
                ep.turns += 1
                ep.turn_spans.append((start, len(ep.token_ids)))
                text = self.fmt.decode(turn)
                # an EOS inside an unclosed call is not part of the call
                body_tokens = turn[:-1] if out.stop == "eos" else turn
                span = find_call(self.fmt, body_tokens) if out.stop != "answer" else None
                if span is None and out.stop == "tool":  # a closing tag without an opening one
                    span = (0, len(turn), text, True)
                    parsed = ParsedCall(
                        raw=text,
                        error=f"the tool call has no opening {self.fmt.tags.tool_open} tag",
                    )
                    pending.append((ep, start, start + len(turn), parsed))
                elif span is not None:
                    i0, i1, body, closed = span
                    parsed = self.registry.parse(body, closed=closed)
                    if (
                        parsed.valid
                        and self.malformed_call_rate > 0
                        and fault_rng.random() < self.malformed_call_rate
                    ):
                        parsed = ParsedCall(
                            raw=body, error="malformed call injected by debug.malformed_call_rate"
                        )
                    elif (
                        parsed.valid
                        and self.fault_tools
                        and fault_rng.random() < self.fault_tool_rate
                    ):
                        name = fault_rng.choice(self.fault_tools)
                        text = self.registry.tools[parsed.tool_id].param_text(parsed.arguments)
                        parsed = ParsedCall(
                            raw=body,
                            tool_id=self.registry.by_name[name][0],
                            name=name,
                            arguments={"query": text or "x"},
                        )
                    pending.append((ep, start + i0, start + i1, parsed))
                if out.stop == "answer":
                    ep.answer = extract_answer(self.fmt, text)
                    ep.finish = "answer"
                elif out.stop == "eos":
                    ep.answer = extract_answer(self.fmt, text)
                    ep.finish = "eos"
                elif span is None:  # out of budget with neither a call nor an answer
                    ep.finish = (
                        "max_tokens" if len(ep.token_ids) >= cfg.max_total_tokens else "truncated"
                    )
            outcomes = self.registry.execute(
                [(parsed, self.fmt.context(ep)) for ep, _, _, parsed in pending]
            )
            for (ep, s, e, parsed), outcome in zip(pending, outcomes, strict=True):
                ep.calls.append(self.fmt.call_record(ep, s, e, parsed, outcome, self.registry))
                if ep.done:
                    continue  # the episode ended in this turn (e.g. EOS inside an open call)
                budget = cfg.max_total_tokens - len(ep.token_ids)
                if not self.fmt.add_observation(ep, outcome, budget):
                    ep.finish = "max_tokens"
                    continue
                if len(ep.token_ids) >= cfg.max_total_tokens:
                    ep.finish = "max_tokens"
        for ep in episodes:
            if not ep.done:
                ep.finish = "max_turns"

    def _generate_turn(
        self,
        episodes: list[Episode],
        budgets: list[int],
        generator: torch.Generator,
        temperature: float,
        greedy: bool,
    ) -> list[TurnOutput]:
        from transformers import DynamicCache

        device = self.device
        contexts = [ep.token_ids for ep in episodes]
        B, L = len(contexts), max(len(c) for c in contexts)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.int64)
        attention = torch.zeros(B, L, dtype=torch.int64)
        for i, ctx in enumerate(contexts):  # left padding: every row ends at column L-1
            input_ids[i, L - len(ctx) :] = torch.tensor(ctx)
            attention[i, L - len(ctx) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        vision = None
        if self.fmt.images is not None:
            rows = [(ep.token_ids, ep.images) for ep in episodes]
            vision = vision_batch(rows, self.fmt.images.pad_id, L, left=True)
        if vision is not None:  # 3-D rotary positions; the text after them moves all three
            vision = vision.to(device)
            position_ids = vision.position_ids
            first = self._forward(
                input_ids, attention, position_ids, DynamicCache(), vision.rows(slice(0, B))
            )
        else:
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            first = self._forward(input_ids, attention, position_ids, DynamicCache())
        logits, cache = first
        next_pos = position_ids[..., -1:] + 1
        outputs = [TurnOutput([], [], "") for _ in range(B)]
        finished = [b <= 0 for b in budgets]
        for i, b in enumerate(budgets):
            if b <= 0:
                outputs[i].stop = "budget"
        for _step in range(max(budgets)):
            if all(finished):
                break
            if self.banned:
                logits[:, self.banned] = float("-inf")
            logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, V] fp32
            if greedy:
                token = logp_all.argmax(dim=-1)
            else:
                token = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(1)
            token_logp = logp_all.gather(1, token[:, None]).squeeze(1)
            token_list, logp_list = token.tolist(), token_logp.tolist()
            for i in range(B):
                if finished[i]:
                    continue
                o = outputs[i]
                o.tokens.append(token_list[i])
                o.logp.append(logp_list[i])
                reason = self.stop_ids.get(token_list[i])
                if reason is None and self.text_stops:
                    tail = self.fmt.decode(o.tokens[-8:])
                    reason = next((r for s, r in self.text_stops.items() if tail.endswith(s)), None)
                if reason is not None:
                    o.stop, finished[i] = reason, True
                elif len(o.tokens) >= budgets[i]:
                    o.stop, finished[i] = "budget", True
            if all(finished):
                break
            feed = torch.tensor(
                [self.pad_id if finished[i] else token_list[i] for i in range(B)], device=device
            )[:, None]
            attention = torch.cat(
                [attention, torch.ones(B, 1, dtype=attention.dtype, device=device)], dim=1
            )
            logits, cache = self._forward(feed, attention, next_pos, cache)
            next_pos = next_pos + 1
        return outputs

    def _forward(
        self,
        input_ids: Tensor,
        attention: Tensor,
        positions: Tensor,
        cache: Any,
        images: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Any]:
        """One forward after the tokens in the KV ``cache``: the next-token logits ``[B, V]``
        (only the last position goes through the LM head) and the cache. ``images``: the
        image inputs of a prefill (their positions are ``positions``)."""
        cached = {_cache_argument(self.model): cache, "use_cache": True, "logits_to_keep": 1}
        extra = {k: v for k, v in (images or {}).items() if k != "position_ids"}
        out = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, **cached, **extra
        )
        cache = getattr(out, "cache", None)
        return out.logits[:, -1], cache if cache is not None else out.past_key_values


@functools.lru_cache(maxsize=16)
def _cache_argument_of(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_argument(model: nn.Module) -> str:
    """The KV-cache keyword of ``model``'s forward: ``cache`` in recent transformers,
    ``past_key_values`` before (and in models written against that)."""
    return _cache_argument_of(type(model))


def token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """``(B, T)`` fp32 log-prob of each token given its prefix (column 0 is 0).

    Right-padded input. This is the training-side computation the rollout's recorded
    log-probs must equal.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    picked = logp.gather(2, input_ids[:, 1:, None]).squeeze(2)
    return torch.nn.functional.pad(picked, (1, 0))
