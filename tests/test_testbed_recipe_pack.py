"""`vtprune testbed recipe --pack DIR`: the finished phases' records and needed models in a small folder that a fresh
machine resumes from (tiny sizes). Oracles: a resume from a whole pack trains nothing and gives the same lineage and
the same model bytes; a resume from a pack written mid-run trains only what was missing and ends where the
uninterrupted run ended."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vtprune.checkpointing import sha256_file
from vtprune.cli import main
from vtprune.errors import CheckpointError
from vtprune.testbed.recipe_pack import MANIFEST, packed_files, read_manifest, restore_pack, write_pack
from vtprune.testbed.recipe_v3 import run_recipe

ARGS = {"seed": 3, "rounds": 1, "cls_rounds": 1, "tiny": True, "progress": False}


def _recipe(where: Path, pack: Path, logs: list[str] | None = None) -> Path:
    """The tiny recipe run in `where` with the relative --out `recipe` (so two machines' lineages compare equal);
    -> its folder."""
    cwd = os.getcwd()
    where.mkdir(parents=True, exist_ok=True)
    os.chdir(where)
    try:
        final = run_recipe("recipe", pack=pack, log=(logs if logs is not None else []).append, **ARGS)
        assert final == Path("recipe") / "final"
        return where / "recipe"
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One uninterrupted tiny recipe run with a pack: (its folder, the pack, its log)."""
    root = tmp_path_factory.mktemp("first")
    logs: list[str] = []
    _recipe(root, root / "pack", logs)
    return root / "recipe", root / "pack", logs


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_the_pack_holds_records_and_only_the_models_later_phases_read(first):
    out, pack, logs = first
    files = _files(pack)
    assert files - {MANIFEST} == {p.as_posix() for p in packed_files(out)}
    manifest = read_manifest(pack)["files"]
    assert set(manifest) == files - {MANIFEST}
    assert all(manifest[f]["sha256"] == sha256_file(pack / f) for f in manifest)
    for needed in ("recipe.json", "lineage.json", "grow_seconds.txt", "chain/small/PHASE_DONE",
                   "chain/small/train_summary.json", "chain/tower/model/model.safetensors",
                   "rounds/round1/soup/model.safetensors", "rounds/round1/branch1/BRANCH_DONE",
                   "rounds/round1/branch1/train_summary.json", "rounds/round1/branch1/train_config.json",
                   "cls-rounds/cls/model.safetensors", "cls-rounds/cls_stage_c.json",
                   "cls-rounds/round1/soup/model.safetensors", "final/model/model.safetensors",
                   "final/train_summary.json"):
        assert needed in files, needed
    # no trainer state, feature cache, log, growth temporary, small-phase model or averaged branch weights
    assert not [f for f in files if "/state/" in f or f.endswith((".log", "features.safetensors"))
                or f.startswith(("grown/", "chain/small/model/")) or "/model_ema/" in f or "/branch0/model/" in f]
    assert all(f.endswith((".json", ".safetensors", "_DONE", ".txt")) for f in files)  # nothing to unpickle
    assert sum((pack / f).stat().st_size for f in files) < sum((out / f).stat().st_size for f in _files(out)) / 2
    # refreshed after each finished phase: chain small and tower, a soup, Stage C, a decoder-only soup, the end
    assert sum(line.startswith(f"recipe: pack {pack} refreshed") for line in logs) == 7


def test_a_fresh_machine_resumes_from_the_whole_pack_without_training(first, tmp_path):
    out, pack, _ = first
    shutil.copytree(pack, tmp_path / "pack")
    logs: list[str] = []
    again = _recipe(tmp_path / "machine2", tmp_path / "pack", logs)
    assert logs[0] == f"recipe: {len(read_manifest(pack)['files'])} files of finished phases restored from the pack " \
                      f"{tmp_path / 'pack'}"
    assert not [line for line in logs if "training" in line or "Stage C on" in line]
    assert logs[-2] == "recipe: final done"
    assert (again / "lineage.json").read_bytes() == (out / "lineage.json").read_bytes()
    new = again / "final" / "model" / "model.safetensors"
    assert sha256_file(new) == sha256_file(out / "final" / "model" / "model.safetensors")
    assert _files(tmp_path / "pack") == _files(pack)  # refreshed with nothing new


def test_a_pack_written_mid_run_resumes_where_the_run_stopped(first, tmp_path):
    out, _, _ = first
    # the first run as it stood while the decoder-only round's branch 1 trained (branch 0 done, no soup yet)
    mid = tmp_path / "mid" / "recipe"
    shutil.copytree(out, mid)
    for gone in ("final", "grown", "cls-rounds/round1/soup"):
        shutil.rmtree(mid / gone)
    for gone in ("lineage.json", "grow_seconds.txt", "cls-rounds/lineage.json",
                 "cls-rounds/round1/branch1/BRANCH_DONE"):
        (mid / gone).unlink()
    write_pack(mid, tmp_path / "pack")
    files = _files(tmp_path / "pack")
    assert "cls-rounds/round1/branch0/model_ema/model.safetensors" in files  # not yet averaged into a soup
    assert not [f for f in files if f.startswith(("cls-rounds/round1/branch1/", "final/"))]

    logs: list[str] = []
    again = _recipe(tmp_path / "machine2", tmp_path / "pack", logs)
    assert "soup-rounds: round 1 branch 0 done" in logs and "soup-rounds: Stage C done" in logs
    assert [line for line in logs if "training" in line] == [
        f"soup-rounds: round 1: training 1 branch(es) from {Path('recipe') / 'cls-rounds' / 'cls'}, one thread each"]
    runs = [e["run"] for e in json.loads((again / "lineage.json").read_text())]
    assert runs == [e["run"] for e in json.loads((out / "lineage.json").read_text())]
    # the same seeds from the same parent: the resumed run ends with the uninterrupted run's model
    new = again / "final" / "model" / "model.safetensors"
    assert sha256_file(new) == sha256_file(out / "final" / "model" / "model.safetensors")
    assert "final/model/model.safetensors" in _files(tmp_path / "pack")


def test_a_damaged_pack_is_refused_before_anything_is_copied(first, tmp_path):
    _, pack, _ = first
    damaged = tmp_path / "pack"
    shutil.copytree(pack, damaged)
    soup = damaged / "rounds" / "round1" / "soup" / "model.safetensors"
    data = bytearray(soup.read_bytes())
    data[-1] ^= 1
    soup.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"incomplete or changed: rounds/round1/soup/model.safetensors is "):
        run_recipe(tmp_path / "out", pack=damaged, **ARGS)
    assert not (tmp_path / "out").exists()
    assert main(["testbed", "recipe", "--out", str(tmp_path / "out"), "--pack", str(damaged), "--tiny", "--seed", "3",
                 "--rounds", "1", "--cls-rounds", "1", "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()

    other = tmp_path / "other"
    shutil.copytree(pack, other)
    with pytest.raises(ValueError, match=r"the pack .* is of a recipe run with other arguments: rounds 1 \(now 2\)"):
        run_recipe(tmp_path / "out", pack=other, **{**ARGS, "rounds": 2})
    assert not (tmp_path / "out").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="is not empty: a pack is restored only into a new or empty --out"):
        restore_pack(pack, tmp_path / "busy")
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / MANIFEST).write_text(json.dumps({"format": read_manifest(pack)["format"],
                                                 "files": {"../x": {"size": 1, "sha256": "0"}}}))
    with pytest.raises(CheckpointError, match="is not a plain relative path inside the pack"):
        restore_pack(escaping, tmp_path / "new")
    (escaping / MANIFEST).write_text(json.dumps({"format": read_manifest(pack)["format"],
                                                 "files": {"a/state.pt": {"size": 1, "sha256": "0"}}}))
    with pytest.raises(CheckpointError, match=r"'a/state.pt' is not a kind of file a pack holds \(accepted: .json"):
        restore_pack(escaping, tmp_path / "new")
    with pytest.raises(CheckpointError, match="is not a recipe pack"):
        restore_pack(tmp_path / "busy", tmp_path / "new")


def test_a_pack_ahead_of_the_run_or_of_another_run_is_not_overwritten(first, tmp_path):
    out, pack, _ = first
    behind = tmp_path / "behind"
    shutil.copytree(out, behind)
    shutil.rmtree(behind / "final")
    copy = tmp_path / "pack"
    shutil.copytree(pack, copy)
    before = (copy / MANIFEST).read_bytes()
    with pytest.raises(CheckpointError, match=r"holds finished work .* lacks \(final/model/config.json, 1 in all\)"):
        write_pack(behind, copy)
    (behind / "recipe.json").write_text((out / "recipe.json").read_text().replace('"rounds": 1', '"rounds": 2'))
    with pytest.raises(CheckpointError, match="is of a recipe run with other arguments"):
        write_pack(behind, copy)
    assert (copy / MANIFEST).read_bytes() == before and _files(copy) == _files(pack)
    with pytest.raises(CheckpointError, match="exists and is not a recipe pack"):
        write_pack(out, tmp_path / "behind")
