"""DCP-Prune τ_κ tables: validated reading, and the per-user table that `vtprune calibrate-dcp --write` fills.

A table is strict JSON `{"version": 1, "values": {key: {"tau_kappa": finite number >= 0, ...}}}`. The lookup
reads the table shipped in the package (`vtprune/assets/dcp_tau.json`, read-only) and then the per-user table,
whose entries win: `$VTPRUNE_DCP_TAU` if set, else `$XDG_CONFIG_HOME/vtprune/dcp_tau.json` (default
`~/.config/vtprune/dcp_tau.json`). Writes never go into the installed package.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..checkpointing import read_json
from ..errors import VtpruneError

#: Largest τ table accepted (bytes), checked before reading.
MAX_TABLE_BYTES = 4 * 2**20
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def user_tau_path() -> Path:
    """The per-user τ table (`$VTPRUNE_DCP_TAU`, else the XDG config dir)."""
    explicit = os.environ.get("VTPRUNE_DCP_TAU")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "vtprune" / "dcp_tau.json"


def check_tau(value: object, where: str) -> float:
    """A τ_κ read from a file or about to be written: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise VtpruneError(f"{where}: tau_kappa must be a finite number >= 0, got {value!r}")
    return float(value)


def read_tau_table(path: str | Path) -> dict[str, dict]:
    """The validated {key: entry} of one table file; {} when the file does not exist."""
    p = Path(path)
    if not p.exists():
        return {}
    data = read_json(p, max_bytes=MAX_TABLE_BYTES)
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise VtpruneError(f"{p}: expected a JSON object {{'version': 1, 'values': {{...}}}}, got {kind}")
    values = data.get("values", {})
    if not isinstance(values, dict):
        raise VtpruneError(f"{p}: field 'values' must be an object {{model key: {{'tau_kappa': ...}}}}")
    out = {}
    for key, entry in values.items():
        if not isinstance(entry, dict) or "tau_kappa" not in entry:
            raise VtpruneError(f"{p}: values[{key!r}] must be an object with a 'tau_kappa' number")
        check_tau(entry["tau_kappa"], f"{p}: values[{key!r}]")
        out[key] = dict(entry)
    return out


def inside_package(path: Path) -> bool:
    try:
        path.resolve().relative_to(PACKAGE_DIR)
    except ValueError:
        return False
    return True


def write_tau_table(path: str | Path, key: str, tau: float, *, allow_package: bool = False, **meta) -> Path:
    """Add/replace `key` in the table at `path` (atomic replace, strict JSON).  -> path."""
    p = Path(path).expanduser()
    if inside_package(p) and not allow_package:
        raise VtpruneError(
            f"refusing to write the τ table into the installed vtprune package ({p}); write to a user path "
            f"(--write FILE) or the per-user table {user_tau_path()} (--write with no value)"
        )
    tau = check_tau(tau, f"tau for {key!r}")
    data = read_json(p, max_bytes=MAX_TABLE_BYTES) if p.exists() else {}
    if not isinstance(data, dict):
        raise VtpruneError(f"{p}: expected a JSON object, got {type(data).__name__}; not overwritten")
    read_tau_table(p)  # refuse to extend a malformed table
    data.setdefault("version", 1)
    values = data.setdefault("values", {})
    values[key] = {"tau_kappa": tau, **meta}
    data["values"] = dict(sorted(values.items()))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, p)
    return p
