"""TAPO GRPO with TRL: a tiny tool-using agent trained on the CPU, nothing downloaded.

The model is a randomly initialised 2-layer Llama over a character vocabulary. Each
completion is one tool call and an answer: the model writes the search query (sampled), the
call is wrapped in ``<tool_call>{"name": "search", "arguments": {"q": ...}}</tool_call>``,
the tool's result is appended (masked out of the loss, ``env_mask = 0``), then the model
writes the answer. The reward is 1 when the answer contains the result's first letter.

``TapoGRPOTrainer`` finds the call in each completion, lifts the credit of failing
completions whose query a successful sibling repeated, and computes the loss with
``tapo_kernels.policy_loss``. Run from the repository root::

    python examples/trl/train_tapo_grpo.py --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from tapo_kernels.integrations.trl import TapoGRPOConfig, TapoGRPOTrainer  # noqa: E402

ALPHABET = "abcdefgh"
DOCS = {"a": "apple", "b": "berry", "c": "cocoa"}  # the search tool's index
MISS = "dunno"  # every result has 5 letters, so the rows of a batch stay aligned


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character; the call tags are added tokens."""
    specials = ["<pad>", "<eos>", "<tool_call>", "</tool_call>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {s: i for i, s in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=specials[2:],
    )


def search(query: str) -> str:
    """The tool: the first indexed document whose key letter the query contains."""
    return next((doc for key, doc in DOCS.items() if key in query), MISS)


def make_rollout(tok: PreTrainedTokenizerFast, max_query: int = 4, max_answer: int = 3):
    """``rollout_func`` for ``GRPOTrainer``: query sampled, call wrapped, tool run, answer sampled."""
    allowed = torch.tensor(tok.convert_tokens_to_ids(list(ALPHABET)))
    head = tok('<tool_call>{"name": "search", "arguments": {"q": "', add_special_tokens=False)
    tail = tok('"}}</tool_call>', add_special_tokens=False)

    @torch.no_grad()
    def sample(model, ids: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, n)`` tokens sampled after ``ids`` ``(B, L)``, restricted to the alphabet."""
        out = ids.to(model.device)
        for _ in range(n):
            logits = model(out).logits[:, -1].float()
            probs = torch.softmax(logits[:, allowed.to(out.device)], dim=-1)
            pick = allowed.to(out.device)[torch.multinomial(probs, 1)]
            out = torch.cat([out, pick], dim=1)
        return out[:, ids.shape[1] :].cpu()

    def rollout(prompts, trainer):
        model = trainer.model
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        if len({len(p) for p in prompt_ids}) != 1:
            raise ValueError("the prompts of this example must have equal lengths")
        B = len(prompts)
        call_head = torch.tensor(head["input_ids"]).expand(B, -1)
        call_tail = torch.tensor(tail["input_ids"]).expand(B, -1)
        query = sample(model, torch.cat([torch.tensor(prompt_ids), call_head], 1), max_query)
        texts = tok.batch_decode(query)
        results = torch.tensor(
            [tok(f"<{search(t)}>", add_special_tokens=False)["input_ids"] for t in texts]
        )
        calls = torch.cat([call_head, query, call_tail], 1)
        answer = sample(model, torch.cat([torch.tensor(prompt_ids), calls, results], 1), max_answer)
        eos = torch.full((B, 1), tok.eos_token_id)
        completion = torch.cat([calls, results, answer, eos], 1)
        mask = [1] * calls.shape[1] + [0] * results.shape[1] + [1] * (answer.shape[1] + 1)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion.tolist(),
            "logprobs": None,
            "env_mask": [mask] * B,
        }

    return rollout


def reward(completions, **_) -> list[float]:
    """1 when the answer (after the tool result) contains the result's first letter."""
    out = []
    for text in completions:
        result, _, answer = text.partition(">")
        found = result.rsplit("<", 1)[-1]
        out.append(float(found not in ("", MISS) and found[0] in answer))
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-type", default="grpo")
    parser.add_argument("--output-dir", default=None)
    opts = parser.parse_args(argv)

    torch.manual_seed(0)
    tok = char_tokenizer()
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    args = TapoGRPOConfig(
        output_dir=opts.output_dir or tempfile.mkdtemp(prefix="tapo-trl-"),
        loss_type=opts.loss_type,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=64,
        learning_rate=1e-3,
        max_steps=opts.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        # TAPO: a failing call is lifted when a successful sibling made a similar one
        tapo_theta=0.7,
        tapo_alpha_min=0.1,
        tapo_beta=0.8,
    )
    trainer = TapoGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["fruit? ", "fetch! "] * 32}),
        processing_class=tok,
        rollout_func=make_rollout(tok),
    )
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    last = logged[-1] if logged else {}
    print(json.dumps({k: v for k, v in last.items() if k.startswith(("loss", "reward", "tapo/"))}))
    return last


if __name__ == "__main__":
    main()
