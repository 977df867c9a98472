import pytest
import torch

from vtprune.testing import llava_inputs, tiny_llava

torch.set_num_threads(1)

PROMPTS = {
    1: [([1, 5, 6], [7, 8, 9, 10])],
    2: [([1, 5, 6], [7, 8, 9, 10]), ([1, 2], [17, 18, 19, 20, 21, 22, 23])],
}


@pytest.fixture(scope="session")
def models():
    """Tiny 6-layer LLaVA-1.5-geometry models, one per attention implementation (fp32)."""
    return {attn: tiny_llava(attn=attn, layers=6) for attn in ("sdpa", "eager")}


@pytest.fixture(scope="session")
def batches(models):
    m = models["sdpa"]
    return {b: llava_inputs(m, PROMPTS[b], seed=b) for b in PROMPTS}
