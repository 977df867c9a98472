"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder `ROOT/step-XXXXXXXX/` holding tensors in safetensors files, everything else in
strict JSON, and `manifest.json` ({format, step, files: {name: {size, sha256}}}). It is written into a
temporary folder `ROOT/.tmp-step-XXXXXXXX/` and published with one `os.replace` (a folder rename onto a
name that does not exist yet: atomic), so a killed writer leaves either the previous checkpoint or the
new one, never a mix; older `step-*` folders are deleted after the publish. `latest(ROOT)` checks the
manifest (sizes and hashes) before anything is read and refuses a damaged folder with one line that says
how to start fresh. Nothing is ever unpickled: nested state (optimiser / scheduler state dicts, RNG
states) is split by `pack` into a JSON skeleton and a flat {key: tensor} dict.

Test hook: the environment variable `VTPRUNE_TEST_WRITE_DELAY` (seconds) makes `write` sleep after each
file, so that a test can kill a real run in the middle of a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import CheckpointError, VtpruneError

FORMAT = "vtprune-checkpoint/1"
MANIFEST = "manifest.json"
#: Largest JSON file a checkpoint reader accepts (bytes): bounded before anything is parsed.
MAX_JSON_BYTES = 64 * 2**20
_STEP_DIR = re.compile(r"step-(\d{8})")


# --- strict JSON -------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict(text: str | bytes, where: str) -> object:
    """Parse strict JSON (no NaN / Infinity); raise `VtpruneError` naming `where` and the position."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise VtpruneError(f"{where}: not valid strict JSON ({err})") from None


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> object:
    """Strict JSON from a file, its size checked before it is read.  Errors name the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise VtpruneError(f"{path}: cannot be read ({err.strerror or err})") from None
    if size > max_bytes:
        raise VtpruneError(f"{path}: {size} bytes, larger than the {max_bytes} a JSON file here may have")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise VtpruneError(f"{path}: cannot be read ({err.strerror or err})") from None
    return loads_strict(raw, str(path))


def finite_or_none(obj: object) -> object:
    """A copy of `obj` with every NaN / ±inf float replaced by None (for strict JSON output)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_strict(obj: object, **kwargs) -> str:
    """Strict JSON text (non-finite floats become null)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


# --- nested state <-> (JSON skeleton, flat tensors) ----------------------------------------------------
def pack(obj: object, prefix: str = "t") -> tuple[object, dict[str, torch.Tensor]]:
    """Split nested state (dicts with str/int keys, lists, tuples, tensors, numbers, str, bool, None) into
    a JSON-able skeleton and {key: tensor}.  Non-finite floats are kept as {"__float__": "nan"|"inf"|"-inf"}."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: object) -> object:
        if isinstance(x, torch.Tensor):
            key = f"{prefix}{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"cannot checkpoint a dict key of type {type(k).__name__}")
                items.append([k, walk(v)])
            return {"__dict__": items}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__}")

    return walk(obj), tensors


def unpack(skeleton: object, tensors: dict[str, torch.Tensor], where: str) -> object:
    """Inverse of `pack`; raises `CheckpointError` naming `where` for anything that `pack` cannot write."""

    def bad(what: str):
        return CheckpointError(f"{where}: {what}")

    def walk(x: object, depth: int) -> object:
        if depth > 64:
            raise bad("nested too deeply")
        if isinstance(x, bool) or x is None or isinstance(x, (int, str, float)):
            return x
        if isinstance(x, list):
            return [walk(v, depth + 1) for v in x]
        if isinstance(x, dict) and len(x) == 1:
            (tag, val), = x.items()
            if tag == "__tensor__":
                if not isinstance(val, str) or val not in tensors:
                    raise bad(f"refers to a missing tensor {val!r}")
                return tensors[val]
            if tag == "__float__" and val in ("nan", "inf", "-inf"):
                return float(val)
            if tag == "__tuple__" and isinstance(val, list):
                return tuple(walk(v, depth + 1) for v in val)
            if tag == "__dict__" and isinstance(val, list):
                out = {}
                for item in val:
                    if not (isinstance(item, list) and len(item) == 2) or isinstance(item[0], bool):
                        raise bad("a dict entry is not a [key, value] pair")
                    if not isinstance(item[0], (str, int)):
                        raise bad(f"a dict key must be a string or an int, got {type(item[0]).__name__}")
                    out[item[0]] = walk(item[1], depth + 1)
                return out
        raise bad(f"unexpected value {str(x)[:60]!r} in the state skeleton")

    return walk(skeleton, 0)


# --- writing -------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of the file at `path`, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _test_delay() -> None:
    delay = os.environ.get("VTPRUNE_TEST_WRITE_DELAY")
    if delay:
        time.sleep(float(delay))


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{int(step):08d}"


def write(root: str | Path, step: int, files: dict[str, Callable[[Path], None]], keep: int = 1) -> Path:
    """Write one checkpoint atomically.  files: {file name: writer(path)}; each writer creates its file.
    -> the published folder ROOT/step-XXXXXXXX.  Keeps the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    entries = {}
    for name, writer in files.items():
        if "/" in name or name in (MANIFEST, "") or name.startswith("."):
            raise ValueError(f"bad checkpoint file name {name!r}")
        path = tmp / name
        writer(path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        entries[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        _test_delay()
    manifest = {"format": FORMAT, "step": int(step), "files": entries}
    with open(tmp / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. a finished run re-saved): move it out of the way
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)  # the publish: one atomic rename
    _fsync_dir(root)
    for older in sorted(_published(root))[:-keep] if keep > 0 else []:
        shutil.rmtree(step_dir(root, older), ignore_errors=True)
    return final


def _published(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir())


def clean_temporaries(root: str | Path) -> None:
    """Remove unpublished leftovers of killed writers (`.tmp-*`, `.old-*`)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(p, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------------------
def latest(root: str | Path, fresh_hint: str) -> Path | None:
    """The newest published checkpoint folder under `root`, its manifest verified; None when there is none.
    fresh_hint: how the user starts over (e.g. "pass --fresh"), put into every refusal."""
    root = Path(root)
    steps = _published(root)
    if not steps:
        return None
    folder = step_dir(root, steps[-1])
    verify(folder, fresh_hint)
    return folder


def verify(folder: str | Path, fresh_hint: str) -> dict:
    """Check `folder/manifest.json` against the files (names, sizes, sha256).  -> the manifest."""
    folder = Path(folder)

    def refuse(why: str):
        return CheckpointError(f"checkpoint {folder} is not usable ({why}); to start fresh, {fresh_hint}")

    if not (folder / MANIFEST).is_file():
        raise refuse(f"no {MANIFEST}")
    try:
        manifest = read_json(folder / MANIFEST, max_bytes=2**20)
    except VtpruneError as err:
        raise refuse(str(err)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise refuse(f"{MANIFEST} is not of format {FORMAT}")
    files, step = manifest.get("files"), manifest.get("step")
    if not isinstance(files, dict) or isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise refuse(f"{MANIFEST} lacks a step or a file list")
    if f"step-{step:08d}" != folder.name:
        raise refuse(f"{MANIFEST} names step {step}")
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    if present != set(files):
        raise refuse(f"files {sorted(present ^ set(files))} differ from the manifest")
    for name, entry in files.items():
        path = folder / name
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(
            entry.get("sha256"), str
        ):
            raise refuse(f"{MANIFEST} entry of {name} is malformed")
        if path.stat().st_size != entry["size"]:
            raise refuse(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['size']}")
        if sha256_file(path) != entry["sha256"]:
            raise refuse(f"{name} does not match its sha256 in the manifest")
    return manifest


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file (never pickle); damaged files raise `CheckpointError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))  # unshared copies


def state_files(name: str, obj: object) -> dict[str, Callable[[Path], None]]:
    """Writers for `write`: nested state under `name` as NAME.json + NAME.safetensors."""
    skeleton, tensors = pack(obj)
    return {
        f"{name}.safetensors": lambda p: save_tensors(tensors, p),
        f"{name}.json": lambda p: p.write_text(json.dumps(skeleton, allow_nan=False) + "\n"),
    }


def write_text_atomic(path: str | Path, text: str) -> None:
    """`path` holds `text` or its previous content, never a part: written to a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def json_file(obj: object) -> Callable[[Path], None]:
    """Writer for `write`: strict JSON."""
    return lambda p: p.write_text(dumps_strict(obj, indent=2) + "\n")


def load_state(folder: str | Path, name: str, device: str | torch.device = "cpu") -> object:
    """Nested state written by `state_files(name, ...)` from a verified checkpoint folder."""
    folder = Path(folder)
    tensors = load_tensors(folder / f"{name}.safetensors", device)
    skeleton = read_json(folder / f"{name}.json")
    return unpack(skeleton, tensors, str(folder / f"{name}.json"))


# --- RNG state (JSON + tensors, no pickle) -----------------------------------------------------------
def rng_state() -> dict:
    """torch (CPU, CUDA) and Python RNG states as packable state."""
    import random

    version, internal, gauss = random.getstate()
    state: dict = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: object, where: str) -> None:
    """Restore `rng_state()` output (after `unpack`); malformed state raises `CheckpointError`."""
    import random

    try:
        py = state["python"]  # type: ignore[index]
        random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
        torch.set_rng_state(state["torch"])  # type: ignore[index]
        if "cuda" in state and torch.cuda.is_available():  # type: ignore[operator]
            torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"{where}: malformed RNG state ({err})") from None
