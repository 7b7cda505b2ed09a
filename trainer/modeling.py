"""The policy model and tokenizer: a local Hugging Face checkpoint, or a tiny model from a config.

Without ``model.path`` the trainer builds a small Qwen2-style causal LM with random weights
(seeded, so every rank builds the same one) and trains a byte-level BPE tokenizer on the
task's text in-process; nothing is downloaded. The tokenizer has single-token tags for tool
calls, observations and answers (``TAGS``), so call spans and stop conditions are exact.
The tokenizer is saved in the run directory and reloaded on resume, so a resumed run sees
the same vocabulary as the checkpoint it loads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig

PAD, EOS = "<pad>", "<eos>"


@dataclass(frozen=True)
class ChatTags:
    """The markup the agent writes and reads."""

    tool_open: str = "<tool_call>"
    tool_close: str = "</tool_call>"
    obs_open: str = "<obs>"
    obs_close: str = "</obs>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"

    def all(self) -> list[str]:
        return [
            self.tool_open,
            self.tool_close,
            self.obs_open,
            self.obs_close,
            self.answer_open,
            self.answer_close,
        ]


TAGS = ChatTags()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def format_call(name: str, arguments: dict, tags: ChatTags = TAGS) -> str:
    """The canonical text of a tool call (what demonstrations show the model)."""
    import json

    return f"{tags.tool_open}{json.dumps({'name': name, 'arguments': arguments})}{tags.tool_close}"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, tags: ChatTags = TAGS, extra_specials: Sequence[str] = ()
):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (about 0.1 s).

    Byte-level encoding makes ``decode(encode(s)) == s`` for every string, and the tags plus
    ``<pad>``/``<eos>`` are special tokens with ids 0..7 (``extra_specials``, e.g. the image
    tokens of a vision-language model, follow them). Every whitespace character is its
    own pre-token, so a word has the same tokens after a space, a quote or a tag: copying a
    name from the question into a JSON query, or an answer out of an observation, is then a
    token-for-token copy (GPT-2 style " word" vs "word" tokens would make it a lookup).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, *tags.all(), *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"\s|[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]+"), behavior="isolated"
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    fast.add_special_tokens({"additional_special_tokens": [*tags.all(), *extra_specials]})
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def text_config(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int) -> dict:
    """The tiny text model's Qwen2 config keys (shared by the vision-language model)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
    )


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, the global RNG state restored after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def tiny_model(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int, seed: int) -> nn.Module:
    """A random-init Qwen2-style causal LM; identical on every rank for the same seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**text_config(cfg, vocab_size, pad_id, eos_id), use_sliding_window=False)
    config._attn_implementation = cfg.attn_implementation
    return seeded(seed, lambda: Qwen2ForCausalLM(config)).to(DTYPES[cfg.dtype])


def load_pretrained(cfg: ModelConfig):
    """``(model, tokenizer)`` from a local checkpoint directory (no network access): a causal
    LM, or a vision-language model (a config with a ``vision_config``, e.g. Qwen2-VL)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    vision = getattr(config, "vision_config", None) is not None
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_pretrained(
        cfg.path,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        local_files_only=True,
    )
    return model, tokenizer


def build_policy(
    cfg: ModelConfig,
    tokenizer_dir: Path,
    texts: Callable[[], Iterable[str]],
    seed: int,
    is_main: bool,
    barrier: Callable[[], None],
):
    """``(model, tokenizer)``: the local checkpoint of ``cfg.path``, or a tiny model with a
    tokenizer trained on ``texts()`` by the main rank and saved to ``tokenizer_dir`` (reused
    when it exists, so a resumed run sees the same vocabulary). Collective: every rank calls
    it, ``barrier`` separates the main rank's write from every rank's read."""
    if cfg.path is not None:
        return load_pretrained(cfg)
    from .vision import IMAGE_TOKENS, image_processor, tiny_vl_model

    extra = IMAGE_TOKENS if cfg.vision else ()
    if is_main and not (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = train_tokenizer(texts(), cfg.vocab_size, extra_specials=extra)
        tokenizer.save_pretrained(tokenizer_dir)
        if cfg.vision:  # the directory is then a complete processor (tokenizer + images)
            image_processor(cfg.max_pixels).save_pretrained(tokenizer_dir)
    barrier()
    tokenizer = load_tokenizer(tokenizer_dir)
    if cfg.vision:
        ids = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id}
        ids.update(zip(IMAGE_TOKENS, tokenizer.convert_tokens_to_ids(IMAGE_TOKENS), strict=True))
        model = tiny_vl_model(cfg, len(tokenizer), ids, seed).to(DTYPES[cfg.dtype])
    else:
        model = tiny_model(
            cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed
        )
    return model, tokenizer


def tokenizer_texts(task, prompt_template: str) -> list[str]:
    """The text a tiny model's tokenizer is trained on: the task's questions, answers and
    documents, the prompts and the demonstrations' calls."""
    texts = list(task.texts())
    for ex in task.train + task.heldout + task.demos:
        texts.append(prompt_template.format(question=ex.question))
        texts.extend(format_call(name, arguments) for name, arguments in ex.demo_calls())
    return texts


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A gradient-free copy in eval mode (optionally cast): the KL reference or a rollout
    replica."""
    clone = copy.deepcopy(model)
    if dtype is not None:
        clone.to(dtype)
    clone.requires_grad_(False)
    clone.eval()
    return clone


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (the FSDP2 sharding units); for a
    vision-language model, its vision blocks followed by its text blocks."""
    from .vision import is_vision_model

    if is_vision_model(model):
        return [*model.model.visual.blocks, *model.model.language_model.layers]
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = model
        try:
            for attr in path.split("."):
                node = getattr(node, attr)
        except AttributeError:
            continue
        return list(node)
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


def hidden_loss_unsupported(model: nn.Module) -> str | None:
    """Why the LM head of ``model`` cannot be fused into the loss (``None`` when it can).

    The hidden-state loss computes ``hidden @ W.T + b`` itself, so it needs the decoder
    (``get_decoder()``) and a plain linear head; heads that rescale or soft-cap their logits
    (e.g. ``logit_scale``, ``final_logit_softcapping``) take the logits path instead.
    """
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"the model's config sets {attr}"
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if get_decoder is None or get_decoder() is None:
        return "the model has no get_decoder()"
    if not isinstance(head, nn.Linear):
        return "the model's output embedding is not an nn.Linear"
    return None


def attach_hidden_loss(model: nn.Module, loss_fn) -> None:
    """Give ``model`` a method ``hidden_loss(input_ids, attention_mask, **kw)``.

    It runs the decoder only (no logits) and returns
    ``loss_fn(hidden, weight, bias, input_ids=input_ids, **kw)`` with the LM head's weight
    and bias. ``vision``: a vision-language model's image inputs (``pixel_values``,
    ``image_grid_thw``, ``position_ids``); the whole multimodal body then runs. Under FSDP2 the method is registered as a forward
    method (``register_fsdp_forward_method``), so the root's parameters (embeddings, final
    norm, head) are all-gathered around it exactly as around ``forward``.
    """
    import types

    def hidden_loss(self, input_ids, attention_mask, vision=None, **kw):
        body = self.model if vision else self.get_decoder()
        hidden = body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **(vision or {})
        ).last_hidden_state
        head = self.get_output_embeddings()
        weight = head.weight if head.weight.dtype == hidden.dtype else head.weight.to(hidden.dtype)
        bias = head.bias
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
        return loss_fn(hidden, weight, bias, input_ids=input_ids, **kw)

    model.hidden_loss = types.MethodType(hidden_loss, model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
