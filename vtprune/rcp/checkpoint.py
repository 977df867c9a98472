"""RCP artefacts (spec rcp.md §E "Saved artefacts", Our decision): `rcp_plugins.safetensors` (keys
`pruner.{ℓ}.*`, `context.*`, `dra.{r}.*`) and `rcp_config.json`.

Config keys: format, base_model {id, revision}, model_class, hidden_size, num_layers, n_visual, grid, d_prime,
n_queries, heads, bottleneck, pos_dim, dropout, query_dropout, pruning_layers, repair_layers, source_map,
budget (layer-averaged tokens), rho, loss_weights {task, repair, sparse}, alpha, tau_eval, theta, delta,
steps, seed, vtprune_version, plus free-form `training` / `calibration` records, and (since issue 22)
`repair_norm`, `parameters` {plugins, model, ratio} and `convergence` {r_bar, r_k, rho, delta, rel_error,
converged, criteria}.  `write_card` renders the config as OUT/README.md; a checkpoint whose `convergence.converged`
is false says NOT CONVERGED there, and `load_plugins` (hence `vtprune.apply(..., "rcp", checkpoint=DIR)`) warns
once per checkpoint with `RCPConvergenceWarning`.

`load_checkpoint(dir, model)` refuses a checkpoint made for another architecture (model class, LLM hidden
size or number of decoder layers differ) with an error naming both.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpointing import dumps_strict, read_json
from ..errors import UnsupportedModelError, VtpruneError
from .modules import RCPPlugins
from .placement import Placement

WEIGHTS_NAME = "rcp_plugins.safetensors"
CONFIG_NAME = "rcp_config.json"
CARD_NAME = "README.md"
FORMAT = "vtprune-rcp/1"


#: Bounds checked before anything is allocated (a config asking for more is refused, not attempted).
INT_FIELDS = {
    "hidden_size": (1, 65536),
    "num_layers": (1, 1024),
    "d_prime": (1, 65536),
    "n_queries": (1, 4096),
    "heads": (1, 1024),
    "bottleneck": (1, 65536),
    "grid": (1, 1024),
    "pos_dim": (1, 65536),
}
#: Most plug-in parameters a checkpoint may declare (8 GiB of fp32).
MAX_PARAMETERS = 2**31
MAX_WEIGHTS_BYTES = 2**34


def model_signature(model) -> dict:
    """{model_class, hidden_size, num_layers} of an HF vision-language model (its `config.text_config`)."""
    tc = getattr(getattr(model, "config", None), "text_config", None)
    if tc is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.text_config: not a vision-language model RCP supports"
        )
    return {
        "model_class": type(model).__name__,
        "hidden_size": int(tc.hidden_size),
        "num_layers": int(tc.num_hidden_layers),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(out_dir: str | Path, plugins: RCPPlugins, config: dict, dtype: torch.dtype | None = None) -> Path:
    """Write the two artefact files into `out_dir` (created).  dtype: store weights in this dtype (e.g.
    torch.float16 for a small committed checkpoint); None keeps fp32.  -> out_dir.

    Each file is written to a temporary name and moved into place with `os.replace`; the config (written last)
    records the weights' sha256, so a config never silently pairs with other weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in plugins.state_dict().items()}
    tmp_w = out / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_file(state, str(tmp_w), metadata={"format": FORMAT})
    full = {"format": FORMAT, **plugins.config(), **config, "weights_sha256": _sha256(tmp_w)}
    tmp_c = out / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp_c.write_text(dumps_strict(full, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, out / WEIGHTS_NAME)
    os.replace(tmp_c, out / CONFIG_NAME)
    return out


def _bad(file: Path, field: str, expected: str, got: object) -> VtpruneError:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return VtpruneError(f"{file}: field {field!r} must be {expected}, got {shown}")


def _int(cfg: dict, file: Path, key: str, lo: int, hi: int) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(file, key, f"an int in [{lo}, {hi}]", v)
    return v


def _float(cfg: dict, file: Path, key: str, lo: float, hi: float, *, lo_open=False, hi_open=False, optional=False):
    v = cfg.get(key)
    if v is None and optional:
        return None
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise _bad(file, key, f"a finite number in {span}", v)
    return float(v)


def validate_config(cfg: object, file: Path) -> dict:
    """Check every field the loader uses (types, ranges, placement); raise `VtpruneError` naming the field."""
    if not isinstance(cfg, dict):
        raise VtpruneError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("format") != FORMAT:
        raise VtpruneError(f"{file} is not an RCP checkpoint of format {FORMAT} (format={cfg.get('format')!r})")
    for key, (lo, hi) in INT_FIELDS.items():
        _int(cfg, file, key, lo, hi)
    if not isinstance(cfg.get("model_class"), str):
        raise _bad(file, "model_class", "a string (the model class name)", cfg.get("model_class"))
    _float(cfg, file, "dropout", 0.0, 1.0, hi_open=True)
    _float(cfg, file, "query_dropout", 0.0, 1.0, hi_open=True)
    _float(cfg, file, "rho", 0.0, 1.0, lo_open=True)
    _float(cfg, file, "budget", 0.0, 1e9, lo_open=True)
    _float(cfg, file, "delta", -1e6, 1e6, optional=True)
    _float(cfg, file, "theta", 0.0, 1.0, lo_open=True, hi_open=True, optional=True)
    _float(cfg, file, "tau_eval", 0.0, 1e6, lo_open=True, optional=True)
    L = cfg["num_layers"]
    prune, repair, src = cfg.get("pruning_layers"), cfg.get("repair_layers"), cfg.get("source_map")

    def layers(v) -> bool:
        return isinstance(v, list) and bool(v) and all(type(x) is int and 0 <= x < L for x in v)

    if not layers(prune) or len(prune) > L or list(prune) != sorted(set(prune)):
        raise _bad(file, "pruning_layers", f"a non-empty increasing list of decoder layers in [0, {L})", prune)
    if not layers(repair) or list(repair) != sorted(set(repair)):
        raise _bad(file, "repair_layers", f"a non-empty increasing list of decoder layers in [0, {L})", repair)
    if (
        not isinstance(src, dict)
        or sorted(src) != sorted(str(r) for r in repair)
        or not all(type(v) is int and v in prune and v <= int(k) for k, v in src.items())
    ):
        raise _bad(
            file, "source_map", "{repair layer (str): an earlier-or-equal pruning layer} for every repair layer", src
        )
    if "weights_sha256" in cfg and not isinstance(cfg["weights_sha256"], str):
        raise _bad(file, "weights_sha256", "a hex string", cfg["weights_sha256"])
    conv = cfg.get("convergence")
    if conv is not None and not (isinstance(conv, dict) and isinstance(conv.get("converged"), bool)):
        raise _bad(file, "convergence", "null or an object with a boolean 'converged'", conv)
    return cfg


class RCPConvergenceWarning(UserWarning):
    """A checkpoint whose training did not reach its budget (spec rcp.md, amendment 2026-12)."""


_WARNED: set[str] = set()


def convergence_note(cfg: dict) -> str | None:
    """One sentence on a checkpoint that did not reach its budget, else None (converged or not recorded)."""
    conv = cfg.get("convergence")
    if not isinstance(conv, dict) or conv.get("converged") is not False:
        return None
    if "r_bar" not in conv:
        return f"NOT CONVERGED ({conv.get('reason', 'no record')})"
    return (
        f"NOT CONVERGED: training ended at r_bar {conv['r_bar']:.4f} for rho {conv['rho']:.4f} (relative error "
        f"{conv['rel_error']:.1%}) with calibrated delta {conv['delta']:.3f}; the criteria are {conv['criteria']}"
    )


def warn_if_not_converged(cfg: dict, path: Path) -> None:
    """`RCPConvergenceWarning` once per checkpoint folder when its config records a run that did not converge."""
    note = convergence_note(cfg)
    key = str(Path(path).resolve())
    if note is None or key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"RCP checkpoint {path}: {note}; its budget comes from the post-hoc offset, not from training "
        "(continue training it, or report it as not converged)",
        RCPConvergenceWarning,
        stacklevel=3,
    )


def render_card(cfg: dict) -> str:
    """The checkpoint card (markdown) of a config: model, plug-in sizes next to the model's, placement, recipe and
    whether training reached its budget."""
    conv = cfg.get("convergence") or {}
    params = cfg.get("parameters") or {}
    training = cfg.get("training") or {}
    tcfg = training.get("config") or {}
    base = (cfg.get("base_model") or {}).get("id", "?")
    lines = [f"# RCP checkpoint for `{base}`: {cfg['budget']:g} layer-averaged tokens (rho = {cfg['rho']:.4f})", ""]
    note = convergence_note(cfg)
    if note is not None:
        lines += [f"**{note}.** Continue training (the same command with more steps) or report it as such.", ""]
    elif conv:
        lines += [
            f"Converged: training ended at r_bar {conv['r_bar']:.4f} for rho {conv['rho']:.4f} (relative error "
            f"{conv['rel_error']:.1%}), calibrated delta {conv['delta']:.3f} ({conv['criteria']}).",
            "",
        ]
    else:
        lines += ["Convergence was not recorded (a checkpoint from before issue 22).", ""]
    src = ", ".join(f"{r} (from {s})" for r, s in sorted(cfg["source_map"].items(), key=lambda kv: int(kv[0])))
    rows = [
        (
            "model",
            f"{cfg['model_class']}, d = {cfg['hidden_size']}, {cfg['num_layers']} decoder layers"
            + (f", {params['model']:,} parameters" if "model" in params else ""),
        ),
        (
            "plug-ins",
            f"d' = {cfg['d_prime']}, b = {cfg['bottleneck']}, {cfg['n_queries']} queries, {cfg['heads']} heads"
            + (f": {params['plugins']:,} parameters ({100 * params['ratio']:.2f} % of the model)" if params else ""),
        ),
        ("placement", f"pruning layers {cfg['pruning_layers']}; repair layers {src}"),
        (
            "losses",
            f"weights {cfg.get('loss_weights')}, alpha {cfg.get('alpha')}, repair norm "
            f"{cfg.get('repair_norm', 'none (before issue 22)')}",
        ),
        (
            "recipe",
            f"{cfg.get('steps')} steps of {tcfg.get('batch', '?')} x {tcfg.get('grad_accum', '?')} samples x "
            f"{training.get('world_size', '?')} process(es), lr {tcfg.get('lr', '?')}, beta lr "
            f"{tcfg.get('beta_lr', tcfg.get('lr', '?'))}, seed {cfg.get('seed')}, {training.get('n_train', '?')} "
            f"training / {training.get('n_calibration', '?')} calibration samples, {training.get('precision', '?')}",
        ),
        (
            "budget",
            f"delta = {cfg.get('delta', 0.0):.4f}"
            + (
                f"; final r_bar {conv['r_bar']:.4f} (mean of the last {conv['window']} steps), keep per pruner "
                f"{conv['r_k']}"
                if "r_bar" in conv
                else ""
            )
            + (f"; inference r_bar at delta 0: {conv['r_bar_eval_delta0']:.4f}" if "r_bar_eval_delta0" in conv else ""),
        ),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    return "\n".join(lines)


def write_card(path: str | Path) -> Path:
    """Render the folder's `rcp_config.json` into `README.md` beside it.  -> the card's path."""
    path = Path(path)
    cfg = read_config(path)
    card = path / CARD_NAME
    card.write_text(render_card(cfg))
    return card


def read_config(path: str | Path) -> dict:
    """The validated `rcp_config.json` of a checkpoint folder (or the file itself)."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.exists():
        raise VtpruneError(f"no RCP checkpoint at {path} (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    return validate_config(read_json(file, max_bytes=2**22), file)


def plugins_from_config(cfg: dict, device: str | torch.device | None = None) -> RCPPlugins:
    """Freshly initialised plug-ins with the checkpoint's sizes and placement (validate the config first;
    `device="meta"` builds them without allocating)."""
    placement = Placement.from_dict(cfg)
    with torch.device(device) if device is not None else nullcontext():
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
    """Raise `UnsupportedModelError` when `model` is not the architecture the checkpoint was trained for;
    the message names only the fields that differ."""
    have = model_signature(model)
    want = {k: cfg.get(k) for k in have}
    if have != want:
        names = {"model_class": "model class", "hidden_size": "hidden size", "num_layers": "decoder layers"}
        diff = "; ".join(
            f"checkpoint {names[k]} {want[k]}, this model {names[k]} {have[k]}" for k in have if have[k] != want[k]
        )
        raise UnsupportedModelError(
            f"{source} was trained for {want['model_class']}, which differs from this model in {diff}; train RCP "
            "for this model with `vtprune train-rcp`"
        )


def load_plugins(path: str | Path) -> tuple[RCPPlugins, dict]:
    """Validated plug-ins (fp32, CPU, eval mode) and config of a checkpoint folder.  Every problem (config
    fields, sizes, missing / extra / mis-shaped tensors, truncated file, non-finite weights, hash mismatch)
    raises `VtpruneError` naming the file and what was expected; sizes are checked before allocation."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = read_config(path)
    file = (path if path.is_dir() else path.parent) / WEIGHTS_NAME
    warn_if_not_converged(cfg, file.parent)
    cfg_file = file.parent / CONFIG_NAME
    if not file.exists():
        raise VtpruneError(f"no RCP checkpoint at {file.parent} (missing {WEIGHTS_NAME})")
    try:
        skeleton = plugins_from_config(cfg, device="meta")
    except (ValueError, RuntimeError, AssertionError) as err:
        raise VtpruneError(f"{cfg_file}: sizes that do not build the RCP modules ({err})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    n_params = sum(math.prod(s) for s in expected.values())
    if n_params > MAX_PARAMETERS:
        raise VtpruneError(f"{cfg_file}: the sizes ask for {n_params:,} parameters (at most {MAX_PARAMETERS:,})")
    if file.stat().st_size > MAX_WEIGHTS_BYTES:
        raise VtpruneError(f"{file}: {file.stat().st_size} bytes (at most {MAX_WEIGHTS_BYTES})")
    if "weights_sha256" in cfg and _sha256(file) != cfg["weights_sha256"]:
        raise VtpruneError(f"{file} does not match the weights_sha256 recorded in {CONFIG_NAME} (mixed or damaged)")
    try:
        with safe_open(str(file), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise VtpruneError(f"{file}: not a readable safetensors file ({err})") from None
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise VtpruneError(
            f"{file}: tensors do not match {CONFIG_NAME} (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for k, shape in expected.items():
        if found[k] != shape:
            raise VtpruneError(f"{file}: tensor {k!r} has shape {list(found[k])}, expected {list(shape)}")
        if dtypes[k] not in ("F16", "BF16", "F32", "F64"):
            raise VtpruneError(f"{file}: tensor {k!r} has dtype {dtypes[k]}, expected a float dtype")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise VtpruneError(f"{file}: not a readable safetensors file ({err})") from None
    for k, v in state.items():
        if not bool(torch.isfinite(v).all()):
            raise VtpruneError(f"{file}: tensor {k!r} holds NaN or infinite values")
    plugins = plugins_from_config(cfg)
    plugins.load_state_dict({k: v.float() for k, v in state.items()})
    return plugins.eval(), cfg


def load_checkpoint(path: str | Path, model=None, device=None) -> tuple[RCPPlugins, dict]:
    """(plug-ins in eval mode, fp32, on `device` or the model's device; config).  With `model`, the
    architecture is checked first (`check_compatible`)."""
    path = Path(path)
    cfg = read_config(path)
    if model is not None:
        check_compatible(cfg, model, f"RCP checkpoint {path}")
        device = device or next(model.parameters()).device
    plugins, cfg = load_plugins(path)
    return plugins.to(device or "cpu").eval(), cfg
