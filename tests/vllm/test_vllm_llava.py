"""vtprune's vLLM plugin on a tiny random LLaVA-1.5 (CPU backend, float32).

Equality oracle per supported method: vLLM's greedy output for a batch of prompts with different images equals
vtprune's HF path (`vtprune.apply(..., budget_mode="retained", positions="reindex")`) on the same checkpoint,
and the kept indices vLLM recorded equal the HF run's. `pre_llm` methods get vLLM's own encoder output on the HF
side too (`mm_encoder_outputs`): the two encoders agree to ~4e-8 only, and a method with exact ties (cdpruner's
first pick under uniform relevance) would otherwise break them differently. `vision` methods use the HF
path's own CLIP signals (the checkpoint's CLIP q/k are scaled for a peaked [CLS] attention).
One engine serves every method (engine start is ~1 min here): each test swaps the engine's pruner through
`LLM.apply_model` (same K = 64 for every method).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: `apply_model` can swap
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vllm_oracle import _NoQuestion, _PixelSeeded, _with_vllm_inputs

import vtprune
from vtprune.errors import VtpruneError
from vtprune.methods import build_method, method_class
from vtprune.methods.cdpruner import CDPrunerConfig
from vtprune.serving.llava import pruner_for
from vtprune.serving.pruner import pixel_seed
from vtprune.serving.testing import noise_image, save_llava

BUDGET = 64
PROMPTS = ["w5 w6 <image> w7 w8", "w9 <image> w10 w11 w12 w13", "w14 w15 w16 <image> w17"]
NEW_TOKENS = 6
#: greedy decoding over ordinary words only: a random model may otherwise emit `<image>` (id 250), which the HF
#: engine refuses in a later step of a pruned conversation
ALLOWED = list(range(4, 250))
SUPPRESS = [i for i in range(256) if i not in ALLOWED]
#: (method, options) served; the plugin adds the text-free options itself (dcp_prune: tau_kappa=inf, cdpruner:
#: an empty question, resprune: alpha=0).
METHODS = [
    ("random", {}),
    ("uniform", {}),
    ("pool", {}),
    ("divprune", {}),
    ("visionzip", {}),
    ("visionzip", {"preset": "reference"}),
    ("vispruner", {}),
    ("dcp_prune", {}),
    ("resprune", {}),
    ("cdpruner", {}),
]
HF_OPTIONS = {"dcp_prune": {"tau_kappa": float("inf")}, "resprune": {"alpha": 0.0}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_llava(tmp_path_factory.mktemp("tiny-llava"), layers=4, vision_qk_scale=8.0)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return tmp_path_factory.mktemp("record") / "kept.jsonl"


@pytest.fixture(scope="module")
def engine(checkpoint, record):
    from vllm import LLM

    llm = LLM(
        str(checkpoint),
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=4,
        enforce_eager=True,
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        seed=0,
        limit_mm_per_prompt={"image": 1},
        hf_overrides={"vtprune": {"method": "divprune", "budget": BUDGET, "record": str(record)}},
    )
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
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


def _encode(pixels: torch.Tensor, wanted: frozenset[str]):
    """vLLM's unpruned LLaVA encoder on the given pixels, with the vision signals in `wanted`.
    -> (embeds (B, N, D), {signal: (B, ...)})"""

    def run(model):
        _, embeds, signals = model.encode_with_signals({"type": "pixel_values", "pixel_values": pixels}, wanted)
        return embeds, signals

    return run


@pytest.mark.parametrize(("method", "options"), METHODS, ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_vllm_output_equals_hf_path(engine, hf, record, method, options):
    from vllm import SamplingParams

    model, processor = hf
    index = METHODS.index((method, options))
    images = [noise_image(1000 * index + i) for i in range(len(PROMPTS))]  # new images: no cache reuse
    section = {"method": method, "budget": BUDGET, "options": options, "record": str(record)}
    ((name, stage, wanted),) = engine.apply_model(_use(section))
    assert name == method_class(method).name
    record.write_text("")
    outs = engine.generate(
        [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(PROMPTS, images, strict=True)],
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, allowed_token_ids=ALLOWED),
        use_tqdm=False,
    )
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]
    n_text = [len(p.split()) - 1 for p in PROMPTS]
    assert [len(o.prompt_token_ids) for o in outs] == [t + BUDGET for t in n_text]
    kept = {r["seed"]: r for r in map(json.loads, record.read_text().splitlines())}

    inputs = processor(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    seeds = [pixel_seed(px) for px in inputs["pixel_values"]]
    assert sorted(kept) == sorted(seeds), "one record per image of this batch"
    opts = {**HF_OPTIONS.get(method, {}), **options}
    if method == "random":
        the_method = _PixelSeeded(seeds)
    elif method == "cdpruner":
        the_method = _NoQuestion(CDPrunerConfig(relevance="llm", **opts))
    else:
        the_method = build_method(method, opts)
    hf_inputs = dict(inputs)
    embeds, signals = engine.apply_model(_encode(inputs["pixel_values"], wanted))[0]
    if stage == "pre_llm":  # the method sees vLLM's own encoder output (bit-identical selection inputs)
        del hf_inputs["pixel_values"]
        hf_inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(embeds))}
    else:  # HF's own CLIP signals are checked against vLLM's, then the method gets vLLM's
        the_method = _with_vllm_inputs(the_method, embeds, signals)
    vtprune.apply(model, the_method, BUDGET, budget_mode="retained", positions="reindex")
    try:
        with torch.no_grad():
            out = model.generate(**hf_inputs, max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=SUPPRESS)
        run = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    hf_ids = out[:, inputs["input_ids"].shape[1] :].tolist()
    for b, seed in enumerate(seeds):
        (event,) = run.samples[b].events
        assert kept[seed]["keep_idx"] == event.keep_idx.tolist(), f"sample {b}: kept indices differ"
        assert kept[seed]["inserted"] == sum(event.inserted)
    assert vllm_ids == hf_ids


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"method": "fastv", "budget": 64}, r"fastv.*llm:2.*inside the LLM"),
        ({"method": "pdrop", "budget": 64}, r"pdrop.*inside the LLM"),
        ({"method": "sparsevlm", "budget": 64}, r"sparsevlm.*inside the LLM"),
        ({"method": "rcp", "budget": 64}, r"rcp.*token count per input.*inside the LLM"),
        ({"method": "vitcop", "budget": 64}, r"vitcop.*inside the LLM"),
        ({"method": "random", "budget": 64, "options": {"layer": 2}}, r"random.*llm:2"),
        ({"method": "dcp_prune", "budget": 64, "options": {"tau_kappa": 0.5}}, r"without the question text.*ACGR"),
        ({"method": "resprune", "budget": 64, "options": {"alpha": 1.0}}, r"without the question text.*alpha"),
        ({"method": "cdpruner", "budget": 64, "options": {"relevance": "clip"}}, r"without the question text"),
        ({"method": "divprune"}, r'needs "method" and "budget"'),
        ({"method": "divprune", "budget": 64, "layers": 2}, r"unknown vtprune config key"),
        ({"method": "divprune", "budget": 1.5}, r"ratio"),
        ({"method": "nosuch", "budget": 64}, r"unknown method"),
    ],
)
def test_unservable_configs_are_refused(checkpoint, section, match):
    """Refused when the model is built (engine start-up), with a one-line reason."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    config.text_config.num_hidden_layers = 32  # LLaVA-1.5-7B depth: every in-LLM schedule is feasible
    config.vtprune = section
    with pytest.raises(VtpruneError, match=match):
        pruner_for(config)


def test_no_section_is_stock_vllm(checkpoint):
    from transformers import AutoConfig

    assert pruner_for(AutoConfig.from_pretrained(checkpoint)) is None


@pytest.mark.parametrize(
    ("section", "kept"),
    [
        ({"method": "none", "budget": 64}, 576),
        ({"method": "pool", "budget": 600}, 576),
        ({"method": "pool", "budget": 0.25}, 144),
        ({"method": "visionzip", "budget": 1 / 9}, 64),
    ],
)
def test_placeholders_per_image(checkpoint, section, kept):
    """K placeholders per 24×24 image: `none` and a budget >= N keep all 576; a ratio is of N (spec §4)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    config.vtprune = section
    assert pruner_for(config).tokens_for([(24, 24)], int(config.text_config.hidden_size)) == kept


def test_engine_start_refuses_in_llm_method(checkpoint):
    """`LLM(...)` with an in-LLM method fails at start-up (a fresh process, as `vllm serve` would) and the
    error output carries the plugin's reason."""
    import subprocess
    import sys

    code = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM({str(checkpoint)!r}, dtype='float32', max_model_len=1024, enforce_eager=True,\n"
        "        hf_overrides={'vtprune': {'method': 'fastv', 'budget': 64}})\n"
    )
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert "vtprune serving cannot run 'fastv': it acts at ['llm:2']" in proc.stdout + proc.stderr
