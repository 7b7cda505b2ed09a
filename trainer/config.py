"""Trainer configuration: dataclasses, YAML loading, ``key=value`` overrides and validation.

A config file is a YAML mapping whose sections mirror the dataclasses below; every key is
optional (the defaults are the embedded tiny CPU run). A top-level ``base: other.yaml``
(relative to the file) takes that file as the starting point. Command-line overrides use dotted
keys and YAML values::

    python -m trainer.train --config trainer/configs/tiny_grpo_tapo.yaml \
        rl.steps=20 algo.loss=gspo tapo.enabled=false tools.enabled='[search, calculator]'

Unknown keys, wrong types and out-of-range values raise ``ConfigError`` with the dotted
name of the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tapo_kernels import knobs as _loss_knobs

# policy_loss knobs a config may override: every knob of tapo_kernels.knobs but kl_coef /
# kl_type (they live in AlgoConfig) and global_count (the trainer sets it)
LOSS_KNOBS = tuple(k for k in _loss_knobs.NAMES if k not in ("kl_coef", "kl_type", "global_count"))


RUN_MARKER = ".tapo-run"  # marks a directory as a run directory of this trainer


class ConfigError(ValueError):
    """A config file or override that does not describe a valid run."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key written twice in one mapping (PyYAML keeps
    the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"{key_node.start_mark.name}:{line}: duplicate key {key!r} "
                f"(first written on line {seen[key]})"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; syntax errors and duplicate keys raise ``ConfigError``."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc


@dataclass
class ModelConfig:
    """The policy. ``path`` = a local Hugging Face causal-LM checkpoint; ``None`` = tiny model."""

    path: str | None = None
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # tiny Qwen2-style model (random init) and in-process BPE tokenizer, used when path is None
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    # vision-language policy (Qwen2-VL): a tiny one from these sizes when path is None, or
    # set automatically for a vision-language checkpoint; images fit in max_pixels each
    vision: bool = False
    vision_layers: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 4
    max_pixels: int = 84 * 84


@dataclass
class TaskConfig:
    """The dataset: the bundled synthetic search task or JSONL / Parquet files."""

    # synthetic | jsonl (JSONL or Parquet files) | visual (needs model.vision)
    name: str = "synthetic"
    seed: int = 0
    # synthetic task
    num_entities: int = 96
    attributes: list[str] = field(default_factory=lambda: ["home city", "profession", "pet"])
    # question kinds and their shares (see tasks/synthetic.py): single | two_fact | two_hop
    kinds: dict[str, float] = field(
        default_factory=lambda: {"single": 0.2, "two_fact": 0.4, "two_hop": 0.4}
    )
    heldout_fraction: float = 0.25
    num_demos: int = 1024
    # sloppy demos: the bare-name query (synthetic) or the quarter-scene zoom (visual)
    sloppy_demo_fraction: float = 0.8
    demos_from: str = "worlds"  # train (training questions) | worlds (fresh small worlds)
    # jsonl task: .jsonl or .parquet files (by suffix) of rows {"question", "answer" (str or
    # list), optional "corpus" (list of docs)}, or in verl's RL layout {"prompt" (chat
    # messages: the last user message is the question), "reward_model": {"ground_truth"}}
    train_path: str | None = None
    eval_path: str | None = None
    # shared corpus: one document per line (txt), {"text"} lines (jsonl) or a text column (parquet)
    corpus_path: str | None = None
    demos_path: str | None = None  # lines {"question", "answer", "query"} for the warm-up
    # mixed-task batches: this share of each step's prompts comes from a second task
    mix_task: str = "arithmetic"  # arithmetic (single-turn, checkable with the calculator)
    mix_fraction: float = 0.0
    # visual task (tasks/visual.py): scenes, and the shares of its question kinds
    num_scenes: int = 256
    scene_kinds: dict[str, float] = field(default_factory=lambda: {"zoom": 0.7, "emblem": 0.3})


@dataclass
class ToolsConfig:
    """Which tools the agent may call and how they run."""

    enabled: list[str] = field(default_factory=lambda: ["search"])
    search_top_k: int = 1
    timeout_s: float = 5.0  # per call; a call past it becomes an error observation
    max_obs_tokens: int = 48
    # process: calls run in worker processes and a call past timeout_s is killed;
    # thread: daemon threads (no start-up cost; a hung call is abandoned, not stopped)
    isolation: str = "process"
    workers: int = 2  # tool worker processes per rank


@dataclass
class RolloutConfig:
    """Multi-turn sampling."""

    group_size: int = 8  # G rollouts per prompt
    max_turns: int = 3
    max_new_tokens_per_turn: int = 48
    max_total_tokens: int = 192  # prompt + policy + observation tokens of one trajectory
    temperature: float = 1.0
    batch_size: int = 64  # trajectories generated together
    recompute_logp: bool = False  # recompute old log-probs with the training model
    # hf = the trainer's own KV-cached sampling loop on a replica of the policy; vllm = an
    # in-process vllm.LLM (the [vllm] extra), its weights reloaded after every update
    engine: str = "hf"
    vllm_dtype: str | None = None  # the engine's dtype (default: model.dtype)
    vllm_kv_cache_mb: int = 256  # KV-cache memory of the vLLM engine
    # share of the GPU's memory vLLM may take for its weights and activations (it shares the
    # device with training); the KV cache is vllm_kv_cache_mb whatever this share
    vllm_gpu_memory_utilization: float = 0.3
    prompt_template: str = "Question: {question}\n"
    use_chat_template: bool = False  # real checkpoints: wrap the prompt with the chat template
    system_prompt: str = (
        'Answer the question. To search, write <tool_call>{"name": "search", "arguments": '
        '{"query": "..."}}</tool_call>; results come back in <obs></obs>. '
        "Give the final answer as <answer>...</answer>."
    )
    # the tool list as the chat template's `tools` argument (one JSON schema per tool):
    # auto = when use_chat_template is on and the template renders tools; on = always (an
    # error if the template ignores them); off = never (system_prompt describes the tools).
    # YAML 1.1 reads a bare on / off as true / false, which mean the same
    chat_template_tools: bool | str = "auto"
    # the system prompt when the tools go through the template: the call syntax the rollout
    # parses and the observation and answer tags, no tool list (the template writes it)
    tools_system_prompt: str = (
        'Answer the question. Call a tool by writing <tool_call>{"name": <tool name>, '
        '"arguments": <its arguments as a JSON object>}</tool_call>, one call per turn; '
        "results come back in <obs></obs>. Give the final answer as <answer>...</answer>."
    )


@dataclass
class AlgoConfig:
    """Policy loss, advantages and reward."""

    loss: str = "grpo"  # a PRESETS name: grpo | dapo | dr_grpo | gspo | gspo_seq | sapo
    loss_overrides: dict[str, Any] = field(default_factory=dict)  # policy_loss knobs
    kl_coef: float = 0.0  # > 0 keeps a frozen reference model
    kl_type: str = "k3"
    scale_by_std: bool = True  # False = Dr. GRPO advantages
    reward: str = "em"  # em | f1
    num_minibatches: int = 2  # optimizer steps per rollout batch
    micro_batch_size: int = 0  # trajectories per forward/backward (0 = whole mini-batch)
    # where the loss starts: hidden = tapo_kernels.policy_loss_from_hidden (the LM head's
    # full logits are never built); logits = policy_loss_from_logits on the model's logits;
    # logp = log_softmax + gather, then tapo_kernels.policy_loss
    loss_input: str = "hidden"
    # truncated importance sampling of the rollout engine's samples: the policy-gradient term
    # of each token is weighted by min(pi_old / pi_rollout, tis_cap), pi_old recomputed by
    # the trainer (needs rollout.recompute_logp); null = off
    tis_cap: float | None = None


@dataclass
class TapoConfig:
    """TAPO credit correction in the trainer (witnesses, ablations: trainer/credit.py)."""

    enabled: bool = True
    beta: float = 0.8
    theta: float = 0.7
    alpha_min: float = 0.3
    batch_scope: bool = False
    fused: bool = True  # lift inside policy_loss (call_map/call_delta) vs corrected advantages
    # what a call's parameter vector encodes: tool (each tool's declared witness; search:
    # the documents it retrieved) | arguments (hashed 3-grams of the argument text, every
    # tool) | neural (sentence embedding of the argument text; needs the [neural] extra)
    witness: str = "tool"
    # ablations and control (trainer/credit.py)
    coverage: bool = True  # false: confidence = s (no support factor)
    gate: bool = True  # false: no confidence gate (alpha_min = 0)
    random_lift: bool = False  # control: the same lifts on as many random failing calls


@dataclass
class AxpoConfig:
    """AXPO explorative resampling of all-wrong groups (trainer/axpo.py)."""

    enabled: bool = False
    budget: float = 0.25  # share of a group's rollouts whose prefixes are resampled (>= 1)
    k: int = 4  # continuations per prefix
    eps_low: float = 0.2  # PPO clip of the rows AXPO adds or rewrites
    eps_high: float = 0.28


@dataclass
class TarlConfig:
    """TARL turn-level judging (trainer/judges.py): the trajectory reward becomes
    ``success_weight * success - penalty * [any turn -1] + min(bonus_cap, bonus_cap / T * #(+1))``."""

    enabled: bool = False
    judge: str = "rule"  # rule (ground truth of the bundled tasks) | http (chat-completions)
    success_weight: float = 10.0
    penalty: float = 5.0
    bonus_cap: float = 5.0
    # judge=http: an OpenAI-compatible endpoint (the API key comes from TAPO_JUDGE_API_KEY)
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "judge"
    timeout_s: float = 30.0
    max_retries: int = 3
    max_concurrency: int = 8


@dataclass
class OptimConfig:
    """AdamW for the RL phase."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear learning-rate warm-up


@dataclass
class WarmupConfig:
    """Supervised warm-up on demonstrations before RL (0 steps = none)."""

    steps: int = 800
    lr: float = 2e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (decays the lr to 0 at the last step)


@dataclass
class RLConfig:
    """The RL phase."""

    steps: int = 60
    prompts_per_step: int = 8  # over all ranks; each prompt gets group_size rollouts


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy pass@1 and sampled pass@k."""

    num_questions: int = 0  # 0 = the whole held-out split
    k: int = 4  # samples per question for pass@k (0 = greedy pass@1 only)
    temperature: float = 1.0
    at_start: bool = True  # before the warm-up
    every: int = 20  # also every N RL steps (0 = only before and after RL)


@dataclass
class CheckpointConfig:
    every: int = 10  # RL steps between checkpoints (0 = only the final one)
    keep: int = 2
    # after the final checkpoint, also write the policy as a Hugging Face directory
    # (<run_dir>/hf_model: weights, config, tokenizer, image processor)
    export_hf: bool = False


@dataclass
class LoggingConfig:
    run_dir: str = "runs"
    name: str = "tiny_grpo_tapo"
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True
    # Weights & Biases (needs `pip install wandb`): a run named logging.name with the config,
    # files under <run_dir>/<name>/wandb; offline needs no network (`wandb sync` uploads later)
    wandb: bool = False
    wandb_project: str = "tapo"
    wandb_mode: str = "offline"  # online | offline | disabled


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    fsdp: str = "auto"  # auto (on when world size > 1) | on | off
    mixed_precision: str = "bf16"  # FSDP2 param dtype on GPU: bf16 | fp16 | off (never on CPU)
    threads_per_rank: int = 0  # torch intra-op threads (0 = cores / local ranks)


@dataclass
class DebugConfig:
    """Fault injection used by the tests."""

    nan_loss_steps: list[int] = field(default_factory=list)  # make the loss NaN at these RL steps
    kill_at_step: int = 0  # SIGKILL this process in the middle of this RL step (0 = never)
    # SIGKILL this process while it saves the checkpoint of this global step, after the
    # shards and state are written and before the checkpoint is renamed into place (0 = never)
    kill_in_save_step: int = 0
    malformed_call_rate: float = 0.0  # corrupt this fraction of sampled tool calls
    # send this fraction of valid sampled calls to a fault tool of tools.enabled instead
    # (failing: raises; slow: runs past tools.timeout_s), with the same query
    fault_tool_rate: float = 0.0


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    tapo: TapoConfig = field(default_factory=TapoConfig)
    axpo: AxpoConfig = field(default_factory=AxpoConfig)
    tarl: TarlConfig = field(default_factory=TarlConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.logging.run_dir) / self.logging.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Building a Config from mappings, with type checks and did-you-mean errors
# ---------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}"
        )
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (a config section), got {value!r}")
        return _build(tp, value, key + ".")
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in hints:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{name}'{hint}; valid keys: {names}")
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> nested mapping; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (``None`` = the embedded defaults), apply overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
        seen = {path.resolve()}
        while "base" in tree:  # `base: other.yaml` (relative to this file) supplies defaults
            base_path = (path.parent / str(tree.pop("base"))).resolve()
            if base_path in seen or not base_path.is_file():
                raise ConfigError(f"{path}: base config {str(base_path)!r} is missing or circular")
            seen.add(base_path)
            base_tree = read_yaml(base_path) or {}
            if not isinstance(base_tree, dict):
                raise ConfigError(f"{base_path}: the top level must be a mapping of sections")
            tree = _merge(base_tree, tree)
            path = base_path
    tree = _merge(tree, parse_overrides(overrides or []))
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping (e.g. ``Config.to_dict()`` output)."""
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float of the config (nested sections, lists, override values) is finite."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            _check_finite(
                value,
                f"{prefix}{f.name}." if dataclasses.is_dataclass(value) else f"{prefix}{f.name}",
            )
        return
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix}: must be a finite number, got {node}")
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{prefix}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_finite(value, f"{prefix}[{i}]")


def validate(cfg: Config) -> None:
    """Reject values that cannot describe a run, naming the key and the allowed range."""
    PRESETS = _loss_knobs.PRESETS

    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    def positive(key: str, value: float) -> None:
        check(value > 0, key, f"must be > 0, got {value}")

    def nonneg(key: str, value: float) -> None:
        check(value >= 0, key, f"must be >= 0, got {value}")

    def choice(key: str, value: str, allowed: list[str]) -> None:
        check(value in allowed, key, f"must be one of {allowed}, got {value!r}")

    _check_finite(cfg)  # no inf or NaN in any number, whatever its range below
    choice("device", cfg.device, ["auto", "cpu", "cuda"])
    m = cfg.model
    choice("model.dtype", m.dtype, ["float32", "bfloat16", "float16"])
    if m.path is None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        ):
            positive(f"model.{name}", getattr(m, name))
        check(
            m.hidden_size % m.num_heads == 0,
            "model.hidden_size",
            f"must be divisible by model.num_heads ({m.num_heads}), got {m.hidden_size}",
        )
        check(
            m.num_heads % m.num_kv_heads == 0,
            "model.num_kv_heads",
            f"must divide model.num_heads ({m.num_heads}), got {m.num_kv_heads}",
        )
        check(m.vocab_size >= 64, "model.vocab_size", f"must be >= 64, got {m.vocab_size}")
        if m.vision:
            for name in ("vision_layers", "vision_hidden_size", "vision_heads"):
                positive(f"model.{name}", getattr(m, name))
            check(
                m.vision_hidden_size % m.vision_heads == 0,
                "model.vision_hidden_size",
                f"must be divisible by model.vision_heads ({m.vision_heads})",
            )
    else:
        check(Path(m.path).exists(), "model.path", f"local checkpoint {m.path!r} does not exist")
    check(m.max_pixels >= 28 * 28, "model.max_pixels", f"must be >= 784, got {m.max_pixels}")

    t = cfg.task
    choice("task.name", t.name, ["synthetic", "jsonl", "visual"])
    if t.name == "visual":
        check(m.vision or m.path is not None, "task.name", "visual needs model.vision: true")
        check(t.num_scenes >= 8, "task.num_scenes", f"must be >= 8, got {t.num_scenes}")
        check(
            0 < t.heldout_fraction < 1,
            "task.heldout_fraction",
            f"must be in (0, 1), got {t.heldout_fraction}",
        )
        nonneg("task.num_demos", t.num_demos)
        check(
            0 <= t.sloppy_demo_fraction <= 1,
            "task.sloppy_demo_fraction",
            f"must be in [0, 1], got {t.sloppy_demo_fraction}",
        )
        for kind, weight in t.scene_kinds.items():
            choice(f"task.scene_kinds.{kind}", kind, ["zoom", "emblem"])
            check(
                isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
                f"task.scene_kinds.{kind}",
                f"must be a finite number >= 0, got {weight!r}",
            )
        check(
            sum(t.scene_kinds.values()) > 0,
            "task.scene_kinds",
            f"needs a positive weight, got {t.scene_kinds}",
        )
    elif t.name == "synthetic":
        check(t.num_entities >= 4, "task.num_entities", f"must be >= 4, got {t.num_entities}")
        check(len(t.attributes) >= 1, "task.attributes", "needs at least one attribute")
        from .tasks.synthetic import ATTRIBUTES

        for i, attr in enumerate(t.attributes):
            choice(f"task.attributes[{i}]", attr, sorted(ATTRIBUTES))
        check(
            0 < t.heldout_fraction < 1,
            "task.heldout_fraction",
            f"must be in (0, 1), got {t.heldout_fraction}",
        )
        nonneg("task.num_demos", t.num_demos)
        choice("task.demos_from", t.demos_from, ["train", "worlds"])
        check(
            0 <= t.sloppy_demo_fraction <= 1,
            "task.sloppy_demo_fraction",
            f"must be in [0, 1], got {t.sloppy_demo_fraction}",
        )
        from .tasks.synthetic import KINDS

        for kind, weight in t.kinds.items():
            choice(f"task.kinds.{kind}", kind, list(KINDS))
            check(
                isinstance(weight, (int, float))
                and not isinstance(weight, bool)
                and math.isfinite(weight)
                and weight >= 0,
                f"task.kinds.{kind}",
                f"must be a finite number >= 0, got {weight!r}",
            )
        check(sum(t.kinds.values()) > 0, "task.kinds", f"needs a positive weight, got {t.kinds}")
        check(
            t.kinds.get("two_fact", 0) == 0 or len(t.attributes) >= 2,
            "task.kinds.two_fact",
            "needs at least two task.attributes",
        )
    else:
        check(t.train_path is not None, "task.train_path", "is required when task.name=jsonl")
        for key in ("train_path", "eval_path", "corpus_path", "demos_path"):
            value = getattr(t, key)
            if value is not None:
                check(Path(value).is_file(), f"task.{key}", f"file {value!r} does not exist")
                check(
                    Path(value).suffix.lower() != ".parquet"
                    or importlib.util.find_spec("pyarrow") is not None,
                    f"task.{key}",
                    f"reading {value!r} needs pyarrow (pip install pyarrow)",
                )

    from .tools import AVAILABLE_TOOLS

    check(
        len(cfg.tools.enabled) == len(set(cfg.tools.enabled)),
        "tools.enabled",
        f"lists a tool twice: {cfg.tools.enabled}",
    )
    for i, name in enumerate(cfg.tools.enabled):
        choice(f"tools.enabled[{i}]", name, sorted(AVAILABLE_TOOLS))
        check(
            name not in ("zoom_in", "image_search") or t.name == "visual",
            f"tools.enabled[{i}]",
            f"{name} needs the visual task (task.name=visual)",
        )
    positive("tools.search_top_k", cfg.tools.search_top_k)
    positive("tools.timeout_s", cfg.tools.timeout_s)
    from .tools import ISOLATION

    choice("tools.isolation", cfg.tools.isolation, list(ISOLATION))
    positive("tools.workers", cfg.tools.workers)
    positive("tools.max_obs_tokens", cfg.tools.max_obs_tokens)

    r = cfg.rollout
    check(
        r.group_size >= 2,
        "rollout.group_size",
        f"must be >= 2 (group advantages need siblings), got {r.group_size}",
    )
    for name in ("max_turns", "max_new_tokens_per_turn", "max_total_tokens", "batch_size"):
        positive(f"rollout.{name}", getattr(r, name))
    positive("rollout.temperature", r.temperature)
    check(
        "{question}" in r.prompt_template,
        "rollout.prompt_template",
        "must contain the placeholder {question}",
    )
    check(
        r.chat_template_tools in ("auto", "on", "off", True, False),
        "rollout.chat_template_tools",
        f"must be auto, on (true) or off (false), got {r.chat_template_tools!r}",
    )
    check(
        r.chat_template_tools not in ("on", True) or r.use_chat_template,
        "rollout.chat_template_tools",
        "on needs rollout.use_chat_template: true",
    )
    if m.path is None:
        check(
            r.max_total_tokens <= m.max_position_embeddings,
            "rollout.max_total_tokens",
            f"exceeds model.max_position_embeddings ({m.max_position_embeddings})",
        )

    a = cfg.algo
    choice("algo.loss", a.loss, sorted(PRESETS))
    for knob in a.loss_overrides:
        choice(f"algo.loss_overrides.{knob}", knob, list(LOSS_KNOBS))
    try:  # the loss's own checks, now rather than at the first RL step
        _loss_knobs.resolve(
            a.loss, {**a.loss_overrides, "kl_coef": a.kl_coef, "kl_type": a.kl_type}
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"algo.loss_overrides / algo.kl_*: {exc}") from exc
    nonneg("algo.kl_coef", a.kl_coef)
    choice("algo.kl_type", a.kl_type, ["k1", "k2", "k3"])
    choice("algo.loss_input", a.loss_input, ["hidden", "logits", "logp"])
    choice("algo.reward", a.reward, ["em", "f1"])
    positive("algo.num_minibatches", a.num_minibatches)
    nonneg("algo.micro_batch_size", a.micro_batch_size)

    tp = cfg.tapo
    nonneg("tapo.beta", tp.beta)
    check(0 <= tp.theta <= 1, "tapo.theta", f"must be in [0, 1], got {tp.theta}")
    check(0 <= tp.alpha_min <= 1, "tapo.alpha_min", f"must be in [0, 1], got {tp.alpha_min}")
    from .tools import WITNESS_MODES

    choice("tapo.witness", tp.witness, list(WITNESS_MODES))

    ax = cfg.axpo
    check(0 < ax.budget <= 1, "axpo.budget", f"must be in (0, 1], got {ax.budget}")
    check(ax.k >= 2, "axpo.k", f"must be >= 2 (continuations are a group), got {ax.k}")
    try:
        _loss_knobs.resolve(a.loss, {"eps_low": ax.eps_low, "eps_high": ax.eps_high})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"axpo.eps_low / axpo.eps_high: {exc}") from exc
    tl = cfg.tarl
    choice("tarl.judge", tl.judge, ["rule", "http"])
    for name in ("success_weight", "penalty", "bonus_cap"):
        nonneg(f"tarl.{name}", getattr(tl, name))
    positive("tarl.timeout_s", tl.timeout_s)
    nonneg("tarl.max_retries", tl.max_retries)
    positive("tarl.max_concurrency", tl.max_concurrency)
    choice("task.mix_task", cfg.task.mix_task, ["arithmetic"])
    check(
        0 <= cfg.task.mix_fraction < 1,
        "task.mix_fraction",
        f"must be in [0, 1), got {cfg.task.mix_fraction}",
    )
    check(
        cfg.task.mix_fraction == 0 or "calculator" in cfg.tools.enabled,
        "task.mix_fraction",
        "the arithmetic task needs the calculator in tools.enabled",
    )
    # every row of a visual batch shows an image, so every rank runs the vision tower in every
    # micro-batch (FSDP2 gathers its blocks on all ranks together); text rows mixed in, or
    # AXPO's continuations and padding rows, would break that
    check(
        cfg.task.name != "visual" or cfg.task.mix_fraction == 0,
        "task.mix_fraction",
        "must be 0 with the visual task",
    )
    check(
        cfg.task.name != "visual" or not cfg.axpo.enabled,
        "axpo.enabled",
        "is not supported with the visual task",
    )
    r = cfg.rollout
    choice("rollout.engine", r.engine, ["hf", "vllm"])
    if r.vllm_dtype is not None:
        choice("rollout.vllm_dtype", r.vllm_dtype, ["float32", "bfloat16", "float16"])
    positive("rollout.vllm_kv_cache_mb", r.vllm_kv_cache_mb)
    util = r.vllm_gpu_memory_utilization
    check(
        0.0 < util <= 1.0, "rollout.vllm_gpu_memory_utilization", f"must be in (0, 1], got {util}"
    )
    check(
        r.engine != "vllm" or not (m.vision or cfg.task.name == "visual"),
        "rollout.engine",
        "vllm does not run vision-language policies here (use hf)",
    )
    if cfg.algo.tis_cap is not None:
        positive("algo.tis_cap", cfg.algo.tis_cap)
        check(
            r.recompute_logp,
            "algo.tis_cap",
            "needs rollout.recompute_logp: true (the weight is pi_old / pi_rollout, with pi_old "
            "recomputed by the trainer)",
        )

    positive("optim.lr", cfg.optim.lr)
    nonneg("optim.weight_decay", cfg.optim.weight_decay)
    nonneg("optim.grad_clip", cfg.optim.grad_clip)
    nonneg("optim.warmup_steps", cfg.optim.warmup_steps)
    for name in ("beta1", "beta2"):
        value = getattr(cfg.optim, name)
        check(0 <= value < 1, f"optim.{name}", f"must be in [0, 1), got {value}")

    nonneg("warmup.steps", cfg.warmup.steps)
    positive("warmup.lr", cfg.warmup.lr)
    positive("warmup.batch_size", cfg.warmup.batch_size)
    choice("warmup.schedule", cfg.warmup.schedule, ["constant", "cosine"])
    nonneg("rl.steps", cfg.rl.steps)
    positive("rl.prompts_per_step", cfg.rl.prompts_per_step)
    nonneg("eval.num_questions", cfg.eval.num_questions)
    nonneg("eval.k", cfg.eval.k)
    positive("eval.temperature", cfg.eval.temperature)
    nonneg("eval.every", cfg.eval.every)
    nonneg("checkpoint.every", cfg.checkpoint.every)
    positive("checkpoint.keep", cfg.checkpoint.keep)
    name = cfg.logging.name
    check(
        bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0"),
        "logging.name",
        f"must be a plain directory name (no path separators, not '.' or '..'), got {name!r}",
    )
    check(
        bool(cfg.logging.run_dir)
        and ".." not in Path(cfg.logging.run_dir).parts
        and "\0" not in cfg.logging.run_dir,
        "logging.run_dir",
        f"must be a directory path without '..', got {cfg.logging.run_dir!r}",
    )
    choice("logging.wandb_mode", cfg.logging.wandb_mode, ["online", "offline", "disabled"])
    if cfg.logging.wandb:
        check(bool(cfg.logging.wandb_project), "logging.wandb_project", "must not be empty")
        check(
            importlib.util.find_spec("wandb") is not None,
            "logging.wandb",
            "Weights & Biases logging needs the wandb package (pip install wandb), "
            "or set logging.wandb=false",
        )
    choice("dist.backend", cfg.dist.backend, ["auto", "nccl", "gloo"])
    choice("dist.fsdp", cfg.dist.fsdp, ["auto", "on", "off"])
    choice("dist.mixed_precision", cfg.dist.mixed_precision, ["bf16", "fp16", "off"])
    nonneg("dist.threads_per_rank", cfg.dist.threads_per_rank)
    check(
        0 <= cfg.debug.malformed_call_rate <= 1,
        "debug.malformed_call_rate",
        f"must be in [0, 1], got {cfg.debug.malformed_call_rate}",
    )
    check(
        0 <= cfg.debug.fault_tool_rate <= 1,
        "debug.fault_tool_rate",
        f"must be in [0, 1], got {cfg.debug.fault_tool_rate}",
    )
    check(
        cfg.debug.fault_tool_rate == 0 or bool({"failing", "slow"} & set(cfg.tools.enabled)),
        "debug.fault_tool_rate",
        "needs a fault tool (failing or slow) in tools.enabled",
    )
