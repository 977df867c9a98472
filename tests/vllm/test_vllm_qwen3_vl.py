"""vtprune's vLLM plugin on a tiny random Qwen3-VL with DeepStack (CPU backend, float32).

Equality oracle per supported method: vLLM's greedy output for a batch of prompts with images of different sizes
equals vtprune's HF path (`vtprune.apply(..., budget_mode="retained", positions="reindex")`) on the same
checkpoint, and the kept indices vLLM recorded equal the HF run's. Positions come from vLLM's multimodal-pruning
path (the plugin's M-RoPE columns, five for Qwen3-VL, through `recompute_mrope_positions`), so equal greedy
outputs also check that vLLM's positions are the HF engine's reindexed 3-D ids. As in the LLaVA oracle, `pre_llm`
methods get vLLM's own encoder output (main features and every DeepStack level) on the HF side, `vision` methods
get the HF path's own ViT signals checked against vLLM's. One engine serves every method: each test swaps the
engine's pruner through `LLM.apply_model`.
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: `apply_model` can swap
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch
from vllm_oracle import _NoQuestion, _PixelSeeded, _with_vllm_inputs

import vtprune
from vtprune.errors import VtpruneError
from vtprune.methods import build_method, method_class
from vtprune.methods.base import KeepPlan
from vtprune.methods.cdpruner import CDPrunerConfig
from vtprune.models.qwen3_vl import _deepstack_output
from vtprune.serving.pruner import layout_rows, pixel_seed
from vtprune.serving.qwen2_5_vl import merged_grid
from vtprune.serving.qwen3_vl import pruner_for
from vtprune.serving.testing import QWEN_IMAGE, noise_image, save_qwen3_vl

BUDGET = 16
PROMPTS = [f"w5 w6 {QWEN_IMAGE} w7 w8", f"w9 {QWEN_IMAGE} w10 w11 w12 w13", f"w14 w15 w16 {QWEN_IMAGE} w17"]
#: (width, height) per prompt: merged grids 6×8, 8×6 and 9×7 (32 px per merged token)
SIZES = [(256, 192), (192, 256), (224, 288)]
PX = 32
NEW_TOKENS = 6
ALLOWED = list(range(4, 250))  # ordinary words only (never an image / video / vision start-end token)
SUPPRESS = [i for i in range(256) if i not in ALLOWED]
METHODS = [
    ("random", {}),
    ("uniform", {}),
    ("pool", {}),
    ("divprune", {}),
    ("visionzip", {}),
    ("vispruner", {}),
    ("dcp_prune", {}),
    ("resprune", {}),
    ("cdpruner", {}),
]
HF_OPTIONS = {"dcp_prune": {"tau_kappa": float("inf")}, "resprune": {"alpha": 0.0}}
ENGINE = {
    "dtype": "float32",
    "max_model_len": 1024,
    "enforce_eager": True,
    "enable_prefix_caching": False,
    "mm_processor_cache_gb": 0,
    "seed": 0,
    "limit_mm_per_prompt": {"image": 2, "video": 0},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3_vl"), vision_qk_scale=4.0)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return tmp_path_factory.mktemp("record") / "kept.jsonl"


@pytest.fixture(scope="module")
def engine(checkpoint, record):
    from vllm import LLM

    llm = LLM(
        str(checkpoint),
        max_num_seqs=4,
        video_pruning_rate=0.5,  # switches on vLLM's multimodal-pruning path (M-RoPE re-derived after encoding)
        hf_overrides={"vtprune": {"method": "divprune", "budget": BUDGET, "record": str(record)}},
        **ENGINE,
    )
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _use(section: dict):
    def swap(model):
        model.config.vtprune = section
        model.vtprune = pruner_for(model.config)
        pruner = model.vtprune
        return pruner.method.name, str(pruner.method.stages()[0]), pruner.wanted & pruner.vision_signals

    return swap


def _encode(pixels: torch.Tensor, grid_thw: torch.Tensor, wanted: frozenset[str]):
    """vLLM's unpruned Qwen3-VL encoder with the vision signals in `wanted` -> (embeds per image (n, D (1 + levels)):
    main + DeepStack levels, {signal: [per image]})."""

    def run(model):
        image_input = {"type": "pixel_values", "pixel_values": pixels, "image_grid_thw": grid_thw}
        embeds, per_image = model.encode_with_signals(image_input, wanted)
        return list(embeds), {name: [s[name] for s in per_image] for name in wanted}

    return run


@pytest.mark.parametrize(("method", "options"), METHODS, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_vllm_output_equals_hf_path(engine, hf, record, method, options):
    index = METHODS.index((method, options))
    images = [[noise_image(1000 * index + i, size)] for i, size in enumerate(SIZES)]  # new images: no cache reuse
    _check_equal(engine, hf, record, method, options, PROMPTS, images)


@pytest.mark.parametrize("method", ["divprune", "vispruner"])
def test_two_images_per_prompt(engine, hf, record, method):
    """Two images in one prompt: the second image's positions start after the first image's re-derived text
    offset (vLLM's `recompute_mrope_positions` walks the images of a request in turn). The plugin keeps K per
    image (vLLM's encoder batches images without knowing which share a prompt) where the HF path splits a
    sample's budget over its images in proportion to N: equal here, as the images of a prompt have one size
    and the HF budget is 2 K."""
    prompts = [f"w5 {QWEN_IMAGE} w6 w7 {QWEN_IMAGE} w8", f"w9 {QWEN_IMAGE} {QWEN_IMAGE} w10"]
    images = [
        [noise_image(7000, SIZES[1]), noise_image(7001, SIZES[1])],
        [noise_image(7002, SIZES[2]), noise_image(7003, SIZES[2])],
    ]
    _check_equal(engine, hf, record, method, {}, prompts, images, hf_budget=2 * BUDGET)


@pytest.fixture(scope="module")
def chunked(checkpoint, record, engine):
    """A second engine that prefills in chunks of 8 tokens. Module-scoped: deleting an engine tears down the
    process's model-parallel groups, which the first engine (`engine`, set up before it) still uses."""
    from vllm import LLM

    llm = LLM(
        str(checkpoint),
        max_num_seqs=4,
        max_num_batched_tokens=8,
        video_pruning_rate=0.5,
        hf_overrides={"vtprune": {"method": "divprune", "budget": BUDGET, "record": str(record)}},
        **ENGINE,
    )
    yield llm
    del llm


@pytest.mark.parametrize("method", ["divprune", "vispruner"])
def test_chunked_prefill(chunked, hf, record, method):
    """Prefill in chunks of 8 tokens (images cut across steps, a chunk starting right after `<|vision_start|>`):
    the positions re-derived per step still give the HF path's output (vLLM's own re-derivation fails here)."""
    prompts = [f"w5 w6 w7 {QWEN_IMAGE} w8 w9 {QWEN_IMAGE} w10", f"w9 w10 w11 w12 w13 w14 w15 w16 {QWEN_IMAGE} w17"]
    images = [[noise_image(8000, SIZES[0]), noise_image(8001, SIZES[0])], [noise_image(8002, SIZES[2])]]
    _check_equal(chunked, hf, record, method, {}, prompts[:1], images[:1], hf_budget=2 * BUDGET)
    _check_equal(chunked, hf, record, method, {}, prompts[1:], images[1:])


def _check_equal(
    engine, hf, record, method: str, options: dict, prompts: list[str], images: list[list], hf_budget: int = BUDGET
) -> None:
    """vLLM (plugin) vs vtprune's HF path on one batch (prompt i with `images[i]`): the same placeholder counts,
    kept indices per image, greedy tokens and chosen-token log-probabilities."""
    from vllm import SamplingParams

    model, processor = hf
    flat = [im for ims in images for im in ims]
    section = {"method": method, "budget": BUDGET, "options": options, "record": str(record)}
    ((name, stage, wanted),) = engine.apply_model(_use(section))
    assert name == method_class(method).name
    record.write_text("")
    outs = engine.generate(
        [{"prompt": p, "multi_modal_data": {"image": ims}} for p, ims in zip(prompts, images, strict=True)],
        SamplingParams(
            temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, allowed_token_ids=ALLOWED, logprobs=0
        ),
        use_tqdm=False,
    )
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]
    vllm_logprobs = _chosen_logprobs(outs)
    kept = {r["seed"]: r for r in map(json.loads, record.read_text().splitlines())}

    inputs = processor(text=prompts, images=flat, padding=True, return_tensors="pt")
    grid_thw = inputs["image_grid_thw"]
    grids = [merged_grid(g, 2) for g in grid_thw.tolist()]
    assert grids == [(im.height // PX, im.width // PX) for im in flat]
    config = copy.deepcopy(model.config)
    config.vtprune = section
    pruner = pruner_for(config)
    counts = iter([pruner.tokens_for([g], model.config.text_config.hidden_size) for g in grids])
    # words + <|vision_start|>, <|vision_end|> per image + each image's K placeholders
    lengths = [len(p.split()) + len(ims) + sum(next(counts) for _ in ims) for p, ims in zip(prompts, images)]  # noqa: B905
    assert [len(o.prompt_token_ids) for o in outs] == lengths
    # vLLM normalises on the device: the model (and the plugin's seed) gets the un-normalised uint8 patches
    raw = processor.image_processor(flat, do_rescale=False, do_normalize=False, return_tensors="pt")
    raw = raw["pixel_values"].round().to(torch.uint8)
    seeds = [pixel_seed(px) for px in raw.split(grid_thw.prod(-1).tolist())]
    assert sorted(kept) == sorted(seeds), "one record per image of this batch"
    opts = {**HF_OPTIONS.get(method, {}), **options}
    if method == "random":
        the_method = _PixelSeeded(seeds)
    elif method == "cdpruner":
        the_method = _NoQuestion(CDPrunerConfig(relevance="llm", **opts))
    else:
        the_method = build_method(method, opts)
    hf_inputs = dict(inputs)
    full, signals = engine.apply_model(_encode(raw, grid_thw, wanted))[0]
    d = model.config.text_config.hidden_size
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    assert all(e.shape[1] == d * (1 + levels) for e in full)
    embeds = [e[:, :d] for e in full]
    deepstack = [[e[:, d * (1 + lv) : d * (2 + lv)] for e in full] for lv in range(levels)]
    if stage == "pre_llm":  # the method sees vLLM's own encoder output (bit-identical selection inputs)
        del hf_inputs["pixel_values"]
        hf_inputs["mm_encoder_outputs"] = {"image": _deepstack_output(embeds, deepstack)}
    else:  # HF's own ViT signals are checked against vLLM's, then the method gets vLLM's
        the_method = _with_vllm_inputs(the_method, embeds, signals)
    vtprune.apply(model, the_method, hf_budget, budget_mode="retained", positions="reindex")
    try:
        with torch.no_grad():
            out = model.generate(
                **hf_inputs,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                suppress_tokens=SUPPRESS,
                return_dict_in_generate=True,
                output_logits=True,
            )
        run = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    hf_ids = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    seed_of = iter(seeds)
    for b, ims in enumerate(images):
        sample = run.samples[b]
        (event,) = sample.events
        offsets = sample.image_offsets
        for i in range(len(ims)):
            mine = event.keep_idx[(event.keep_idx >= offsets[i]) & (event.keep_idx < offsets[i + 1])] - offsets[i]
            seed = next(seed_of)
            assert kept[seed]["keep_idx"] == mine.tolist(), f"sample {b} image {i}: kept indices differ"
            assert kept[seed]["inserted"] == event.inserted[i]
    assert vllm_ids == hf_ids
    # the chosen tokens' log-probabilities (raw logits) too: a far finer check of the positions than argmaxes
    hf_logprobs = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, torch.tensor(hf_ids)[..., None])[..., 0]
    torch.testing.assert_close(vllm_logprobs, hf_logprobs, rtol=0, atol=1e-4)


def _chosen_logprobs(outs) -> torch.Tensor:
    """vLLM's log-probability of each generated token, (B, T) (raw model logits, before `allowed_token_ids`)."""
    rows = []
    for o in outs:
        c = o.outputs[0]
        rows.append([step[t].logprob for t, step in zip(c.token_ids, c.logprobs, strict=True)])
    return torch.tensor(rows)


def test_unpruned_budget_equals_stock(engine, hf):
    """A budget >= N serves every token (plan bypassed): positions from the pruning path then equal stock
    M-RoPE, and the output equals stock HF generate."""
    from vllm import SamplingParams

    model, processor = hf
    images = [noise_image(9000 + i, size) for i, size in enumerate(SIZES)]
    engine.apply_model(_use({"method": "divprune", "budget": 10_000}))
    outs = engine.generate(
        [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(PROMPTS, images, strict=True)],
        SamplingParams(
            temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, allowed_token_ids=ALLOWED, logprobs=0
        ),
        use_tqdm=False,
    )
    inputs = processor(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            suppress_tokens=SUPPRESS,
            return_dict_in_generate=True,
            output_logits=True,
        )
    hf_ids = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    n_all = [len(p.split()) + 1 + (h // PX) * (w // PX) for p, (w, h) in zip(PROMPTS, SIZES, strict=True)]
    assert [len(o.prompt_token_ids) for o in outs] == n_all  # every image keeps its N placeholders
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_ids
    hf_logprobs = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, torch.tensor(hf_ids)[..., None])[..., 0]
    torch.testing.assert_close(_chosen_logprobs(outs), hf_logprobs, rtol=0, atol=1e-4)


def test_deepstack_rows_follow_layout():
    """Every DeepStack level keeps the rows of the kept tokens in LLM order; an inserted token gets zero rows
    (nothing injected), as in the HF adapter."""
    plan = KeepPlan(keep_idx=torch.tensor([1, 3]), inserted=torch.zeros(1, 4), insert_at=torch.tensor([3]))
    rows = torch.arange(1.0, 6.0)[:, None].expand(5, 4)  # candidate i's row holds i + 1 (two levels of width 2)
    out = layout_rows(plan, rows)
    assert out[:, 0].tolist() == [2.0, 0.0, 4.0]  # kept 1, the token inserted before 3, kept 3
    assert out[1].abs().sum() == 0


@pytest.mark.parametrize(
    ("section", "grid", "kept"),
    [
        ({"method": "none", "budget": 16}, (6, 8), 48),
        ({"method": "divprune", "budget": 100}, (6, 8), 48),
        ({"method": "divprune", "budget": 0.25}, (6, 8), 12),
        ({"method": "divprune", "budget": 16}, (9, 7), 16),
    ],
)
def test_placeholders_per_image(checkpoint, section, grid, kept):
    """K placeholders per image from its merged grid: `none` and a budget >= N keep all; a ratio is of N."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    config.vtprune = section
    assert pruner_for(config).tokens_for([grid], int(config.text_config.hidden_size)) == kept


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"method": "fastv", "budget": 16}, r"fastv.*inside the LLM"),
        ({"method": "dcp_prune", "budget": 16, "options": {"tau_kappa": 0.5}}, r"without the question text"),
        ({"method": "divprune", "budget": 16, "layers": 2}, r"unknown vtprune config key"),
    ],
)
def test_unservable_configs_are_refused(checkpoint, section, match):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    config.text_config.num_hidden_layers = 28  # a 7B depth: every in-LLM schedule is feasible
    config.vtprune = section
    with pytest.raises(VtpruneError, match=match):
        pruner_for(config)


def test_engine_start_refuses_without_pruning_path(checkpoint):
    """Without `video_pruning_rate > 0` vLLM would keep the unpruned M-RoPE positions: `LLM(...)` fails at
    start-up (a fresh process, as `vllm serve` would) and says which flag to pass."""
    import subprocess
    import sys

    code = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM({str(checkpoint)!r}, dtype='float32', max_model_len=1024, enforce_eager=True,\n"
        "        hf_overrides={'vtprune': {'method': 'divprune', 'budget': 16}})\n"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert "video_pruning_rate > 0" in proc.stdout + proc.stderr
