"""Issue 20, findings 1, 2 and 8: nothing is unpickled from an output folder; training checkpoints are atomic
(kill a real run at several points, including mid-write: it resumes bit-exactly or is refused with one line
saying how to start fresh); `calibrate-dcp --write` never writes into the package."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vtprune import checkpointing as cpt
from vtprune.errors import VtpruneError

SMALL = dict(d_prime=32, bottleneck=32, calib_n=0, batch=1, grad_accum=1, lr=1e-3, save_every=1)


class _Payload:
    """Unpickling this creates a marker file (what an attacker's payload would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path, kind: str) -> None:
    if kind == "torch":
        torch.save({"x": _Payload(marker)}, path)  # torch's zip format with a pickle inside
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 6-layer testbed LLaVA saved with its processor, and a 12-question exported JSONL."""
    from vtprune.testbed import ModelSize, build_model, build_processor, export_jsonl

    root = tmp_path_factory.mktemp("ckpt")
    size = ModelSize(
        vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64, text_width=32, text_layers=6, text_heads=2,
        text_mlp=64,
    )
    build_model(size, seed=0).save_pretrained(root / "model")
    build_processor().save_pretrained(root / "model")
    return root / "model", export_jsonl(root / "data", seed=5, n_per_type=2)


def _train(setup, out: Path, steps: int, **kw):
    from vtprune.rcp.train import RCPTrainConfig, train

    torch.set_num_threads(1)
    cfg = RCPTrainConfig(steps=steps, **{**SMALL, **kw.pop("cfg", {})})
    return train(str(setup[0]), setup[1], out, cfg, device="cpu", progress=False, log=lambda *_: None, **kw)


def _final(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "rcp_plugins.safetensors"))


def _log(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall"} for r in rows]


# --- finding 1: no unpickling ---------------------------------------------------------------------------------
def test_planted_pickles_in_an_rcp_output_folder_are_refused_not_run(setup, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    _train(setup, out, 2, cfg={"stop_after": 1})  # a resumable state at step 1
    folder = cpt.latest(out / "state", "-")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        ["manifest.json", "plugins.safetensors", "trainer.json"]
        + [f"{n}.{e}" for n in ("optimizer", "scheduler", "rng_0") for e in ("json", "safetensors")]
    )
    import shutil

    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    for name in names:
        for kind in ("pickle", "torch"):
            for fix_manifest in (False, True):  # an attacker may also rewrite the manifest's hashes
                shutil.rmtree(out)
                shutil.copytree(pristine, out)
                folder = cpt.latest(out / "state", "-")
                target = folder / name
                _plant(target, marker, kind)
                if fix_manifest and name != "manifest.json":
                    m = json.loads((folder / "manifest.json").read_text())
                    m["files"][name] = {"size": target.stat().st_size, "sha256": cpt.sha256_file(target)}
                    (folder / "manifest.json").write_text(json.dumps(m))
                with pytest.raises(VtpruneError) as err:
                    _train(setup, out, 2)
                assert "\n" not in str(err.value) and str(folder) in str(err.value), (name, kind, err.value)
                assert not marker.exists(), (name, kind, fix_manifest)
    # the old pickle layout (trainer.json + *.pt) is never loaded, whatever trainer.json says
    shutil.rmtree(out)
    (out / "state").mkdir(parents=True)
    (out / "state" / "trainer.json").write_text("{}")
    for name in ("rng_0.pt", "optimizer.pt", "scheduler.pt"):
        _plant(out / "state" / name, marker, "torch")
    with pytest.raises(VtpruneError, match=r"old pickle format .* no longer loads .*to start fresh, pass --fresh"):
        _train(setup, out, 2)
    assert not marker.exists()


def test_planted_pickles_in_rcp_artefacts_and_testbed_folders_are_refused(setup, tmp_path):
    from vtprune.rcp.checkpoint import load_plugins
    from vtprune.testbed.model import TINY
    from vtprune.testbed.train import TrainConfig, feature_cache, train

    marker = tmp_path / "PWNED"
    for name in ("rcp_plugins.safetensors", "rcp_config.json"):
        art = tmp_path / f"art-{name}"
        art.mkdir()
        (art / "rcp_config.json").write_text((Path("vtprune/assets/rcp/shapes-llava/rcp_config.json")).read_text())
        (art / "rcp_plugins.safetensors").write_bytes(
            Path("vtprune/assets/rcp/shapes-llava/rcp_plugins.safetensors").read_bytes()
        )
        _plant(art / name, marker, "torch")
        with pytest.raises(VtpruneError, match=str(art)):
            load_plugins(art)
    # testbed: an old pickle state.pt is refused before anything is loaded; a planted checkpoint file too
    cfg = TrainConfig(size=TINY, steps_a=1, batch_a=2, steps_b=0, save_every=1, cls_steps=0, eval_per_type=1)
    tb = tmp_path / "tb"
    tb.mkdir()
    _plant(tb / "state.pt", marker, "torch")
    with pytest.raises(VtpruneError, match=r"state\.pt is a pickle checkpoint .* no longer loaded"):
        train(tb, cfg, progress=False, log=lambda _: None)
    (tb / "state.pt").unlink()
    cpt.write(tb / "state", 1, cpt.state_files("state", {"st": {"stage": "A", "step": 0}}))
    folder = cpt.latest(tb / "state", "-")
    for name in ("state.json", "state.safetensors"):
        _plant(folder / name, marker, "pickle")
        with pytest.raises(VtpruneError, match="to start fresh"):
            train(tb, cfg, progress=False, log=lambda _: None)
    # the feature cache: a planted file is not unpickled (recomputed instead)
    from vtprune.testbed import build_model

    model = build_model(TINY, seed=0)
    cache = tmp_path / "features.safetensors"
    _plant(cache, marker, "torch")
    feats = feature_cache(model, 3, 2, "cpu", cache, log=lambda _: None)
    assert feats.shape[0] == 2 and feature_cache(model, 3, 2, "cpu", cache, log=print).equal(feats)
    assert not marker.exists()


def test_no_weights_only_false_or_pickle_loads_in_the_package():
    root = Path(__file__).resolve().parent.parent / "vtprune"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "weights_only=False" not in text, path
        assert "pickle.load" not in text and "torch.load(" not in text, path


# --- finding 2: atomic checkpoints --------------------------------------------------------------------------
_RUN = """
import sys, torch
from vtprune.rcp.train import RCPTrainConfig, train
torch.set_num_threads(1)
cfg = RCPTrainConfig(steps=int(sys.argv[4]), **{small!r})
train(sys.argv[1], sys.argv[2], sys.argv[3], cfg, device="cpu", progress=False, log=lambda *_: None)
"""


def _spawn(setup, out: Path, steps: int, delay: float | None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VTPRUNE_TEST_WRITE_DELAY", None)
    if delay:
        env["VTPRUNE_TEST_WRITE_DELAY"] = str(delay)
    code = _RUN.format(small=SMALL)
    return subprocess.Popen(
        [sys.executable, "-c", code, str(setup[0]), str(setup[1]), str(out), str(steps)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() - t0 < timeout, "kill point not reached"
        time.sleep(0.02)


def _tmp_with_files(out: Path, step: int, n: int):
    def cond() -> bool:
        tmps = list((out / "state").glob(f".tmp-step-{step:08d}-*")) if (out / "state").exists() else []
        return any(len(list(t.iterdir())) >= n for t in tmps)

    return cond


KILL_POINTS = {
    "mid-write of the first checkpoint": lambda out: _tmp_with_files(out, 1, 2),
    "mid-write of a later checkpoint": lambda out: _tmp_with_files(out, 3, 4),
    "right after a publish": lambda out: lambda: (out / "state" / "step-00000002").exists(),
    "mid-write of the last checkpoint": lambda out: _tmp_with_files(out, 4, 7),
}


def _kill_and_resume(setup, tmp_path, point: str, reference: Path) -> None:
    """Kill a real training subprocess (SIGKILL) at `point`, then run the same command again (in-process)."""
    out = tmp_path / point.replace(" ", "-")
    proc = _spawn(setup, out, 4, delay=0.25)
    try:
        _wait_for(KILL_POINTS[point](out), proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "rcp_plugins.safetensors").exists()
    _train(setup, out, 4)
    a, b = _final(reference), _final(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), point
    assert _log(out) == _log(reference), point
    assert not list((out / "state").glob(".tmp-*"))  # leftovers of the killed writer are cleaned up


@pytest.fixture(scope="module")
def reference_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    _train(setup, out, 4)
    return out


def test_killed_mid_write_resumes_bit_exactly(setup, tmp_path, reference_run):
    _kill_and_resume(setup, tmp_path, "mid-write of a later checkpoint", reference_run)


@pytest.mark.slow
@pytest.mark.parametrize("point", [p for p in KILL_POINTS if p != "mid-write of a later checkpoint"])
def test_killed_at_other_points_resumes_bit_exactly(setup, tmp_path, reference_run, point):
    _kill_and_resume(setup, tmp_path, point, reference_run)


@pytest.fixture(scope="module")
def stopped_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "run"
    _train(setup, out, 3, cfg={"stop_after": 2})
    return out


@pytest.mark.parametrize("damage", ["truncate", "zero-byte", "delete", "extra", "manifest"])
def test_a_damaged_published_checkpoint_is_refused_with_one_line(setup, tmp_path, stopped_run, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    folder = cpt.latest(out / "state", "-")
    target = folder / "optimizer.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "zero-byte":
        target.write_bytes(b"")
    elif damage == "delete":
        target.unlink()
    elif damage == "extra":
        (folder / "rng_1.json").write_text("{}")
    else:
        (folder / "manifest.json").write_text("{not json")
    with pytest.raises(cpt.CheckpointError) as err:
        _train(setup, out, 3)
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg
    assert msg.endswith(f"to start fresh, pass --fresh (or delete {out / 'state'})")
    summary = _train(setup, out, 3, resume="never")  # --fresh starts over
    assert summary["steps_done"] == 3


def test_pack_round_trips_optimizer_and_rng_state_exactly():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "rng": cpt.rng_state(), "floats": [float("nan"), float("inf"), 0.1, None, True]}
    skeleton, tensors = cpt.pack(state)
    text = json.dumps(skeleton, allow_nan=False)  # strict JSON
    back = cpt.unpack(json.loads(text), tensors, "x")
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(back["opt"])
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert back["floats"][1] == float("inf") and back["floats"][0] != back["floats"][0] and back["floats"][2:] == [
        0.1, None, True
    ]
    import random

    cpt.set_rng_state(back["rng"], "x")
    a = (torch.rand(3), random.random())
    cpt.set_rng_state(back["rng"], "x")
    assert torch.equal(a[0], torch.rand(3)) and a[1] == random.random()


# --- finding 8: calibrate-dcp --write --------------------------------------------------------------------------
def test_tau_writes_go_to_the_user_table_and_never_into_the_package(tmp_path, monkeypatch):
    from vtprune.calibration import dcp as cal
    from vtprune.methods.dcp_prune import TAU_TABLE, DCPPrune, DCPPruneConfig, load_tau_table

    user = tmp_path / "cfg" / "dcp_tau.json"
    monkeypatch.setenv("VTPRUNE_DCP_TAU", str(user))
    before = TAU_TABLE.read_bytes()
    path = cal.write_tau("my/model", 0.42, None, n=3)  # the CLI's `--write` without a value
    assert path == user and TAU_TABLE.read_bytes() == before
    assert load_tau_table()["my/model"]["tau_kappa"] == 0.42  # the lookup honours the user table
    assert DCPPrune(DCPPruneConfig(calibration_key="my/model")).tau == 0.42
    with pytest.raises(VtpruneError, match="refusing to write the τ table into the installed vtprune package"):
        cal.write_tau("my/model", 0.5, TAU_TABLE)
    with pytest.raises(VtpruneError, match=r"tau_kappa must be a finite number >= 0, got -1"):
        cal.write_tau("my/model", -1, user)
    assert TAU_TABLE.read_bytes() == before


def test_write_text_atomic_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    from vtprune.checkpointing import write_text_atomic

    path = tmp_path / "marker"
    write_text_atomic(path, "first\n")
    write_text_atomic(path, "second\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]
