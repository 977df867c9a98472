"""On an accelerator every host read of a device tensor (`nonzero`, `tolist`, `item`, `bool(t)`, a copy to the
CPU) stalls the launch queue; an H200 profile showed the in-LLM cut doing several per image (BENCHMARKS.md, GPU).
The engine's selection and cut code must read the host a fixed number of times per stage, whatever the batch."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from families import family

import vtprune

CUT_FILES = ("engine/select.py", "engine/in_llm.py", "engine/pre_llm.py", "engine/sequence.py")
READS = ("nonzero", "tolist", "item", "__bool__", "__int__", "cpu")


def _host_reads(model, inputs) -> collections.Counter:
    """Host reads made from the cut files during one prefill, by (kind, file:line)."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def site() -> str | None:
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = frame.filename.replace("\\", "/")
            if "/vtprune/" in path:
                rel = path.split("/vtprune/", 1)[1]
                return f"{rel}:{frame.lineno}" if rel in CUT_FILES else None
        return None

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            where = site()
            if where is not None:
                counts[(name, where)] += 1
            return original(self, *args, **kwargs)

        return wrapper

    to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, str) and target.startswith("cpu") and site() is not None:
            counts[("to cpu", site())] += 1
        return to(self, *args, **kwargs)

    try:
        for name in READS:
            setattr(torch.Tensor, name, counting(name))
        torch.Tensor.to = counting_to
        with torch.inference_mode():
            model(**inputs)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.Tensor.to = to
    return counts


@pytest.mark.parametrize("method,budget", [("fastv", 200), ("pdrop", 300), ("random", 64), ("divprune", 64)])
def test_cut_host_reads_do_not_grow_with_the_batch(method, budget):
    fam = family("llava")
    model, batch = fam.models["sdpa"], fam.batches[2]
    one = fam.alone(batch, 1)
    vtprune.apply(model, method, budget)
    try:
        alone, both = _host_reads(model, one), _host_reads(model, batch)
    finally:
        vtprune.remove(model)
    assert sum(alone.values()) > 0  # the counter sees the engine's reads
    assert sum(both.values()) == sum(alone.values()), (alone, both)
