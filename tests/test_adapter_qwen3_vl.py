"""Qwen3-VL: the shared oracle suite for every registered method (or its asserted refusal), DeepStack pruned
consistently with the kept tokens (pre-LLM rows selected, in-LLM rows not re-injected), interleaved M-RoPE,
videos laid out as the processor does (one run per frame group), and a saved checkpoint round trip."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from factories import tiny
from families import BYPASS, check_oracles, family, recorded_plans, replayed_plans
from oracles import generate_logits
from test_method_oracles import CASES, NO_CASE, _selection_only

import vtprune
from vtprune.engine import signals as sig
from vtprune.errors import UnsupportedInputError
from vtprune.methods import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, method_class, register
from vtprune.models import adapter_for
from vtprune.models.base import apply_rope
from vtprune.testing import qwen3_video_inputs

FAM = "qwen3_vl"
#: refused on Qwen3-VL by design, with the words the refusal must contain
REFUSED = {"downsample": "input transform"}  # the resolution sets the token count: resize before the processor
PARAMS = [
    pytest.param(name, budget, options, id=f"{name}-{i}")
    for name, cases in CASES.items()
    for i, (budget, options) in enumerate(cases)
    if name not in REFUSED
]
# in-LLM cuts before the last DeepStack layer (levels are added after layers 0 and 1)
DEEPSTACK_CUTS = [
    pytest.param("random", 0.5, {"layer": 1}, id="random-layer1"),
    pytest.param("fastv", 0.6, {"k": 1}, id="fastv-k1"),
    pytest.param("random", 0.5, {"layer": 1, "positions": "reindex"}, id="random-layer1-reindex"),
]


def test_registered_and_every_method_covered():
    assert "Qwen3VLForConditionalGeneration" in vtprune.supported_model_classes()
    builtin = {n for n in vtprune.methods() if method_class(n).__module__.startswith("vtprune.")}
    assert builtin <= set(CASES) | set(NO_CASE)


@pytest.mark.parametrize("name,budget,options", PARAMS + DEEPSTACK_CUTS)
def test_shared_oracles(name, budget, options):
    check_oracles(FAM, name, budget, options, selection_only=_selection_only(name, options))


@pytest.mark.parametrize("name", ["fastv", "visionzip", "random"])
def test_shared_oracles_eager(name):
    budget, options = CASES[name][0]
    check_oracles(FAM, name, budget, options, selection_only=_selection_only(name, options), attn="eager", alone=False)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_methods(name):
    model = family(FAM).models["sdpa"]
    with pytest.raises(UnsupportedInputError, match=REFUSED[name]):
        vtprune.apply(model, name, 0.3)
    assert "_vtprune" not in model.__dict__ and "generate" not in model.__dict__


def test_deepstack_rows_follow_the_kept_tokens():
    """Pre-LLM: every DeepStack level handed to the stock forward is the full level at the kept rows."""
    fam = family(FAM)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    seen = {}

    def grab(module, args, kwargs):
        seen["mm"] = kwargs.get("mm_encoder_outputs")

    handle = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtprune.pruned(model, "random", 0.3), torch.no_grad():
            model(**inputs)
            record = vtprune.last_run(model)
    finally:
        handle.remove()
    out = seen["mm"]["image"]
    assert len(out.deepstack_features) == len(full.deepstack_features) == 2
    for b, sample in enumerate(record.samples):
        keep = sample.events[0].keep_idx
        assert 0 < len(keep) < sample.n_visual
        assert torch.equal(out.pooler_output[b], full.pooler_output[b][keep])
        for level, ref in zip(out.deepstack_features, full.deepstack_features, strict=True):
            assert torch.equal(level[b], ref[b][keep])


@dataclass
class _InsertConfig(MethodConfig):
    pass


@register
class _InsertProbe(PruningMethod):
    """Test method: keeps the first k − 1 candidates and inserts their mean before candidate 1."""

    name = "test_qwen3_insert_probe"
    config_class = _InsertConfig
    inserts = True

    def stages(self):
        return (Stage("pre_llm"),)

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        keep = torch.arange(k - 1)
        extra = image.features[keep].mean(0, keepdim=True)
        return KeepPlan(keep, inserted=extra, insert_at=torch.tensor([1]))


def test_inserted_tokens_get_no_deepstack_rows():
    """A token a plan inserts has no source patch: its DeepStack rows are zero (nothing is injected on it);
    merged kept tokens (VisionZip's contextual ones) take their representative's rows."""
    fam = family(FAM)
    model, inputs = fam.models["sdpa"], fam.batches[1]
    with torch.no_grad():
        full = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    seen = {}
    handle = model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(mm=kw.get("mm_encoder_outputs")), with_kwargs=True
    )
    try:
        with vtprune.pruned(model, "test_qwen3_insert_probe", 6), torch.no_grad():
            model(**inputs)
            assert vtprune.last_run(model).samples[0].events[0].inserted == [1]
        for level, ref in zip(seen["mm"]["image"].deepstack_features, full.deepstack_features, strict=True):
            rows = level[0]  # kept 0, inserted, kept 1..4
            assert rows.shape[0] == 6 and not rows[1].any()
            assert torch.equal(rows[[0, 2, 3, 4, 5]], ref[0][:5])
        with vtprune.pruned(model, "visionzip", 0.5), torch.no_grad():
            model(**inputs)
            keep = vtprune.last_run(model).samples[0].events[0].keep_idx
        for level, ref in zip(seen["mm"]["image"].deepstack_features, full.deepstack_features, strict=True):
            assert torch.equal(level[0], ref[0][keep])
    finally:
        handle.remove()


def test_interleaved_rope_gravity_matches_the_rotary_module():
    """`rotary_spec().pair_rows` + `rope_gravity` == the all-ones RoPE logit from the model's own cos/sin."""
    model = family(FAM).models["sdpa"]
    ad = adapter_for(model)
    spec = ad.rotary_spec()
    assert spec.pair_rows is not None and len(spec.pair_rows) == spec.head_dim // 2
    pos = torch.tensor([[0, 3, 3, 7, 9], [0, 4, 5, 7, 9], [0, 5, 4, 7, 9]])[:, None]  # (3, 1, 5)
    hidden = torch.zeros(1, 5, ad.text_config.hidden_size)
    cos, sin = ad.rotary(hidden, pos)
    ones = torch.ones(1, 1, 5, spec.head_dim)
    rot = apply_rope(ones, cos, sin)[0, 0].double()  # (5, d)
    want = rot @ rot.T / spec.head_dim**0.5
    got = sig.rope_gravity(pos[:, 0], pos[:, 0], spec.theta, spec.head_dim, spec.sections, spec.pair_rows)
    assert torch.allclose(got.double(), want, atol=1e-5)
    contiguous = sig.rope_gravity(pos[:, 0], pos[:, 0], spec.theta, spec.head_dim, spec.sections)
    assert not torch.allclose(contiguous.double(), want, atol=1e-3)  # the layout matters


# --- video ------------------------------------------------------------------------------------------------
VIDEO_PROMPTS = [([1, 5, 6], [7, 8, 9]), ([1, 2], [17, 18, 19, 20])]
VIDEO_MEDIA = [[(64, 96), (4, 64, 64)], [(4, 96, 64)]]  # image 2×3 + video 2 groups of 2×2; video 2 groups of 3×2


def _video_alone(inputs: dict, b: int) -> dict:
    """Sample b of the video batch as a batch of one (its image and video pixels sliced out)."""
    pad = int((inputs["attention_mask"][b] == 0).sum())
    out = {k: inputs[k][b : b + 1, pad:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, pix, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        owners = [i for i, items in enumerate(VIDEO_MEDIA) for it in items if (len(it) == 3) == (kind == "video")]
        mine = [j for j, o in enumerate(owners) if o == b]
        if not mine:
            continue
        sizes = inputs[grid].prod(-1).tolist()
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        out[pix] = torch.cat([inputs[pix][starts[j] : starts[j] + sizes[j]] for j in mine])
        out[grid] = inputs[grid][mine]
    return out


@pytest.mark.parametrize("name,budget", [("random", 0.5), ("vispruner", 0.5), ("fastv", 0.6)])
def test_video_and_images_mixed(name, budget):
    """Frame groups are engine images: bypass is stock bit-exactly, cached decode == uncached replay, each
    sample alone == in the batch, and every group keeps its share of the budget."""
    model = family(FAM).models["sdpa"]
    inputs = qwen3_video_inputs(model, VIDEO_PROMPTS, VIDEO_MEDIA, seed=3)
    ref_tokens, ref_steps = generate_logits(model, inputs, 3)
    with vtprune.pruned(model, name, BYPASS):
        tokens, steps = generate_logits(model, inputs, 3)
    assert torch.equal(tokens, ref_tokens) and torch.equal(steps, ref_steps)

    vtprune.apply(model, name, budget)
    try:
        with recorded_plans(model) as plans:
            tokens, steps = generate_logits(model, inputs, 3)
        record = vtprune.last_run(model)
        entries = vtprune.session_of(model).adapter._entries
        assert [(e.kind, e.source, e.group, e.grid) for e in entries] == [
            ("image", 0, 0, (2, 3)),
            ("video", 0, 0, (2, 2)),
            ("video", 0, 1, (2, 2)),
            ("video", 1, 0, (3, 2)),
            ("video", 1, 1, (3, 2)),
        ]
        assert [s.n_visual for s in record.samples] == [14, 12]
        prompt = inputs["input_ids"].shape[1]
        extended = dict(inputs)
        extended["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, :-1]], 1)
        extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :-1])], 1)
        extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens[:, :-1])], 1)
        with replayed_plans(model, plans), torch.no_grad():
            full = model(**extended, use_cache=False).logits
        seq = vtprune.last_run(model).sequence_index
        rows = torch.arange(prompt - 1, prompt + 2)
        where = (seq[:, None, :] == rows[None, :, None]).float().argmax(-1) if seq is not None else rows.expand(2, -1)
        full = full.gather(1, where[..., None].expand(-1, -1, full.shape[-1]))
        assert (full - steps).abs().max() <= 1e-4
        for b in range(2):
            t1, l1 = generate_logits(model, _video_alone(inputs, b), 3)
            rec1 = vtprune.last_run(model)
            for ev_b, ev_1 in zip(record.samples[b].events, rec1.samples[0].events, strict=True):
                assert torch.equal(ev_b.keep_idx, ev_1.keep_idx)
            assert (l1[0] - steps[b]).abs().max() <= 1e-4 and torch.equal(t1[0], tokens[b])
    finally:
        vtprune.remove(model)
    if name != "fastv":  # pre-LLM: each frame group is cut to its share (largest remainder of the sample's k)
        assert [s.retained_tokens for s in record.samples] == [7, 6]


def test_video_run_with_several_groups_is_refused():
    """Frames without the processor's timestamp text between them cannot be told apart: refused by name."""
    model = family(FAM).models["sdpa"]
    inputs = qwen3_video_inputs(model, VIDEO_PROMPTS[:1], [[(4, 64, 64)]], seed=4)
    ids, tt = inputs["input_ids"], inputs["mm_token_type_ids"]
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    video = (tt[0] == 2).nonzero().flatten()
    first_end = int(video[3]) + 1  # drop "</vs> <t1> <vs>" between the two groups: one run of 8 video tokens
    keep[first_end : first_end + 3] = False
    bad = {**inputs, "input_ids": ids[:, keep], "attention_mask": inputs["attention_mask"][:, keep]}
    bad["mm_token_type_ids"] = tt[:, keep]
    with vtprune.pruned(model, "random", 0.5), pytest.raises(UnsupportedInputError):
        model(**bad)


# --- checkpoint round trip --------------------------------------------------------------------------------
def test_from_pretrained_round_trip_with_processor(tmp_path):
    """A saved tiny checkpoint with its tokenizer and PIL image processor reloads and prunes like the original."""
    from PIL import Image
    from saved_models import word_tokenizer
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

    from vtprune.models.qwen_inputs import qwen_image_processor, qwen_processor_inputs
    from vtprune.testing import QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_END_ID, QWEN_VISION_START_ID

    model = tiny("qwen3_vl", layers=4)
    tok = word_tokenizer(
        {
            QWEN_IMAGE_TOKEN_ID: "<|image_pad|>",
            QWEN_VIDEO_TOKEN_ID: "<|video_pad|>",
            QWEN_VISION_START_ID: "<|vision_start|>",
            QWEN_VISION_END_ID: "<|vision_end|>",
        }
    )
    size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    proc = qwen_image_processor(patch_size=16, merge_size=2, size=size)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    loaded.generation_config.eos_token_id = None
    tok2 = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    proc2 = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    image = Image.new("RGB", (96, 64), (200, 30, 90))
    text = "<s> <|vision_start|> <|image_pad|> <|vision_end|> w7 w8 w9"
    inputs = qwen_processor_inputs(loaded.config, tok2, [text], [image], proc2)
    assert int((inputs["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum()) == inputs["image_grid_thw"].prod() // 4
    for m in (model, loaded):
        vtprune.apply(m, "fastv", 0.6)
    try:
        t0, l0 = generate_logits(model, inputs, 3)
        t1, l1 = generate_logits(loaded, inputs, 3)
    finally:
        vtprune.remove(model)
        vtprune.remove(loaded)
    assert torch.equal(t0, t1) and torch.equal(l0, l1)


# --- run / show / lmms-eval on a saved checkpoint --------------------------------------------------------
@pytest.fixture(scope="module")
def saved_qwen3(tmp_path_factory):
    """A tiny Qwen3-VL saved with a word-level tokenizer and the PIL Qwen2-VL image processor (patch 16)."""
    from saved_models import word_tokenizer

    from vtprune.models.qwen_inputs import qwen_image_processor
    from vtprune.testing import QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_END_ID, QWEN_VISION_START_ID

    root = tmp_path_factory.mktemp("qwen3")
    model = tiny("qwen3_vl", layers=4)
    tok = word_tokenizer(
        {
            QWEN_IMAGE_TOKEN_ID: "<|image_pad|>",
            QWEN_VIDEO_TOKEN_ID: "<|video_pad|>",
            QWEN_VISION_START_ID: "<|vision_start|>",
            QWEN_VISION_END_ID: "<|vision_end|>",
        }
    )
    model.save_pretrained(root)
    tok.save_pretrained(root)
    size = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    qwen_image_processor(patch_size=16, merge_size=2, size=size).save_pretrained(root)
    return root


def test_run_and_show_on_the_qwen3_layout(saved_qwen3, tmp_path):
    """`vtprune run` / `show` load the directory as family qwen3_vl; the drawn cells are the kept tokens on the
    merged 32-px grid."""
    from PIL import Image

    from vtprune import runner, show

    lm = runner.load(saved_qwen3)
    assert lm.family == "qwen3_vl"
    image = Image.new("RGB", (160, 96), (180, 200, 220))
    res = runner.run_one(lm, image, "w5 w6", "pool", 0.3, max_new_tokens=2)
    assert 0 < res["retained_tokens"] < res["n_visual"]
    inputs = runner.build_inputs(lm, image, "w5 w6")
    _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
    assert res["n_visual"] == gh * gw // 4
    out = show.show(lm, image, "w5 w6", "pool,fastv@0.6", 0.3, tmp_path / "show.png", max_new_tokens=1)
    assert [r["method"] for r in out.results] == ["pool", "fastv"] and all("error" not in r for r in out.results)
    assert out.layout.grids == [(gh // 2, gw // 2)]
    pool = next(p for p in out.panels if p.method == "pool")
    assert len(pool.cells) == out.results[0]["retained_tokens"]
    assert (tmp_path / "show.png").exists()


def test_lmms_eval_plugin_accepts_qwen3(saved_qwen3):
    """The lmms-eval model class builds Qwen3-VL prompts and inputs (images in the family default layout)."""
    from PIL import Image

    from vtprune.eval.lmms.model import VtpruneLMM

    lmm = VtpruneLMM(pretrained=str(saved_qwen3), method="pool", budget=0.5)
    text = lmm.prompt("w5 w6", 1)
    enc = lmm.inputs([text], [[Image.new("RGB", (96, 64), (10, 20, 30))]])
    assert int((enc["input_ids"] == lmm._model.config.image_token_id).sum()) == int(enc["image_grid_thw"].prod()) // 4
