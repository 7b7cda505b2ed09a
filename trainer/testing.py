"""Test doubles for the trainer (used by the tests; no test module imports another).

``ScriptedLM`` stands in for a policy in the rollout engine and the training loop: it writes
a fixed text per turn, so episodes, call spans and masks are known in advance.
"""

from types import SimpleNamespace

import torch
from torch import nn

from trainer.modeling import TAGS


class ScriptedLM(nn.Module):
    """A stand-in policy that writes a fixed text per turn (turn = number of ``</obs>`` seen).

    It follows the engine's calling convention (left-padded prefill, then one token per step
    with a cache), keeps each row's context itself, and puts logit 30 on the scripted token,
    so sampling reproduces the script (the other tokens have probability ~V * e^-30).
    """

    def __init__(self, tokenizer, scripts: dict[str, list[str]]):
        super().__init__()
        self.tok = tokenizer
        self.scripts = {
            q: [tokenizer.encode(t, add_special_tokens=False) for t in turns]
            for q, turns in scripts.items()
        }
        self.obs_close = tokenizer.convert_tokens_to_ids(TAGS.obs_close)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.rows: list[list[int]] = []

    def next_token(self, ctx: list[int]) -> int:
        text = self.tok.decode(ctx, skip_special_tokens=False)
        question = text.split("Question: ", 1)[1].split("\n", 1)[0]
        turns = self.scripts[question]
        turn = ctx.count(self.obs_close)
        last = max([i for i, t in enumerate(ctx) if t == self.obs_close], default=-1)
        if turn == 0:
            last = len(self.tok.encode(f"Question: {question}\n", add_special_tokens=False)) - 1
        written = len(ctx) - last - 1
        script = turns[min(turn, len(turns) - 1)]
        return script[written] if written < len(script) else self.tok.eos_token_id

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=True,
        logits_to_keep=0,
    ):
        if input_ids.shape[1] > 1 or not self.rows:
            self.rows = [
                [t for t, m in zip(r.tolist(), a.tolist(), strict=False) if m]
                for r, a in zip(input_ids, attention_mask, strict=False)
            ]
        else:
            for row, t in zip(self.rows, input_ids[:, 0].tolist(), strict=False):
                row.append(t)
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tok))
        for i, row in enumerate(self.rows):
            logits[i, 0, self.next_token(row)] = 30.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


# Config overrides of the smallest run the trainer tests train: a 1-layer model on a tiny
# single-fact task (each test file adds its own steps, sizes and logging switches).
TINY_RUN_OVERRIDES = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.vocab_size=300",
    "model.max_position_embeddings=256",
    "task.num_entities=8",
    "task.attributes=[pet]",
    "task.kinds={single: 1}",
    "task.num_demos=8",
    "warmup.batch_size=4",
    "warmup.lr=3e-3",
    "rollout.group_size=4",
    "rollout.max_turns=2",
    "rl.prompts_per_step=2",
    "logging.progress=false",
]
