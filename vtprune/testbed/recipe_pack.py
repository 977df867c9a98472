"""A recipe's finished phases as a small folder that survives a change of machine (a *pack*).

`vtprune testbed recipe` runs for about 14 hours; a machine that is lent for a few hours at a time keeps its
processes for one session and sometimes not even its disk. A pack holds what a resume on another machine needs
from `recipe_v3.run_recipe`'s output folder: the records of every finished run (`train_config.json`,
`train_summary.json`, the done markers, the lineage files) and only the models a later phase reads (the chain's
tower model, every soup, Stage C's model, the result), never trainer states, feature caches, logs, branch weights
already averaged into a soup, or a phase still running. Written with the run, it grows by one model (about 2.4 MB
stored in fp16) per finished phase, which a version-control commit can carry.

    vtprune testbed recipe --out runs/recipe --pack benchmarks/recipe-progress   # refreshes the pack as it goes
    # on a fresh machine the same command copies the pack into the missing --out and goes on from there

`PACK.json` (written after the files) lists every file with its size and sha256; a restore checks them all
before it copies anything. The files are JSON and safetensors: nothing in a pack is unpickled or executed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from ..checkpointing import dumps_strict, read_json, sha256_file, write_text_atomic
from ..errors import CheckpointError

MANIFEST = "PACK.json"
FORMAT = "vtprune-recipe-pack/1"
#: the run-directory names of the recipe's two round stages (`recipe_v3.run_recipe`)
ROUND_STAGES = ("rounds", "cls-rounds")
#: the kinds of file a pack may hold: records, safetensors weights, the done markers (never a pickle)
SUFFIXES, MARKERS = (".json", ".safetensors", ".txt"), ("PHASE_DONE", "BRANCH_DONE")


def _allowed(rel: PurePosixPath) -> bool:
    return rel.suffix in SUFFIXES or rel.name in MARKERS


def packed_files(out: str | Path) -> list[PurePosixPath]:
    """The files of the recipe folder `out` that a resume elsewhere needs (module docstring), as sorted paths
    relative to `out`."""
    out = Path(out)
    found = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    return [PurePosixPath(rel.as_posix()) for rel in found if _needed(out, PurePosixPath(rel.as_posix()))]


def _needed(out: Path, rel: PurePosixPath) -> bool:
    parts = rel.parts
    if (not _allowed(rel) or "state" in parts or rel.name == "features.safetensors" or rel.name.startswith(".")
            or parts[0] == "grown"):
        return False  # logs, trainer states, feature caches, temporaries; `grown` is rebuilt unless `final` is done
    if parts[0] == "chain" and len(parts) >= 3:
        if not (out / "chain" / parts[1] / "PHASE_DONE").is_file():
            return False  # a phase still running restarts from its beginning elsewhere
        # the small phase's model is only the tower phase's starting point
        return not (parts[1:3] == ("small", "model") and (out / "chain" / "tower" / "PHASE_DONE").is_file())
    if parts[0] in ROUND_STAGES and len(parts) >= 3 and parts[1].startswith("round"):
        round_dir = out / parts[0] / parts[1]
        if parts[2] == "soup":
            return True  # written atomically (`soup.soup_saved`): it exists whole or not at all
        if (round_dir / parts[2] / "BRANCH_DONE").is_file():
            # a finished branch's weights are needed until its round's soup averages them
            return not (len(parts) > 3 and parts[3] in ("model", "model_ema") and (round_dir / "soup").is_dir())
        return False
    if parts[0] in ROUND_STAGES and len(parts) >= 2 and parts[1] == "cls":
        return (out / parts[0] / "cls_stage_c.json").is_file()  # Stage C's model counts once its record exists
    if parts[0] == "final":
        return (out / "final" / "model" / "config.json").is_file()
    return True  # recipe.json, lineage files, Stage C's record, grow_seconds.txt


def _done_markers(files: Iterable[str]) -> set[str]:
    """The files among `files` (relative posix strings) that say a unit of work finished."""
    ends = ("PHASE_DONE", "BRANCH_DONE", "soup/config.json", "cls_stage_c.json", "final/model/config.json")
    return {f for f in files if f.endswith(ends)}


def read_manifest(pack: str | Path) -> dict:
    """The pack's `PACK.json`, checked for its form; CheckpointError (one line) when it is missing or malformed."""
    path = Path(pack) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{pack} is not a recipe pack (no {MANIFEST}; a pack is written by `vtprune testbed "
                              f"recipe --pack DIR`)")
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest (format and files expected)")
    for name, entry in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or name != rel.as_posix():
            raise CheckpointError(f"{path}: file name {name!r} is not a plain relative path inside the pack")
        if not _allowed(rel):
            raise CheckpointError(f"{path}: {name!r} is not a kind of file a pack holds (accepted: "
                                  f"{', '.join(SUFFIXES)} files and {', '.join(MARKERS)})")
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"{path}: entry {name!r} needs an integer size and a sha256 string")
    return manifest


def write_pack(out: str | Path, pack: str | Path) -> int:
    """Bring `pack` up to date with the recipe folder `out`: copy the files `packed_files` lists that the pack
    lacks or holds other bytes of (each through a temporary name), write `PACK.json`, then delete what no longer
    belongs. -> the number of files in the pack. CheckpointError (nothing written) when `out` has no recipe, when the
    pack is of a run with other arguments, or when the pack holds finished work `out` lacks (it came from a run that
    went further: resume from it with a new --out instead of overwriting it)."""
    out, pack = Path(out), Path(pack)
    if not (out / "recipe.json").is_file():
        raise CheckpointError(f"{out} holds no recipe run (no recipe.json) to pack")
    files = packed_files(out)
    names = {f.as_posix() for f in files}
    if (pack / MANIFEST).is_file():
        before = read_manifest(pack)["files"]
        theirs = pack / "recipe.json"
        if theirs.is_file() and theirs.read_bytes() != (out / "recipe.json").read_bytes():
            raise CheckpointError(f"the pack {pack} is of a recipe run with other arguments than {out}'s; "
                                  f"give another --pack")
        ahead = sorted(_done_markers(before) - _done_markers(names))
        if ahead:
            raise CheckpointError(f"the pack {pack} holds finished work {out} lacks ({ahead[0]}, {len(ahead)} in all): "
                                  f"resume from it with a new --out, or give another --pack")
    elif pack.exists() and any(pack.iterdir()):
        raise CheckpointError(f"{pack} exists and is not a recipe pack (no {MANIFEST}); give an empty or new folder")
    entries = {}
    for rel in files:
        src, dest = out / rel, pack / rel
        digest = sha256_file(src)
        if not (dest.is_file() and sha256_file(dest) == digest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        entries[rel.as_posix()] = {"size": src.stat().st_size, "sha256": digest}
    write_text_atomic(pack / MANIFEST, dumps_strict({"format": FORMAT, "files": entries}, indent=1, sort_keys=True)
                      + "\n")
    for path in sorted(pack.rglob("*"), reverse=True):  # deepest first, so emptied folders go too
        rel = path.relative_to(pack).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in entries:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return len(entries)


def restore_pack(pack: str | Path, out: str | Path, check_recipe: Callable[[object], None] | None = None) -> int:
    """Copy the pack into `out`, which must not exist or be empty, after checking every file against `PACK.json`
    (CheckpointError naming the first file that is missing or differs; nothing is copied then) and then passing the
    pack's checked `recipe.json` to `check_recipe` (which raises to refuse it). The copy is made under a temporary
    name beside `out` and renamed. -> the number of files restored."""
    pack, out = Path(pack), Path(out)
    files = read_manifest(pack)["files"]
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} is not empty: a pack is restored only into a new or empty --out")
    for name, entry in sorted(files.items()):
        path = pack / name
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"the pack {pack} is incomplete or changed: {name} is missing or differs from "
                                  f"{MANIFEST} (write it again from the run that made it)")
    if "recipe.json" not in files:
        raise CheckpointError(f"the pack {pack} has no recipe.json")
    if check_recipe is not None:
        check_recipe(read_json(pack / "recipe.json"))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.restore")
    if tmp.exists():
        shutil.rmtree(tmp)
    for name in files:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pack / name, tmp / name)
    if out.exists():
        out.rmdir()  # empty (checked above)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return len(files)
