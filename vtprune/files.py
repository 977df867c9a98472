"""Readers of user-supplied files that fail with one `VtpruneError` line naming the file, the line or field
and what was expected (JSONL samples, images). Sizes are bounded before anything large is read."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import VtpruneError

#: Largest JSONL file / line accepted (bytes).
MAX_JSONL_BYTES = 2**30
MAX_LINE_BYTES = 2**20
#: Largest image accepted (pixels), checked from the header before decoding.
MAX_IMAGE_PIXELS = 64_000_000

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "an object"}


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def read_jsonl(path: str | Path, required: dict[str, tuple[type, ...]], optional: dict | None = None) -> list[dict]:
    """Rows of a JSONL file (one JSON object per line; blank lines skipped).

    required / optional: {field: accepted Python types}. Raises `VtpruneError` "FILE:LINE: ..." for a line that
    is not strict JSON (NaN/Infinity refused), not an object, lacks a required field or has a field of the wrong
    type; "FILE: ..." for a missing, unreadable, oversized or empty file."""
    path = Path(path)
    optional = optional or {}
    try:
        size = path.stat().st_size
    except OSError as err:
        raise VtpruneError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not path.is_file():
        raise VtpruneError(f"{path}: not a file (expected a JSONL file, one JSON object per line)")
    if size > MAX_JSONL_BYTES:
        raise VtpruneError(f"{path}: {size} bytes, more than the {MAX_JSONL_BYTES} a JSONL file may have")
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            if len(raw) > MAX_LINE_BYTES:
                raise VtpruneError(f"{where}: line of {len(raw)} bytes (at most {MAX_LINE_BYTES})")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise VtpruneError(f"{where}: not UTF-8 text (expected one JSON object per line)") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text, parse_constant=_reject_constant)
            except (ValueError, RecursionError) as err:
                raise VtpruneError(f"{where}: not valid JSON ({err}); expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise VtpruneError(f"{where}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise VtpruneError(f"{where}: missing field(s) {missing} (required: {list(required)})")
            for k, types in {**required, **optional}.items():
                v = row.get(k)
                if k in row and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
                    want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
                    raise VtpruneError(f"{where}: field {k!r} must be {want}, got {json.dumps(row[k])[:60]}")
            row["_line"] = line_no
            rows.append(row)
    if not rows:
        raise VtpruneError(f"{path}: holds no samples (empty file); expected one JSON object per line")
    return rows


def check_image(path: str | Path, where: str) -> Path:
    """`path` exists and has an image header of a bounded size (not decoded); `where` prefixes the error."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise VtpruneError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise VtpruneError(f"{where}: {path} is not a readable image ({err})") from None
    if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
        raise VtpruneError(f"{where}: image {path} is {w}×{h} pixels (at most {MAX_IMAGE_PIXELS} pixels)")
    return path


def open_image(path: str | Path, where: str):
    """The decoded RGB image, any failure as one `VtpruneError` naming the file."""
    from PIL import Image

    check_image(path, where)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise VtpruneError(f"{where}: {path} is not a readable image ({err})") from None
