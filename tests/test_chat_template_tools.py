"""Tool schemas and their path through a tokenizer's chat template (rollout.chat_template_tools)."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from trainer.config import Config, ConfigError, RolloutConfig, _build, parse_overrides, validate
from trainer.rollout import PromptFormatter, RolloutEngine
from trainer.rollout.engine import CHAT_TEMPLATE_TOOLS, template_tools_problem
from trainer.tasks import Example
from trainer.tools import AVAILABLE_TOOLS, ToolRegistry, build_registry
from trainer.tools.calculator import CalculatorTool
from trainer.tools.faults import FailingTool, SlowTool
from trainer.tools.text_search import TextSearchTool
from trainer.tools.vision import ImageSearchTool, ZoomInTool

DOCS = ["The home city of Zorvex Quill is Marlow.", "The pet of Zorvex Quill is heron."]
QUESTION = "What is the home city of Zorvex Quill?"

# Qwen2.5-style: with tools, the system message is followed by a <tools></tools> block
# holding one JSON schema per line
TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
QWEN_LIKE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] }}"
    "{{- " + json.dumps(TOOLS_HEADER) + " }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- " + json.dumps(TOOLS_FOOTER) + " + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages[1:] %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ChatML that ignores tools
PLAIN = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# names `tools` only to reject them: a search of the source for "tools" would accept it
REJECTS_TOOLS = (
    "{%- if tools %}{{ raise_exception('tools are not supported') }}{%- endif %}" + PLAIN
)


def chatml(system: str, user: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def byte_tokenizer(template) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every text round-trips) with ChatML's special tokens."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def registry():
    return build_registry(["search", "calculator"], {0: DOCS}, isolation="thread")


def formatter(template, registry, mode, use_chat_template=True) -> PromptFormatter:
    cfg = RolloutConfig(
        use_chat_template=use_chat_template, prompt_template="{question}", chat_template_tools=mode
    )
    return PromptFormatter(byte_tokenizer(template), cfg, tools=registry.schemas())


def prompt_text(fmt: PromptFormatter) -> str:
    return fmt.decode(fmt.prompt_ids(Example("q0", QUESTION, ("Marlow",))))


# ----------------------------------------------------------------------------- schemas


def all_tools() -> list:
    return [
        TextSearchTool({0: DOCS}, top_k=2),
        CalculatorTool(),
        ZoomInTool(None),  # the scene book is only read when a call runs
        ImageSearchTool(None),
        FailingTool(),
        SlowTool(),
    ]


def example_value(prop: dict):
    """A value of a schema property's type (within its bounds)."""
    kind = prop["type"]
    if kind == "string":
        return "Zorvex Quill"
    if kind == "integer":
        return prop.get("minimum", 0)
    if kind == "array":
        return [0.1 * (i + 1) for i in range(prop.get("minItems", 1))]
    raise AssertionError(f"no example value for {prop}")


def test_every_available_tool_has_a_schema():
    assert sorted(t.name for t in all_tools()) == sorted(AVAILABLE_TOOLS)
    for tool in all_tools():
        schema = tool.schema()
        assert schema["type"] == "function"
        fn = schema["function"]
        assert fn["name"] == tool.name and fn["description"] == tool.description
        assert fn["parameters"]["type"] == "object"
        assert set(fn["parameters"]["required"]) <= set(fn["parameters"]["properties"])
        json.dumps(schema)  # a chat template serialises it


@pytest.mark.parametrize("tool", all_tools(), ids=lambda t: t.name)
def test_schema_arguments_are_what_the_parser_accepts(tool):
    reg = ToolRegistry([tool], isolation="thread")
    params = tool.schema()["function"]["parameters"]
    props, required = params["properties"], params["required"]
    base = {name: example_value(props[name]) for name in required}

    def parse(arguments):
        return reg.parse(json.dumps({"name": tool.name, "arguments": arguments}))

    for name, prop in props.items():  # each parameter, with the required ones
        call = parse({**base, name: example_value(prop)})
        assert call.valid, (name, call.error)
        wrong = 3 if prop["type"] == "string" else "three"  # a value of another JSON type
        assert not parse({**base, name: wrong}).valid, name
    for name in required:  # each required parameter is required
        call = parse({k: v for k, v in base.items() if k != name})
        assert not call.valid and name in call.error
    call = parse({**base, "not_a_parameter": "x"})  # nothing beyond the schema's names
    assert not call.valid and "not_a_parameter" in call.error


def test_search_schema_bounds_are_the_parser_bounds():
    tool = TextSearchTool({0: DOCS}, top_k=2, max_top_k=4)
    reg = ToolRegistry([tool], isolation="thread")
    top_k = tool.schema()["function"]["parameters"]["properties"]["top_k"]
    assert (top_k["minimum"], top_k["maximum"], top_k["default"]) == (1, 4, 2)

    def valid(k):
        return reg.parse(json.dumps({"name": "search", "arguments": {"query": "x", "top_k": k}}))

    assert valid(1).valid and valid(4).valid
    assert not valid(0).valid and not valid(5).valid


# ----------------------------------------------------------------------------- prompts


def expected_with_tools(registry) -> str:
    system = RolloutConfig().tools_system_prompt + TOOLS_HEADER
    for schema in registry.schemas():
        system += "\n" + json.dumps(schema, ensure_ascii=False)
    return chatml(system + TOOLS_FOOTER, QUESTION)


@pytest.mark.parametrize("mode", ["auto", "on", True])
def test_tools_go_through_a_template_that_renders_them(registry, mode):
    fmt = formatter(QWEN_LIKE, registry, mode)
    assert fmt.template_tools == registry.schemas()
    text = prompt_text(fmt)
    assert text == expected_with_tools(registry)
    for tool, schema in zip(registry.tools, registry.schemas(), strict=True):
        assert text.count(json.dumps(schema, ensure_ascii=False)) == 1
        assert text.count(tool.description) == 1  # not repeated in the prompt text
    # the system message lists no tool, but keeps the call syntax and the tags
    assert fmt.system_prompt == RolloutConfig().tools_system_prompt
    assert RolloutConfig().system_prompt not in text
    assert '<tool_call>{"name": <tool name>, "arguments":' in text
    assert "<obs></obs>" in text and "<answer>...</answer>" in text


@pytest.mark.parametrize("mode", ["off", False])
def test_off_keeps_the_system_prompt_and_passes_no_tools(registry, mode):
    fmt = formatter(QWEN_LIKE, registry, mode)
    text = prompt_text(fmt)
    assert fmt.template_tools is None
    assert text == chatml(RolloutConfig().system_prompt, QUESTION)
    for tool in registry.tools:
        assert tool.description not in text and f'"name": "{tool.name}", "description"' not in text


@pytest.mark.parametrize("template", [PLAIN, REJECTS_TOOLS], ids=["ignores", "rejects"])
def test_auto_falls_back_where_the_template_does_not_render_tools(registry, template):
    fmt = formatter(template, registry, "auto")
    assert fmt.template_tools is None
    assert prompt_text(fmt) == chatml(RolloutConfig().system_prompt, QUESTION)


@pytest.mark.parametrize(
    "template, reason",
    [(PLAIN, "does not render the tools"), (REJECTS_TOOLS, "tools are not supported")],
    ids=["ignores", "rejects"],
)
def test_on_is_an_error_where_the_template_does_not_render_tools(registry, template, reason):
    with pytest.raises(ConfigError, match="rollout.chat_template_tools") as info:
        formatter(template, registry, "on")
    assert reason in str(info.value)


def test_template_tools_need_the_chat_template(registry):
    fmt = formatter(QWEN_LIKE, registry, "auto", use_chat_template=False)
    assert fmt.template_tools is None  # the embedded default: the plain prompt template
    assert prompt_text(fmt) == QUESTION
    with pytest.raises(ConfigError, match="use_chat_template"):
        formatter(QWEN_LIKE, registry, "on", use_chat_template=False)


def test_a_named_tool_use_template_is_detected(registry):
    fmt = formatter({"default": PLAIN, "tool_use": QWEN_LIKE}, registry, "auto")
    assert fmt.template_tools == registry.schemas()
    assert prompt_text(fmt) == expected_with_tools(registry)


def test_detection_compares_renderings_with_and_without_tools(registry):
    messages = [{"role": "system", "content": "search"}, {"role": "user", "content": "?"}]
    schemas = registry.schemas()
    assert template_tools_problem(byte_tokenizer(QWEN_LIKE), messages, schemas) is None
    # a template showing only the first tool leaves the second one out
    first_only = QWEN_LIKE.replace("{%- for tool in tools %}", "{%- for tool in tools[:1] %}")
    problem = template_tools_problem(byte_tokenizer(first_only), messages, schemas)
    assert problem is not None and "calculator" in problem and "'search'" not in problem


def test_the_engine_passes_its_registry_schemas(registry):
    tok = byte_tokenizer(QWEN_LIKE)
    cfg = RolloutConfig(use_chat_template=True, prompt_template="{question}")
    engine = RolloutEngine(nn.Linear(1, 1), tok, registry, cfg)
    assert cfg.chat_template_tools == "auto"
    assert engine.fmt.template_tools == registry.schemas()
    assert prompt_text(engine.fmt) == expected_with_tools(registry)


@pytest.mark.parametrize(
    "override, mode", [("on", "on"), ("off", "off"), ("true", "on"), ("auto", "auto")]
)
def test_config_values(override, mode):
    overrides = [f"rollout.chat_template_tools={override}", "rollout.use_chat_template=true"]
    cfg = _build(Config, parse_overrides(overrides))
    validate(cfg)
    assert CHAT_TEMPLATE_TOOLS[cfg.rollout.chat_template_tools] == mode


def test_config_errors():
    cfg = _build(Config, parse_overrides(["rollout.chat_template_tools=maybe"]))
    with pytest.raises(ConfigError, match="rollout.chat_template_tools"):
        validate(cfg)
    cfg = _build(Config, parse_overrides(["rollout.chat_template_tools=on"]))
    with pytest.raises(ConfigError, match="use_chat_template"):
        validate(cfg)
