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


@pytest.fixture(scope="session")
def v3_dir(tmp_path_factory):
    """A saved, untrained v3 model (the v3 geometry and vocabulary, a 32-layer decoder, every width tiny: fast to
    score) with the v3 processor: a v3 checkpoint as the CLI sees one."""
    from factories import tiny_testbed_size

    from vtprune.testbed import data_v3

    path = tmp_path_factory.mktemp("tiny-v3")
    data_v3.build_model(tiny_testbed_size(text_layers=32), seed=0).save_pretrained(path)
    data_v3.build_processor().save_pretrained(path)
    return path
