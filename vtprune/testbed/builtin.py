"""Load the shipped checkpoint(s): `builtin:NAME` or any directory saved with `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..shipped import ASSETS, BUILTIN_PREFIX, DEFAULT_BUILTIN, builtin_key, builtin_names, builtin_path

__all__ = ["ASSETS", "BUILTIN_PREFIX", "DEFAULT_BUILTIN", "builtin_key", "builtin_names", "builtin_path",
           "load_builtin", "resolve_model"]


def resolve_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """`builtin:NAME` or a directory -> (LlavaForConditionalGeneration, processor), in eval mode, offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    s = str(name_or_path)
    path = builtin_path(s[len(BUILTIN_PREFIX):]) if s.startswith(BUILTIN_PREFIX) else Path(s)
    if not (path / "config.json").is_file():  # a path, never a hub id: say so instead of a hub message
        from vtprune.errors import VtpruneError

        raise VtpruneError(f"model not found: {s} (expected builtin:NAME or a directory with a config.json)")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), processor


def load_builtin(name: str = DEFAULT_BUILTIN, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor) of a shipped checkpoint: the default one (`vtprune.shipped.DEFAULT_BUILTIN`, the v2 model
    until a v3 model meets issue 21's bar) or a named one, e.g. `load_builtin("shapes-v3-llava")` (the v3 preview)."""
    return resolve_model(BUILTIN_PREFIX + name, dtype=dtype, device=device)
