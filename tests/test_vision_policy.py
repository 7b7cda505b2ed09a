"""Vision-language policies: image tokens, 3-D rotary positions, the tiny Qwen2-VL and its
processor, rollouts whose recorded log-probs match the training forward, and TAPO's IoU
witnesses on zoom-in calls on every backend."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

import tapo_kernels
from trainer.config import ModelConfig, RolloutConfig
from trainer.modeling import TAGS, attach_hidden_loss, build_policy, tokenizer_texts
from trainer.rollout import RolloutEngine, collate, demonstration
from trainer.rollout.engine import PromptFormatter
from trainer.tasks.base import Example
from trainer.tools import ToolOutcome, build_registry
from trainer.vision import (
    FULL_VIEW,
    ImageCodec,
    ImageInput,
    load_image_processor,
    mrope_positions,
    scene_images,
)

PAD_IMG = 9  # an arbitrary id standing for <|image_pad|> in the position tests


def _image(h: int, w: int) -> ImageInput:
    """An image of ``h x w`` patches (merged 2 x 2 into tokens)."""
    return ImageInput(torch.zeros(h * w, 1176), (1, h, w))


def test_mrope_positions_by_hand():
    # text, text, a 2x2-token image (grid 4x4 patches), text, text
    ids = [5, 6, *[PAD_IMG] * 4, 7, 8]
    pos = mrope_positions(ids, PAD_IMG, [_image(4, 4)])
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 4, 5]  # time: the block's start
    assert pos[1].tolist() == [0, 1, 2, 2, 3, 3, 4, 5]  # height: rows of the block
    assert pos[2].tolist() == [0, 1, 2, 3, 2, 3, 4, 5]  # width: columns of the block
    # a 1x3-token image: the text after it starts at start + max(1, 1, 3)
    pos = mrope_positions([1, *[PAD_IMG] * 3, 2], PAD_IMG, [_image(2, 6)])
    assert pos.tolist() == [[0, 1, 1, 1, 4], [0, 1, 1, 1, 4], [0, 1, 2, 3, 4]]


def test_mrope_positions_reject_blocks_that_do_not_fit_the_images():
    with pytest.raises(ValueError, match="more image blocks"):
        mrope_positions([1, PAD_IMG, 2], PAD_IMG, [])
    with pytest.raises(ValueError, match="consecutive pad tokens"):
        mrope_positions([1, PAD_IMG, 2], PAD_IMG, [_image(4, 4)])
    with pytest.raises(ValueError, match="0 image blocks for 1 images"):
        mrope_positions([1, 2], PAD_IMG, [_image(2, 2)])


# ---------------------------------------------------------------- a tiny policy on the task


@pytest.fixture(scope="module")
def visual():
    from trainer.tasks.visual import visual_task

    return visual_task(num_scenes=16, heldout_fraction=0.25, num_demos=8, seed=0)


@pytest.fixture(scope="module")
def policy(visual, tmp_path_factory):
    cfg = ModelConfig(
        vision=True,
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        vision_layers=1,
        vision_hidden_size=32,
        vision_heads=2,
    )
    tok_dir = tmp_path_factory.mktemp("vl") / "tokenizer"
    texts = lambda: tokenizer_texts(visual, RolloutConfig().prompt_template)  # noqa: E731
    model, tokenizer = build_policy(cfg, tok_dir, texts, seed=0, is_main=True, barrier=lambda: None)
    codec = ImageCodec(load_image_processor(tok_dir, cfg.max_pixels), tokenizer)
    return model, tokenizer, codec, tok_dir


def _registry(visual):
    return build_registry(
        ["zoom_in", "image_search"], visual.corpora, scenes=visual.scenes, isolation="thread"
    )


def _engine(visual, policy, **rollout):
    model, tokenizer, codec, _ = policy
    cfg = RolloutConfig(batch_size=8, max_total_tokens=160, max_new_tokens_per_turn=24, **rollout)
    return RolloutEngine(
        model,
        tokenizer,
        _registry(visual),
        cfg,
        max_obs_tokens=16,
        images=codec,
        question_images=scene_images(visual.scenes, 84 * 84),
    )


def test_question_and_observation_images_become_masked_image_tokens(visual, policy):
    _, tokenizer, codec, _ = policy
    fmt = PromptFormatter(
        tokenizer,
        RolloutConfig(),
        max_obs_tokens=16,
        images=codec,
        question_images=scene_images(visual.scenes, 84 * 84),
    )
    ex = visual.train[0]
    ep = fmt.start_episode(ex, group=3)
    block = [codec.start_id] + [codec.pad_id] * 4 + [codec.end_id]  # a 56x56 overview
    assert ep.token_ids[: len(block)] == block
    assert ep.token_ids[len(block) :] == fmt.prompt_ids(ex)
    assert ep.prompt_len == len(ep.token_ids) and sum(ep.mask) == 0
    assert ep.views == [FULL_VIEW] and len(ep.images) == 1
    # a zoom observation: <obs>, the image's tokens, the text, </obs>; all masked
    crop = Image.new("RGB", (56, 112), (200, 30, 30))  # 2 x 4 merged tokens
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    outcome = ToolOutcome("zoomed", ok=True, refs=("0.5,0,0.75,0.5",), image=buf.getvalue())
    n = len(ep.token_ids)
    assert fmt.add_observation(ep, outcome)
    obs_open = tokenizer.convert_tokens_to_ids(TAGS.obs_open)
    obs_close = tokenizer.convert_tokens_to_ids(TAGS.obs_close)
    added = ep.token_ids[n:]
    assert added[0] == obs_open and added[-1] == obs_close
    assert added[1 : 1 + 10] == [codec.start_id] + [codec.pad_id] * 8 + [codec.end_id]
    assert added[11:-1] == fmt.encode("zoomed")
    assert ep.mask[n:] == [0] * len(added)
    assert ep.views[-1] == (0.5, 0.0, 0.75, 0.5) and ep.images[-1].grid == (1, 8, 4)
    # no room for the image block: nothing is appended
    assert not fmt.add_observation(ep, outcome, budget=5)
    assert len(ep.token_ids) == n + len(added)


def test_the_processor_and_model_round_trip_through_save_pretrained(policy, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model, tokenizer, codec, tok_dir = policy
    image = Image.new("RGB", (300, 200), (10, 120, 240))
    a = codec.encode(image)
    again = ImageCodec(AutoImageProcessor.from_pretrained(str(tok_dir)), tokenizer).encode(image)
    assert a.grid == again.grid and torch.equal(a.pixel_values, again.pixel_values)
    tok2 = AutoTokenizer.from_pretrained(str(tok_dir))
    text = "<|vision_start|><|image_pad|><|vision_end|>Question: x"
    assert tok2.encode(text, add_special_tokens=False) == tokenizer.encode(
        text, add_special_tokens=False
    )
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
    ids = torch.tensor([codec.token_ids(a) + tokenizer.encode("Question: x")])
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=a.pixel_values,
        image_grid_thw=torch.tensor([a.grid]),
        position_ids=mrope_positions(ids[0].tolist(), codec.pad_id, [a])[:, None],
    )
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, loaded(**kw).logits)


def test_rollout_logprobs_match_the_training_forward(visual, policy):
    """The sampler's recorded log-prob of each policy token equals the training forward's
    (right-padded batch, the rows' images, 3-D positions), over the tokens the sampler may
    draw (image tokens are never sampled)."""
    model, _, codec, _ = policy
    engine = _engine(visual, policy)
    examples = visual.train[:4]
    episodes = engine.rollout(examples, [0, 1, 2, 3], seed=1)
    # rows whose context already holds a zoomed region (the prefix is not the policy's)
    prefixed = []
    for g, ex in enumerate(examples):
        ep = _zoom_episode(ex, g, ex.gold_box, 0.0, engine.fmt, engine.registry, answer=False)
        prefixed.append(ep)
    episodes += engine.continue_episodes(prefixed, seed=2)
    assert all(len(ep.images) == 2 for ep in prefixed)
    assert all(sum(ep.mask[ep.calls[0].end :]) > 0 for ep in prefixed)
    batch = collate(episodes, engine.pad_id, image_pad_id=codec.pad_id)
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            **batch.model_inputs(slice(0, len(episodes))),
        ).logits
    logits[..., engine.banned] = -math.inf
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, batch.input_ids[:, 1:, None])
    logp = torch.nn.functional.pad(logp.squeeze(2), (1, 0))
    logp = torch.where(batch.mask > 0, logp, 0.0)  # image tokens are -inf here: never sampled
    assert batch.mask.sum() > 0
    torch.testing.assert_close(logp, batch.old_logp * batch.mask, atol=2e-4, rtol=0)


def test_the_hidden_state_loss_sees_the_images(visual, policy):
    """``hidden_loss`` runs the multimodal body: its hidden states times the head are the
    model's logits, and changing an image changes them."""
    model, _, codec, _ = policy
    engine = _engine(visual, policy)
    episodes = engine.rollout(visual.train[:2], [0, 1], seed=2)
    batch = collate(episodes, engine.pad_id, image_pad_id=codec.pad_id)
    seen = {}

    def capture(hidden, weight, bias, input_ids, **kw):
        seen["logits"] = hidden @ weight.T
        return hidden.sum()

    attach_hidden_loss(model, capture)
    vision = batch.model_inputs(slice(0, 2))
    with torch.no_grad():
        model.hidden_loss(batch.input_ids, batch.attention_mask, vision=vision)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **vision)
        torch.testing.assert_close(seen["logits"], full.logits, atol=1e-5, rtol=1e-5)
        other = dict(vision, pixel_values=vision["pixel_values"].flip(0))
        model.hidden_loss(batch.input_ids, batch.attention_mask, vision=other)
    assert not torch.allclose(seen["logits"], full.logits)


def test_demonstrations_show_the_zoomed_region(visual, policy):
    _, _, codec, _ = policy
    engine = _engine(visual, policy)
    for ex in visual.demos:
        ep = demonstration(engine.fmt, engine.registry, ex)
        names = [c.name for c in ep.calls]
        assert names[0] == "zoom_in" and all(c.valid and c.good for c in ep.calls), ep.calls
        assert len(ep.images) == 1 + names.count("zoom_in")  # the scene, then each zoom
        assert ep.views[1] == ex.gold_box
        assert ep.token_ids.count(codec.pad_id) == sum(i.num_tokens for i in ep.images)
        assert engine.fmt.decode(ep.token_ids).endswith(f"<answer>{ex.answers[0]}</answer>")
    batch = collate(
        [demonstration(engine.fmt, engine.registry, ex) for ex in visual.demos],
        engine.pad_id,
        image_pad_id=codec.pad_id,
    )
    assert batch.vision is not None and batch.vision.position_ids.shape[1:] == batch.shape


# ---------------------------------------------------------------- IoU witnesses


def _zoom_episode(ex: Example, group: int, box, reward: float, fmt, registry, answer=True):
    """A hand-built episode of one zoom call into ``box`` with the given reward (``answer``:
    then an answer turn; else the call is not marked as the policy's, a context to continue)."""
    ep = fmt.start_episode(ex, group)
    args = {"image_index": 0, "bbox": list(box)}
    from trainer.modeling import format_call

    call_ids = fmt.encode(format_call("zoom_in", args))
    start = len(ep.token_ids)
    ep.append(call_ids, policy=answer)
    parsed = registry.parse(fmt.decode(call_ids)[len(TAGS.tool_open) : -len(TAGS.tool_close)])
    (outcome,) = registry.execute([(parsed, fmt.context(ep))])
    ep.calls.append(fmt.call_record(ep, start, len(ep.token_ids), parsed, outcome, registry))
    fmt.add_observation(ep, outcome)
    if answer:
        ep.append(fmt.encode("<answer>0</answer>"), policy=True)
    ep.reward = reward
    return ep


def test_zoom_calls_are_lifted_through_iou_witnesses(visual, policy, fused_correct_impl):
    """Two successful rollouts zoomed into the gold panel; of the failing ones, the call into
    the same panel (IoU 1) and the one a little off (IoU 0.81 >= theta) are lifted, the call
    into the neighbouring panel (IoU 0) and the loose one covering two panels (IoU 0.5 <
    theta) are not. Lift = beta * confidence * mean advantage of the supporting rollouts."""
    engine = _engine(visual, policy)
    registry, fmt = engine.registry, engine.fmt
    ex = next(e for e in visual.train if e.kind == "zoom")
    gold = ex.gold_box
    x1, y1, x2, y2 = gold  # a cell of the grid
    w, h = x2 - x1, y2 - y1
    side = w if x1 < 0.5 else -w
    wrong = (x1 + side, y1, x2 + side, y2)  # the panel beside it
    boxes_rewards = [
        (gold, 1.0),
        (gold, 1.0),
        (gold, 0.0),  # the right region, misread: lifted
        ((x1, y1, x2 - 0.1 * w, y2 - 0.1 * h), 0.0),  # IoU 0.9^2 = 0.81: lifted
        (wrong, 0.0),  # the wrong panel: IoU 0
        ((min(x1, wrong[0]), y1, max(x2, wrong[2]), y2), 0.0),  # two panels: IoU 0.5
    ]
    episodes = [_zoom_episode(ex, 0, b, r, fmt, registry) for b, r in boxes_rewards]
    assert [c.good for ep in episodes for c in ep.calls] == [True] * 4 + [False, True]
    params = registry.encode_calls(
        [c.tool_id for ep in episodes for c in ep.calls],
        [c.param_text for ep in episodes for c in ep.calls],
        [c.refs for ep in episodes for c in ep.calls],
    )
    batch = collate(episodes, engine.pad_id, params=params, image_pad_id=engine.fmt.images.pad_id)
    rewards = torch.tensor([r for _, r in boxes_rewards])
    seq_adv = (rewards - rewards.mean()) / rewards.std()
    adv = seq_adv[:, None] * batch.mask
    c = batch.calls
    out = fused_correct_impl(
        adv,
        seq_adv,
        batch.group_ids,
        c.seq,
        c.start,
        c.end,
        c.tool,
        c.key,
        c.params,
        registry.sim_kind_tensor(),
        0.7,
        0.3,
        0.8,
        False,
    )
    delta = out[1]
    a_pos = float(seq_adv[0])  # both successes have the same advantage
    ious = [1.0, 0.81, 0.0, 0.5]
    for k, s in enumerate(ious, start=2):
        if s >= 0.7:
            expected = 0.8 * s * 1.0 * a_pos  # confidence = s * coverage (2/2)
            assert float(delta[k]) == pytest.approx(expected, rel=1e-5), k
        else:
            assert float(delta[k]) == 0.0, k
    assert float(delta[0]) == float(delta[1]) == 0.0  # successes are never corrected
    # the rewritten advantages are lifted on the lifted calls' tokens only, never past 0
    corrected = out[0]
    for k in range(2, 6):
        s, e = int(c.start[k]), int(c.end[k])
        want = torch.clamp(adv[k, s:e] + float(delta[k]), max=0.0)
        torch.testing.assert_close(corrected[k, s:e], want)
    assert bool((corrected[2:] <= 0).all())
    # the ground truth of these calls: the two-panel zoom covers the gold panel with IoU 0.5,
    # so it counts as good but is below theta; the wrong panel is bad
    from trainer.credit import truth_counts, truth_rates

    rates = truth_rates(truth_counts(episodes, seq_adv.tolist(), delta.tolist()))
    assert rates["truth/zoom_lift_rate"] == 2 / 4
    assert rates["truth/zoom_lift_precision"] == 1.0
    assert rates["truth/zoom_lift_recall"] == 2 / 3
    # the public op agrees with the backend
    public = tapo_kernels.fused_correct(
        adv, seq_adv, batch.group_ids, c, registry.sim_kind_tensor(), theta=0.7
    )
    torch.testing.assert_close(public.delta, delta)


QWEN_VL_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", ["vl", "text_only"])
def test_chat_templates_place_the_question_image_in_the_user_message(visual, policy, template):
    import copy

    _, tokenizer, codec, _ = policy
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        QWEN_VL_LIKE_TEMPLATE
        if template == "vl"
        else "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    cfg = RolloutConfig(use_chat_template=True, prompt_template="{question}", system_prompt="S")
    fmt = PromptFormatter(
        tok, cfg, images=codec, question_images=scene_images(visual.scenes, 84 * 84)
    )
    ex = visual.train[0]
    ep = fmt.start_episode(ex)
    text = fmt.decode(ep.token_ids)
    pads = "<|image_pad|>" * 4  # the 56x56 overview
    if template == "vl":  # the template's placeholder, expanded to the image's 16 tokens
        assert text == (
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|>{pads}<|vision_end|>{ex.question}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    else:  # a template without image support: the image block opens the prompt
        assert text.startswith(f"<|vision_start|>{pads}<|vision_end|>system: S\n")
    mrope_positions(ep.token_ids, codec.pad_id, ep.images)  # one block per image


def test_fsdp_units_are_the_vision_blocks_then_the_text_blocks(policy):
    from trainer.modeling import decoder_layers

    model = policy[0]
    units = decoder_layers(model)
    vision, text = list(model.model.visual.blocks), list(model.model.language_model.layers)
    assert len(vision) == 1 and len(text) == 1  # the fixture's tiny sizes
    assert units == vision + text


def _tiny_vl(family: str):
    """A 1-layer Qwen2-VL or Qwen2.5-VL (vocabulary 64; image tokens 8, 9, 10)."""
    import transformers

    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    vision = dict(depth=1, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=32, mlp_ratio=2)
        config_cls, model_cls = "Qwen2VLConfig", "Qwen2VLForConditionalGeneration"
    else:
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=32)
        vision.update(fullatt_block_indexes=[0], window_size=56)
        config_cls, model_cls = "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"
    config = getattr(transformers, config_cls)(
        text_config=text,
        vision_config=vision,
        image_token_id=9,
        video_token_id=9,
        vision_start_token_id=8,
        vision_end_token_id=10,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_our_rotary_positions_are_the_models_own(family):
    """``mrope_positions`` (what the sampler and the trainer pass) gives the logits the model
    computes with its own position rule, for two images of different grids in one row."""
    model = _tiny_vl(family)
    a, b = (
        ImageInput(torch.randn(32, 1176), (1, 8, 4)),
        ImageInput(torch.randn(16, 1176), (1, 4, 4)),
    )
    ids = [1, 2, 8, *[9] * 8, 10, 3, 4, 8, *[9] * 4, 10, 5, 6]
    x = torch.tensor([ids])
    images = dict(pixel_values=torch.cat([a.pixel_values, b.pixel_values]))
    images["image_grid_thw"] = torch.tensor([a.grid, b.grid])
    with torch.no_grad():
        ours = model(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            position_ids=mrope_positions(ids, 9, [a, b])[:, None],
            **images,
        ).logits
        theirs = model(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            mm_token_type_ids=(x == 9).int(),
            **images,
        ).logits
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
