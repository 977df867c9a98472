"""What the package ships beside the code: built-in model directories and the per-model tables keyed by them.

Methods look shipped artefacts up here (DCP-Prune's τ_κ key, RCP's default checkpoint) instead of importing
the testbed. This module imports nothing of vtprune, so any layer may use it.

Layout of `vtprune/assets/`:
    <NAME>/config.json ...        a built-in model, loaded as `builtin:NAME`
    rcp/<NAME>/                   RCP plug-ins trained for `builtin:NAME` (the first budget trained)
    rcp/<NAME>/budgets/<K>/       further RCP plug-ins for it, trained for a layer-averaged budget of K tokens
    dcp_tau.json                  DCP-Prune τ_κ per model key
    published/, arch/             reference tables (validity instrument, FLOPs geometry)
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_PREFIX = "builtin:"
#: The default built-in model (`load_builtin()`, the CLI's `--model` default, `vtprune demo`). It is the v2 model
#: (3-layer decoder) until a v3 model organism (`shapes-v3-llava`, 32-layer decoder, docs/testbed.md "v3") meets
#: its bar (held-out accuracy >= 0.95 overall, >= 0.90 per type, from one command of at most 3 hours); then this
#: line changes. `shapes-v3-llava` is shipped meanwhile as a preview below that bar (its card says where).
DEFAULT_BUILTIN = "shapes-llava"
#: How a built-in model that is not shipped is made (one line for errors), by name.
BUILTIN_RECIPES = {
    # the shipped preview's lineage condensed into one resumable command (`vtprune.testbed.recipe_v3`); the 3-hour
    # `vtprune testbed chain` makes a weaker model (docs/testbed.md, "What a later session runs")
    "shapes-v3-llava": "vtprune testbed recipe --out runs/recipe (resumable, about 14 h on 2 CPU cores), then python "
    "-m vtprune.testbed.card runs/recipe/final --name shapes-v3-llava --lineage runs/recipe/lineage.json",
}
#: RCP plug-ins shipped for built-in models: `assets/rcp/<NAME>/` for `builtin:NAME`
RCP_ASSETS = ASSETS / "rcp"
#: under `assets/rcp/<NAME>/`: one folder per further budget, `budgets/<K>/` for K layer-averaged tokens
RCP_BUDGETS = "budgets"


def builtin_names() -> list[str]:
    """Names of the built-in models shipped in `vtprune/assets/`."""
    if not ASSETS.exists():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").exists())


def builtin_path(name: str) -> Path:
    """Directory of a built-in model; FileNotFoundError naming the available ones."""
    path = ASSETS / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no built-in model {name!r} (available: {builtin_names()})")
    return path


def builtin_key(name_or_path: str) -> str:
    """"builtin:NAME" when `name_or_path` (a model's `name_or_path`) is a shipped model's directory (or already
    "builtin:NAME"), else `name_or_path` unchanged: the key of the per-model tables shipped beside the models."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    try:
        path = Path(name_or_path).resolve()
        if path.parent == ASSETS.resolve() and (path / "config.json").exists():
            return BUILTIN_PREFIX + path.name
    except (OSError, ValueError):
        pass
    return name_or_path


def shipped_rcp_dir(model_name: str | None, weights_name: str) -> Path | None:
    """The RCP checkpoint directory shipped for a built-in model (`builtin:NAME` or its directory), else None."""
    key = builtin_key(model_name) if model_name else ""
    if not key.startswith(BUILTIN_PREFIX):
        return None
    path = RCP_ASSETS / key[len(BUILTIN_PREFIX):]
    return path if (path / weights_name).exists() else None


def shipped_rcp_dirs(model_name: str | None, weights_name: str) -> list[Path]:
    """Every RCP checkpoint directory shipped for a built-in model: `rcp/<NAME>/` first (when it holds weights),
    then `rcp/<NAME>/budgets/<K>/` by increasing K; [] for a model that is not built in."""
    first = shipped_rcp_dir(model_name, weights_name)
    key = builtin_key(model_name) if model_name else ""
    if not key.startswith(BUILTIN_PREFIX):
        return []
    root = RCP_ASSETS / key[len(BUILTIN_PREFIX):] / RCP_BUDGETS
    more = [p for p in root.iterdir() if p.name.isdigit() and (p / weights_name).exists()] if root.is_dir() else []
    return ([first] if first else []) + sorted(more, key=lambda p: int(p.name))
