"""Ablation checkpoints of a trained RCP checkpoint, for cards that show what training bought (issue 22).

- `adapter_off`: the trained pruners with every Delayed Repair Adapter switched off (`dra.{r}.a = 0`, so the DRA
  is the identity, spec property 4); same δ.
- `untrained`: the plug-ins the run started from (`train.initial_plugins`: same sizes, placement and seed), with
  its own δ calibrated (`train.calibrate_delta`, mask route) to the same layer-averaged budget on the same
  calibration samples as the trained checkpoint.
- `pruners_opened`: the trained checkpoint with the pruners at some layers opened (β = `OPEN_BETA`: each keeps
  every token that reaches it, spec property 2); everything else, δ included, unchanged. Which pruner costs what.
- `score_term_off`: the trained checkpoint with one learned term of every pruner's logit (spec §B.4-6) switched
  off, `"token_mlp"` (S_t = 0) or `"attention_queries"` (S_a = 0), δ recalibrated as for `untrained`. Which part
  of the trained score costs what.
- `calibration_routes`: those samples, i.e. the trainer's δ hold-out of the training JSONL (`train.split_calibration`
  with the run's seed and `calib_n`), as mask-route batches; `routes_from_jsonl`: any JSONL's questions.

Each writes a normal checkpoint folder (loadable with `vtprune.apply(model, "rcp", budget, checkpoint=DIR)`)
whose config says what it is under `ablation`; the `convergence` record of the trained run is not copied (an
ablation is not a training run).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .checkpoint import load_plugins, read_config, save_checkpoint
from .data import VQA_SUFFIX, Collator, read_examples
from .modules import RCPPlugins
from .train import RCPTrainConfig, batch_to_route, calibrate_delta, initial_plugins, split_calibration

#: config keys that `RCPPlugins.config()` re-creates when saving (not copied from the source config)
_REBUILT = ("format", "weights_sha256", "convergence")
#: β of an opened pruner: its keep logits lie far above any threshold (spec property 2, β = +∞)
OPEN_BETA = 1.0e4
#: the learned terms of a pruner's keep logit z = b + S_a + S_t + β (spec §B.4-6) that `score_term_off` removes
SCORE_TERMS = ("token_mlp", "attention_queries")


def _kept_config(cfg: dict, plugins: RCPPlugins) -> dict:
    return {k: v for k, v in cfg.items() if k not in plugins.config() and k not in _REBUILT}


def derived_from(folder: str | Path, checkpoint: str | Path, kind: str) -> bool:
    """True when `folder` already holds the `kind` ablation of exactly these trained weights."""
    from .checkpoint import CONFIG_NAME

    try:
        have = read_config(Path(folder) / CONFIG_NAME)
        src = read_config(Path(checkpoint) / CONFIG_NAME)
    except Exception:  # absent or unreadable: rebuild it
        return False
    abl = have.get("ablation") or {}
    sha = src.get("weights_sha256")
    return sha is not None and abl.get("kind") == kind and abl.get("source_sha256") == sha


def adapter_off(checkpoint: str | Path, out: str | Path) -> Path:
    """The checkpoint with `a = 0` in every DRA (repair off), same pruners and δ.  -> the new folder."""
    plugins, cfg = load_plugins(checkpoint)
    with torch.no_grad():
        for dra in plugins.dra.values():
            dra.a.zero_()
    extra = _kept_config(cfg, plugins)
    extra["ablation"] = {"kind": "adapter_off", "source": str(checkpoint), "source_sha256": cfg.get("weights_sha256")}
    return save_checkpoint(out, plugins, extra)


def routes_from_jsonl(
    loaded, data: str | Path, suffix: str | None = None, max_length: int = 1024, batch: int = 8, n: int | None = None
) -> list:
    """The first `n` (all) questions of a training-format JSONL as mask-route batches (masks only) on the model of
    `loaded` (`runner.Loaded`); suffix None: the trainer's default."""
    examples = read_examples(data)[:n]
    return _routes(loaded, examples, suffix, max_length, batch)


def _routes(loaded, examples: list, suffix: str | None, max_length: int, batch: int) -> list:
    suffix = suffix if suffix is not None else (VQA_SUFFIX if loaded.chat_template else "")
    collate = Collator(loaded, suffix=suffix, max_length=max_length)
    device = next(loaded.model.parameters()).device
    routes = []
    for i in range(0, len(examples), batch):
        b = collate(examples[i : i + batch])
        b["targets"] = torch.full_like(b["targets"], -100)  # masks only
        routes.append(batch_to_route(loaded.model, b, device))
    return routes


def calibration_routes(loaded, cfg: dict, batch: int = 8) -> list:
    """The δ-calibration samples of a trained checkpoint (its trainer's hold-out of the training data, or its
    `calib_data`) as mask-route batches on the model of `loaded` (`runner.Loaded`)."""
    training = cfg.get("training") or {}
    tcfg = training.get("config") or {}
    data = training.get("data")
    if not data or not Path(data).exists():
        raise ValueError(f"the checkpoint's training data ({data}) is not here; build routes with routes_from_jsonl")
    run_cfg = RCPTrainConfig(
        seed=int(cfg["seed"]), calib_n=int(tcfg.get("calib_n", 500)), calib_data=tcfg.get("calib_data")
    )
    _, held = split_calibration(read_examples(data), run_cfg)
    if not held:
        raise ValueError(f"the checkpoint's training data {data} holds no calibration samples")
    return _routes(loaded, held, tcfg.get("suffix"), int(tcfg.get("max_length", 1024)), batch)


def _recalibrated(cfg: dict, plugins: RCPPlugins, model, routes: list, calib_inner: float, log) -> tuple[dict, dict]:
    """`plugins` (on the model's device) with their own δ for the checkpoint's budget on `routes`.
    -> (the config to save, minus `ablation`; the calibration record {delta, kept, target, evaluations})."""
    calib_cfg = RCPTrainConfig(
        tau_eval=float(cfg.get("tau_eval", 0.2)),
        theta=float(cfg.get("theta", 0.5)),
        calib_inner=calib_inner,
        calib_tol=min(0.02, calib_inner),
    )
    record = calibrate_delta(model, plugins, routes, float(cfg["rho"]), calib_cfg, log=log)
    extra = _kept_config(cfg, plugins)
    extra["delta"] = float(record["delta"])
    extra["calibration"] = {k: v for k, v in record.items() if k != "evaluations"}
    return extra, record


def untrained(
    checkpoint: str | Path, out: str | Path, model, routes: list, calib_inner: float = 0.01, log=print
) -> tuple[Path, dict]:
    """The run's initial plug-ins with their own δ for the checkpoint's budget on `routes` (mask-route batches,
    e.g. `calibration_routes`).  -> (the new folder, the calibration record {delta, kept, target, evaluations})."""
    _, cfg = load_plugins(checkpoint)
    plugins = initial_plugins(cfg).to(next(model.parameters()).device)
    extra, record = _recalibrated(cfg, plugins, model, routes, calib_inner, log)
    extra["ablation"] = {
        "kind": "untrained",
        "source": str(checkpoint),
        "source_sha256": cfg.get("weights_sha256"),
        "seed": int(cfg["seed"]),
    }
    extra = copy.deepcopy(extra)
    return save_checkpoint(out, plugins.cpu(), extra), record


def opened_kind(layers: list[int]) -> str:
    """The `ablation.kind` that `pruners_opened` writes for these layers, e.g. "opened_14_24"."""
    return "opened_" + "_".join(str(x) for x in sorted(layers))


def pruners_opened(checkpoint: str | Path, out: str | Path, layers: list[int]) -> Path:
    """The checkpoint with the pruners at `layers` opened (β = `OPEN_BETA`: each keeps every token that reaches it),
    every other weight and δ unchanged.  -> the new folder."""
    plugins, cfg = load_plugins(checkpoint)
    have = sorted(int(x) for x in plugins.pruner)
    unknown = sorted(set(int(x) for x in layers) - set(have))
    if not layers or unknown:
        raise ValueError(f"no pruner at layer(s) {unknown or layers} to open (this checkpoint prunes at {have})")
    with torch.no_grad():
        for layer in layers:
            plugins.pruner[str(int(layer))].beta.fill_(OPEN_BETA)
    extra = _kept_config(cfg, plugins)
    extra["ablation"] = {
        "kind": opened_kind(layers),
        "source": str(checkpoint),
        "source_sha256": cfg.get("weights_sha256"),
        "layers": sorted(int(x) for x in layers),
    }
    return save_checkpoint(out, plugins, copy.deepcopy(extra))


def score_term_off(
    checkpoint: str | Path, out: str | Path, term: str, model, routes: list, calib_inner: float = 0.01, log=print
) -> tuple[Path, dict]:
    """The checkpoint with one learned term of every pruner's keep logit switched off, δ recalibrated for its budget
    on `routes` (as `untrained`): term "token_mlp" zeroes the token MLP's last layer (S_t = 0, the term that scores a
    token by its content alone, whatever the question); "attention_queries" zeroes `agg` (S_a = 0, the learned
    queries' cross-attention).  -> (the new folder, the calibration record)."""
    if term not in SCORE_TERMS:
        raise ValueError(f"unknown score term {term!r} (accepted: {', '.join(SCORE_TERMS)})")
    plugins, cfg = load_plugins(checkpoint)
    with torch.no_grad():
        for pruner in plugins.pruner.values():
            last = pruner.mlp[-1] if term == "token_mlp" else pruner.agg
            last.weight.zero_()
            last.bias.zero_()
    plugins = plugins.to(next(model.parameters()).device)
    extra, record = _recalibrated(cfg, plugins, model, routes, calib_inner, log)
    extra["ablation"] = {"kind": f"{term}_off", "source": str(checkpoint), "source_sha256": cfg.get("weights_sha256")}
    return save_checkpoint(out, plugins.cpu(), copy.deepcopy(extra)), record
