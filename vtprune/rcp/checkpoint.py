"""RCP artefacts (spec rcp.md §E "Saved artefacts", Our decision): `rcp_plugins.safetensors` (keys
`pruner.{ℓ}.*`, `context.*`, `dra.{r}.*`) and `rcp_config.json`.

Config keys: format, base_model {id, revision}, model_class, hidden_size, num_layers, n_visual, grid, d_prime,
n_queries, heads, bottleneck, pos_dim, dropout, query_dropout, pruning_layers, repair_layers, source_map,
budget (layer-averaged tokens), rho, loss_weights {task, repair, sparse}, alpha, tau_eval, theta, delta,
steps, seed, vtprune_version, plus free-form `training` / `calibration` records.

`load_checkpoint(dir, model)` refuses a checkpoint made for another architecture (model class, LLM hidden
size or number of decoder layers differ) with an error naming both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UnsupportedModelError, VtpruneError
from .modules import RCPPlugins
from .placement import Placement

WEIGHTS_NAME = "rcp_plugins.safetensors"
CONFIG_NAME = "rcp_config.json"
FORMAT = "vtprune-rcp/1"


def model_signature(model) -> dict:
    """{model_class, hidden_size, num_layers} of an HF vision-language model."""
    from ..models import adapter_for

    tc = adapter_for(model).text_config
    return {
        "model_class": type(model).__name__,
        "hidden_size": int(tc.hidden_size),
        "num_layers": int(tc.num_hidden_layers),
    }


def save_checkpoint(out_dir: str | Path, plugins: RCPPlugins, config: dict, dtype: torch.dtype | None = None) -> Path:
    """Write the two artefact files into `out_dir` (created).  dtype: store weights in this dtype (e.g.
    torch.float16 for a small committed checkpoint); None keeps fp32.  -> out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in plugins.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    full = {"format": FORMAT, **plugins.config(), **config}
    (out / CONFIG_NAME).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out


def read_config(path: str | Path) -> dict:
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.exists():
        raise VtpruneError(f"no RCP checkpoint at {path} (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = json.loads(file.read_text())
    if cfg.get("format") != FORMAT:
        raise VtpruneError(f"{file} is not an RCP checkpoint of format {FORMAT} (format={cfg.get('format')!r})")
    return cfg


def plugins_from_config(cfg: dict) -> RCPPlugins:
    """Freshly initialised plug-ins with the checkpoint's sizes and placement."""
    placement = Placement.from_dict(cfg)
    return RCPPlugins(
        int(cfg["hidden_size"]),
        placement,
        d_prime=int(cfg["d_prime"]),
        n_queries=int(cfg["n_queries"]),
        heads=int(cfg["heads"]),
        bottleneck=int(cfg["bottleneck"]),
        grid=int(cfg["grid"]),
        pos_dim=int(cfg["pos_dim"]),
        dropout=float(cfg["dropout"]),
        query_dropout=float(cfg["query_dropout"]),
    )


def check_compatible(cfg: dict, model, source: str = "the checkpoint") -> None:
    """Raise `UnsupportedModelError` when `model` is not the architecture the checkpoint was trained for."""
    have = model_signature(model)
    want = {k: cfg.get(k) for k in have}
    if have != want:
        raise UnsupportedModelError(
            f"{source} was trained for {want['model_class']} (LLM hidden size {want['hidden_size']}, "
            f"{want['num_layers']} decoder layers), but this model is {have['model_class']} (hidden size "
            f"{have['hidden_size']}, {have['num_layers']} layers); train RCP for this model with `vtprune train-rcp`"
        )


def load_checkpoint(path: str | Path, model=None, device=None) -> tuple[RCPPlugins, dict]:
    """(plug-ins in eval mode, fp32, on `device` or the model's device; config).  With `model`, the
    architecture is checked first (`check_compatible`)."""
    path = Path(path)
    cfg = read_config(path)
    if model is not None:
        check_compatible(cfg, model, f"RCP checkpoint {path}")
        device = device or next(model.parameters()).device
    plugins = plugins_from_config(cfg)
    state = load_file(str(path / WEIGHTS_NAME))
    plugins.load_state_dict({k: v.float() for k, v in state.items()})
    return plugins.to(device or "cpu").eval(), cfg
