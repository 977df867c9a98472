"""Issue 20, API side: all-or-nothing `apply` (finding 3), typed options (4), right padding with in-LLM methods
(5), and the smaller findings (9): the budget rule, numpy budgets, `train-rcp --budget`, [CLS]-ranked methods on
a tower without [CLS], one patched model used from two threads."""

from __future__ import annotations

import argparse
import threading

import numpy as np
import pytest
import torch
from factories import PROMPTS, tiny

import vtprune
from vtprune.errors import BudgetError, UnsupportedInputError, VtpruneError
from vtprune.testing import IMAGE_TOKEN_ID, llava_inputs


@pytest.fixture(scope="module")
def small():
    """A 4-layer LLaVA with 4×4 = 16 visual tokens per image and a left-padded batch of 2."""
    model = tiny("llava", layers=4, image_size=56)
    return model, llava_inputs(model, PROMPTS, seed=1)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(getattr(m, "_forward_hooks_always_called", {}))
        for m in model.modules()
    )


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# --- finding 3: apply is all-or-nothing -------------------------------------------------------------------
def test_failed_install_undoes_every_registration(small, monkeypatch):
    model, inputs = small
    stock, hooks = _logits(model, inputs), _hook_count(model)
    from vtprune.models.llava import LlavaAdapter

    def broken(self):  # fails after the model-level hooks are registered
        raise RuntimeError("simulated failure inside install()")

    monkeypatch.setattr(LlavaAdapter, "vision_output_modules", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        vtprune.apply(model, "vispruner", 8)
    monkeypatch.undo()
    assert vtprune.session_of(model) is None and "generate" not in model.__dict__
    assert _hook_count(model) == hooks
    assert torch.equal(_logits(model, inputs), stock)  # bit-exact
    vtprune.apply(model, "fastv", 8, budget_mode="retained")  # a later apply + remove works
    assert not torch.equal(_logits(model, inputs)[:, -1], stock[:, -1])
    vtprune.remove(model)
    assert _hook_count(model) == hooks and torch.equal(_logits(model, inputs), stock)


def test_issue_example_fastv_float_k_is_refused_before_any_hook(small):
    model, inputs = small
    stock, hooks = _logits(model, inputs), _hook_count(model)
    with pytest.raises(VtpruneError, match=r"option k=2\.0 \(float\): expected an int >= 1"):
        vtprune.apply(model, "fastv", 400, k=2.0)
    assert vtprune.session_of(model) is None and _hook_count(model) == hooks
    assert torch.equal(_logits(model, inputs), stock)


# --- finding 4: typed options ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options,message",
    [
        ("pool", {"exact": "no"}, r"'pool' option exact='no' \(str\): expected a bool \(True or False\)"),
        ("fastv", {"k": True}, r"'fastv' option k=True \(bool\): expected an int >= 1"),
        ("random", {"seed": "x"}, r"'random' option seed='x' \(str\): expected an int"),
        ("fastv", {"k": "2"}, r"'fastv' option k='2' \(str\): expected an int >= 1"),
        ("fastv", {"criterion": "first"}, r"criterion='first': expected one of \('last_token', 'mean_received'\)"),
        ("fastv", {"r": float("nan")}, r"option r=nan: expected a number >= 0.0 and < 1.0 or None"),
        ("pdrop", {"lam": 0}, r"option lam=0.0: expected a number > 0.0 and <= 1.0"),
        ("vitcop", {"d_c": "far"}, r"d_c='far': expected a number > 0.0 or one of \('auto',\) or None"),
        ("resprune", {"refresh": -1}, r"refresh=-1: expected an int >= 0"),
        ("sparsevlm", {"recycle": 1}, r"recycle=1 \(int\): expected a bool \(True or False\) or None"),
    ],
)
def test_options_are_type_and_range_checked(small, method, options, message):
    model, _ = small
    with pytest.raises(VtpruneError, match=message):
        vtprune.apply(model, method, 8, **options)
    assert vtprune.session_of(model) is None


def test_numpy_and_int_option_values_are_normalised(small):
    model, _ = small
    vtprune.apply(model, "fastv", 8, budget_mode="retained", k=np.int64(2), r=np.float32(0.5))
    cfg = vtprune.session_of(model).method.config
    vtprune.remove(model)
    assert type(cfg.k) is int and cfg.k == 2 and type(cfg.r) is float and cfg.r == 0.5
    from vtprune.methods import build_method

    assert build_method("vispruner", {"important_ratio": 1}).config.important_ratio == 1.0  # int for a float


# --- finding 5: right padding with in-LLM methods ----------------------------------------------------------
def _right_padded(inputs: dict) -> dict:
    """The same prompts with the padding moved to the right."""
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        ids[b] = torch.cat([ids[b, -n:], ids[b, :-n]]) if n < ids.shape[1] else ids[b]
        mask[b] = torch.cat([mask[b, -n:], mask[b, :-n]]) if n < ids.shape[1] else mask[b]
    return {**inputs, "input_ids": ids, "attention_mask": mask}


def test_right_padding_is_refused_for_in_llm_methods_only(small):
    model, inputs = small
    right = _right_padded(inputs)
    assert not torch.equal(right["attention_mask"], inputs["attention_mask"])
    with vtprune.pruned(model, "fastv", 8, budget_mode="retained"):
        _logits(model, inputs)  # left padding: fine
        with pytest.raises(UnsupportedInputError, match=r"sample\(s\) \[0\] have padding after.*padding_side = 'left'"):
            _logits(model, right)
        hit = vtprune.last_run(model)
    assert hit is None or hit.samples  # nothing half-recorded
    with vtprune.pruned(model, "fastv", 400):  # bypass (budget >= N): exact stock run, any padding
        _logits(model, right)
    with vtprune.pruned(model, "random", 8):  # pre-LLM methods handle any padding
        _logits(model, right)
        assert [s.retained_tokens for s in vtprune.last_run(model).samples] == [8, 8]


# --- finding 9: budgets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1.0, 2.0, 64.0, 1.5])
def test_float_budgets_of_one_or_more_are_refused_with_the_rule(small, value):
    model, _ = small
    with pytest.raises(BudgetError, match=r"a float budget is a ratio and must lie in \(0, 1\)"):
        vtprune.apply(model, "pool", value)
    assert vtprune.session_of(model) is None


def test_numpy_budgets_equal_python_budgets(small):
    model, inputs = small
    out = []
    for budget in (8, np.int64(8), np.int32(8), 0.5, np.float32(0.5), np.float64(0.5)):
        with vtprune.pruned(model, "random", budget):
            _logits(model, inputs)
            out.append(vtprune.last_run(model).samples[0].events[0].keep_idx)
    assert all(torch.equal(out[0], o) for o in out)  # 0.5 · 16 = 8 tokens, the same seeded draw


def test_train_rcp_budget_uses_the_apply_rule():
    from vtprune.commands.rcp import _budget
    from vtprune.rcp.train import target_ratio

    assert _budget("64") == 64 and _budget("0.25") == 0.25 and _budget("1/9") == pytest.approx(1 / 9)
    for text in ("1.5", "2.0", "0", "-3", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _budget(text)
    with pytest.raises(BudgetError, match="must lie in"):
        target_ratio(1.5, tiny("llava", layers=4, image_size=56))


# --- finding 9: [CLS]-ranked methods on a tower without [CLS] -----------------------------------------------
def _siglip_llava():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
            patch_size=14,
        ),
        text_config=LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("method", ["vispruner", "visionzip"])
def test_cls_methods_refuse_a_tower_without_cls(method):
    model = _siglip_llava()
    with pytest.raises(UnsupportedInputError, match=r"cls_attention.*SiglipVisionModel has no \[CLS\].*divprune"):
        vtprune.apply(model, method, 8)
    assert vtprune.session_of(model) is None
    inputs = llava_inputs(model, PROMPTS, seed=2)
    with vtprune.pruned(model, "pool", 8):  # methods without [CLS] signals still run
        _logits(model, inputs)


# --- finding 9: one patched model, two threads ----------------------------------------------------------------
def test_second_thread_is_refused_while_a_call_runs_then_works(small):
    model, inputs = small
    inside, release = threading.Event(), threading.Event()
    results: dict = {}

    def wait_in_layer(module, args):
        if threading.current_thread().name == "A":
            inside.set()
            release.wait(30)

    handle = model.model.language_model.layers[0].register_forward_pre_hook(wait_in_layer)
    vtprune.apply(model, "fastv", 8, budget_mode="retained")
    try:

        def run_a():
            results["A"] = _logits(model, inputs)

        a = threading.Thread(target=run_a, name="A")
        a.start()
        assert inside.wait(30)
        with pytest.raises(UnsupportedInputError, match="already running a forward/generate in another thread"):
            _logits(model, inputs)
        with pytest.raises(UnsupportedInputError, match="another thread"):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        release.set()
        a.join(30)
        assert torch.equal(_logits(model, inputs), results["A"])  # afterwards the main thread runs normally
    finally:
        release.set()
        handle.remove()
        vtprune.remove(model)


def test_fewer_tokens_than_images_is_a_budget_error_not_an_internal_one(small):
    """Found by the batch-mix property test: budget 1 on a prompt with two images used to fail inside the engine
    ("invalid schedule [0]"); it is a `BudgetError` naming the sample and the smallest budget."""
    model, _ = small
    inputs = llava_inputs(model, [([1, 5], [7, 8])], images=2, seed=3)
    with vtprune.pruned(model, "random", 1):
        with pytest.raises(BudgetError, match=r"cannot keep one token of each of the 2 images of sample 0; .* 2"):
            _logits(model, inputs)
    with vtprune.pruned(model, "random", 2):
        _logits(model, inputs)
        assert [len(e.keep_idx) for e in vtprune.last_run(model).samples[0].events] == [2]


def test_plots_without_matplotlib_fail_in_one_line(monkeypatch):
    """`vtprune demo` / `compare` without the [demo] extra: a `VtpruneError` saying what to install."""
    import sys

    from vtprune.eval.compare import plot_compare

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(VtpruneError, match=r"plots need matplotlib.*pip install 'vtprune\[demo\]'"):
        plot_compare([], "x.png")


def test_deep_copies_run_in_two_threads_at_once(small):
    """The supported way to use threads: one patched model per thread (a deep copy gets its own session/guard)."""
    import copy

    model, inputs = small
    vtprune.apply(model, "fastv", 8, budget_mode="retained")
    try:
        other = copy.deepcopy(model)
        ref = _logits(model, inputs)
        results: dict = {}
        start = threading.Barrier(2)

        def run(m, key):
            start.wait(30)
            for _ in range(3):
                results[key] = (_logits(m, inputs), m.generate(**inputs, max_new_tokens=2, do_sample=False))

        threads = [threading.Thread(target=run, args=(m, k)) for k, m in enumerate((model, other))]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert torch.equal(results[0][0], ref) and torch.equal(results[1][0], ref)
        assert torch.equal(results[0][1], results[1][1])
        vtprune.remove(other)
        assert "generate" not in other.__dict__
    finally:
        vtprune.remove(model)
