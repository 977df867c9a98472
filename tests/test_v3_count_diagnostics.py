"""benchmarks/v3_count_diagnostics.py on a tiny random v3 model."""

import numpy as np
import torch
from torch import nn

from scripts import benchmark_script
from vtprune.testbed.data_v3 import build_model
from vtprune.testbed.train_v3 import TINY_V3


def _module():
    return benchmark_script("v3_count_diagnostics")


def test_even_attention_splits_by_what_the_keys_show():
    """With every query projection zeroed, the answer position attends evenly to its p + 1 causal keys: `<s>` gets
    1 / (p + 1), the asked column's centre patches (number of centres) / (p + 1), and the parts add up to 1."""
    diag = _module()
    model = build_model(TINY_V3, seed=0).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
    model.set_attn_implementation("eager")
    out = diag.head_attention(model, layer=1, head=0, questions=6)
    _, rows, pos, chan, count = diag.count_batch(model, 6)
    keys = pos.numpy() + 1.0
    np.testing.assert_allclose(out["bos"], 1 / keys, rtol=1e-4)
    np.testing.assert_allclose(out["centre"], count.numpy() / keys, rtol=1e-4)  # no two centres share a patch here
    np.testing.assert_allclose(sum(out[p] for p in diag.PARTS), 1.0, rtol=1e-5)
    assert (out["target_other"] > 0).any() and (out["text"] > 0).all()
    np.testing.assert_array_equal(out["count"], count.numpy())


def test_tower_counts_sum_the_centre_probabilities():
    diag = _module()
    model = build_model(TINY_V3, seed=0).eval()
    head = nn.Linear(model.config.vision_config.hidden_size, 10)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-3.0)
    out = diag.tower_counts(model, head, questions=4)
    np.testing.assert_allclose(out["summed"], 576 * torch.sigmoid(torch.tensor(-3.0)).item(), rtol=1e-5)
    np.testing.assert_array_equal(out["marked"], 0)


def test_the_count_is_read_off_the_sink_weight_the_run_trained(capsys):
    """A head at its target, w / (w + k) on `<s>`, is read right with the run's w, and wrong with another."""
    diag = _module()
    k = np.arange(10).repeat(2)
    for w in (1.0, 4.0):
        bos = w / (w + k)
        r = {part: np.zeros(len(k)) for part in diag.PARTS} | {"count": k, "bos": bos, "centre": 1 - bos}
        diag._report_head(r, w)
        assert "right 1.00, within one 1.00" in capsys.readouterr().out
    diag._report_head(r, 1.0)  # w = 4's attention read as if w were 1
    assert "right 1.00" not in capsys.readouterr().out.splitlines()[0]
