"""Load the shipped checkpoint(s): `builtin:NAME` or any directory saved with `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_PREFIX = "builtin:"


def builtin_names() -> list[str]:
    """Names of the checkpoints shipped in `vtprune/assets/`."""
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").exists()) if ASSETS.exists() else []


def builtin_path(name: str) -> Path:
    """Directory of a shipped checkpoint."""
    path = ASSETS / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no built-in model {name!r} (available: {builtin_names()})")
    return path


def builtin_key(name_or_path: str) -> str:
    """"builtin:NAME" when `name_or_path` (a model's `name_or_path`) is a shipped checkpoint's directory, else
    `name_or_path` unchanged: the key of the per-model tables shipped beside the models (DCP-Prune's τ_κ,
    RCP's default checkpoint)."""
    try:
        path = Path(name_or_path).resolve()
        if path.parent == ASSETS.resolve() and (path / "config.json").exists():
            return BUILTIN_PREFIX + path.name
    except (OSError, ValueError):
        pass
    return name_or_path


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


def load_builtin(name: str = "shapes-llava", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor) of a shipped checkpoint, e.g. `load_builtin("shapes-llava")`."""
    return resolve_model(BUILTIN_PREFIX + name, dtype=dtype, device=device)
