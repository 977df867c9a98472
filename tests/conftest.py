"""Session-wide fixtures. Every tiny model comes from `factories.tiny` (one instance per configuration per test
session); `models` / `batches` are the LLaVA family of `families.family("llava")`."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models():
    """Tiny 6-layer LLaVA-1.5-geometry models, one per attention implementation (fp32): {"sdpa": m, "eager": m}."""
    from families import family  # imported here: loading conftest must not import vtprune

    return family("llava").models


@pytest.fixture(scope="session")
def batches():
    """Left-padded inputs of `models["sdpa"]`: {1: one prompt (seed 1), 2: two prompts (seed 2)}."""
    from families import family

    return family("llava").batches
