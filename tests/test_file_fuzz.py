"""Issue 20, findings 6 (and the readers behind 7): fuzz every reader of a user-supplied file — RCP checkpoints
(config JSON + safetensors), DCP τ tables, JSONL sample files (RCP training data, `eval --data`), training
checkpoints (manifest + state). Each mutated file is either read correctly or refused with one `VtpruneError`
line that names the file; never another exception, never a silent NaN, never a huge allocation."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtprune import checkpointing as cpt
from vtprune.errors import VtpruneError

#: 40 examples per fuzz test in the default suite; VTPRUNE_HYPOTHESIS_SCALE=10 runs ten times as many
FUZZ = settings(
    max_examples=40 * int(os.environ.get("VTPRUNE_HYPOTHESIS_SCALE", "1")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _clean_error(fn, file: Path):
    """fn() -> its value, or None when it raised a one-line VtpruneError naming `file` (anything else fails)."""
    try:
        return fn()
    except VtpruneError as err:
        msg = str(err)
        assert "\n" not in msg and str(file) in msg, msg
        return None


def _fresh(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


# --- RCP checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rcp_dir(tmp_path_factory):
    from vtprune.rcp.checkpoint import save_checkpoint
    from vtprune.rcp.modules import RCPPlugins
    from vtprune.rcp.placement import placement_for

    torch.manual_seed(0)
    plugins = RCPPlugins(32, placement_for(6, 64 / 576), d_prime=8, n_queries=2, heads=2, bottleneck=8, pos_dim=8)
    out = tmp_path_factory.mktemp("rcp")
    cfg = {"model_class": "LlavaForConditionalGeneration", "rho": 64 / 576, "budget": 64.0, "delta": -0.5}
    save_checkpoint(out, plugins, cfg)
    return out


def _write_rcp(root: Path, src: Path, cfg: dict | str | None = None, weights: bytes | None = None) -> Path:
    d = _fresh(root)
    config = cfg if cfg is not None else json.loads((src / "rcp_config.json").read_text())
    (d / "rcp_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    (d / "rcp_plugins.safetensors").write_bytes(
        weights if weights is not None else (src / "rcp_plugins.safetensors").read_bytes()
    )
    return d


def test_the_valid_checkpoint_loads(rcp_dir):
    from vtprune.rcp.checkpoint import load_plugins

    plugins, cfg = load_plugins(rcp_dir)
    assert cfg["delta"] == -0.5 and all(torch.isfinite(p).all() for p in plugins.parameters())


_JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(-3, 8), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(-1, 8)),
)
_FIELDS = [
    "hidden_size",
    "num_layers",
    "d_prime",
    "n_queries",
    "heads",
    "bottleneck",
    "grid",
    "pos_dim",
    "dropout",
    "query_dropout",
    "rho",
    "budget",
    "delta",
    "theta",
    "tau_eval",
    "pruning_layers",
    "repair_layers",
    "source_map",
    "model_class",
    "format",
]


@FUZZ
@given(field=st.sampled_from(_FIELDS), value=_JSON_VALUES | st.just("__missing__"))
def test_rcp_config_fields_fuzz(rcp_dir, tmp_path_factory, field, value):
    from vtprune.rcp.checkpoint import load_plugins

    cfg = json.loads((rcp_dir / "rcp_config.json").read_text())
    cfg.pop("weights_sha256")
    if value == "__missing__":
        cfg.pop(field, None)
    else:
        cfg[field] = value
    d = _write_rcp(tmp_path_factory.getbasetemp(), rcp_dir, cfg)
    t0 = time.time()
    out = _clean_error(lambda: load_plugins(d), d)
    assert time.time() - t0 < 5  # sizes bounded before any allocation
    if out is not None:
        plugins, loaded = out
        assert all(torch.isfinite(p).all() for p in plugins.parameters())
        for key in ("delta", "theta", "tau_eval", "rho", "budget"):
            assert loaded.get(key) is None or math.isfinite(loaded[key])


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"format": "vtprune-rcp/1", "delta": NaN}', "not valid strict JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("", "not valid strict JSON"),
    ],
)
def test_rcp_config_not_an_object_or_nan(rcp_dir, tmp_path, text, match):
    from vtprune.rcp.checkpoint import load_plugins

    d = _write_rcp(tmp_path, rcp_dir, text)
    with pytest.raises(VtpruneError, match=match):
        load_plugins(d)


def test_rcp_huge_sizes_are_refused_before_allocation(rcp_dir, tmp_path):
    from vtprune.rcp.checkpoint import load_plugins

    cfg = json.loads((rcp_dir / "rcp_config.json").read_text())
    for key, value, match in [
        ("d_prime", 10**6, r"field 'd_prime' must be an int in \[1, 65536\], got 1000000"),
        ("hidden_size", 65536, "parameters"),  # every size in range, the product is not
    ]:
        big = {**cfg, key: value, "d_prime": 65536 if key == "hidden_size" else value, "bottleneck": 65536}
        with pytest.raises(VtpruneError, match=match):
            load_plugins(_write_rcp(tmp_path, rcp_dir, big))


@FUZZ
@given(cut=st.floats(0.0, 0.999), keep_hash=st.booleans())
def test_rcp_truncated_weights_fuzz(rcp_dir, tmp_path_factory, cut, keep_hash):
    from vtprune.rcp.checkpoint import load_plugins

    raw = (rcp_dir / "rcp_plugins.safetensors").read_bytes()
    cfg = json.loads((rcp_dir / "rcp_config.json").read_text())
    if not keep_hash:
        cfg.pop("weights_sha256")
    d = _write_rcp(tmp_path_factory.getbasetemp(), rcp_dir, cfg, raw[: int(cut * len(raw))])
    with pytest.raises(VtpruneError) as err:
        load_plugins(d)
    assert "\n" not in str(err.value) and str(d) in str(err.value)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "nan", "int"])
def test_rcp_tensor_mismatches(rcp_dir, tmp_path, change):
    from safetensors.torch import load_file, save_file

    from vtprune.rcp.checkpoint import load_plugins

    state = load_file(str(rcp_dir / "rcp_plugins.safetensors"))
    name = sorted(state)[0]
    if change == "missing":
        state.pop(name)
    elif change == "extra":
        state["dra.99.up.weight"] = torch.zeros(2)
    elif change == "shape":
        state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 1)
    elif change == "nan":
        state[name] = state[name].clone()
        state[name].view(-1)[0] = float("nan")
    else:
        state[name] = state[name].long()
    cfg = json.loads((rcp_dir / "rcp_config.json").read_text())
    cfg.pop("weights_sha256")
    d = _write_rcp(tmp_path, rcp_dir, cfg)
    save_file(state, str(d / "rcp_plugins.safetensors"))
    match = {"missing": "missing", "extra": "unexpected", "shape": "has shape", "nan": "NaN", "int": "float dtype"}
    with pytest.raises(VtpruneError, match=match[change]):
        load_plugins(d)


# --- DCP τ tables ---------------------------------------------------------------------------------------------
@FUZZ
@given(
    table=st.one_of(
        _JSON_VALUES,
        st.fixed_dictionaries({"values": st.dictionaries(st.text(max_size=4), _JSON_VALUES, max_size=3)}),
        st.fixed_dictionaries(
            {
                "values": st.dictionaries(
                    st.text(max_size=4), st.fixed_dictionaries({"tau_kappa": _JSON_VALUES}), max_size=3
                )
            }
        ),
    ),
    raw=st.sampled_from(["", "NaN", "Infinity", "-Infinity", "{", None]),
)
def test_tau_table_fuzz(tmp_path_factory, table, raw):
    from vtprune.methods.dcp_prune import load_tau_table

    path = _fresh(tmp_path_factory.getbasetemp()) / "tau.json"
    if raw is None:
        path.write_text(json.dumps(table))
    elif raw in ("NaN", "Infinity", "-Infinity"):
        path.write_text(json.dumps({"values": {"m": {"tau_kappa": 1.0}}}).replace("1.0", raw))
    else:
        path.write_text(raw)
    out = _clean_error(lambda: load_tau_table(path), path)
    if out is not None:
        assert all(math.isfinite(e["tau_kappa"]) and e["tau_kappa"] >= 0 for e in out.values())
    if raw is not None:
        assert out is None


@pytest.mark.parametrize("tau", [-1, "inf", "nan", "0.3", True])
def test_tau_table_refuses_negative_and_non_finite(tmp_path, tau):
    from vtprune.methods.dcp_prune import load_tau_table

    path = tmp_path / "tau.json"
    text = json.dumps({"values": {"m": {"tau_kappa": 0.0}}})
    value = {"inf": "Infinity", "nan": "NaN"}.get(tau, json.dumps(tau))
    path.write_text(text.replace("0.0", value))
    with pytest.raises(VtpruneError, match=str(path)):
        load_tau_table(path)


# --- JSONL sample files ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("jsonl")
    (root / "images").mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "images" / "ok.png")
    (root / "images" / "bad.png").write_bytes(b"not an image")
    return root


_GOOD = {"id": "s0", "image": "images/ok.png", "question": "what ?", "answer": "red", "type": "colour"}


def _line_strategy():
    row = st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(st.text(max_size=4), st.integers()),
            "image": st.sampled_from(["images/ok.png", "images/bad.png", "images/none.png", 3, None]),
            "question": st.one_of(st.text(max_size=6), st.integers(), st.none()),
            "answer": st.one_of(st.text(max_size=4), st.integers(), st.lists(st.integers(), max_size=2)),
            "type": st.one_of(st.text(max_size=4), st.none()),
        },
    ).map(json.dumps)
    good = st.just(json.dumps(_GOOD))
    junk = st.one_of(
        st.sampled_from(["", "   ", "[1]", "{", "NaN", '{"answer": NaN}', "null", "\x00"]),
        good.map(lambda s: s[: len(s) // 2]),
        st.text(max_size=10),
    )
    return st.one_of(good, row, junk)


@FUZZ
@given(lines=st.lists(_line_strategy(), max_size=5), raw_bytes=st.booleans())
def test_jsonl_readers_fuzz(image_root, lines, raw_bytes):
    from vtprune.eval.shapes import read_samples
    from vtprune.rcp.data import read_examples

    path = Path(tempfile.mkstemp(dir=image_root, suffix=".jsonl")[1])
    data = "\n".join(lines).encode()
    path.write_bytes(data + (b"\xff\xfe" if raw_bytes else b""))
    for reader in (read_examples, lambda p: read_samples(p)[0]):
        out = _clean_error(lambda: reader(path), path)  # noqa: B023
        if out is not None:
            assert len(out) >= 1  # an empty file is refused, never "accuracy 0.0"


def test_jsonl_errors_name_the_line_and_what_is_expected(image_root):
    from vtprune.eval.shapes import read_samples
    from vtprune.rcp.data import read_examples

    path = image_root / "t.jsonl"
    cases = [
        ([_GOOD, "{"], r"t\.jsonl:2: not valid JSON"),
        ([{**_GOOD, "question": 3}], r"t\.jsonl:1: field 'question' must be a string, got 3"),
        ([{**_GOOD, "image": "images/none.png"}], r"t\.jsonl:1: image .*none\.png does not exist"),
        ([{**_GOOD, "image": "images/bad.png"}], r"t\.jsonl:1: .*bad\.png is not a readable image"),
        ([_GOOD, {k: v for k, v in _GOOD.items() if k != "answer"}], r"t\.jsonl:2: missing field\(s\) \['answer'\]"),
        ([], r"t\.jsonl: holds no samples \(empty file\)"),
    ]
    for rows, match in cases:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        for reader in (read_examples, read_samples):
            with pytest.raises(VtpruneError, match=match):
                reader(path)
    path.write_text(json.dumps(_GOOD) + "\n")
    assert read_examples(path)[0].image == image_root / "images" / "ok.png"
    samples, root = read_samples(path)
    assert samples == [_GOOD] and root == image_root
    with pytest.raises(VtpruneError, match="no such|cannot be read"):
        read_examples(image_root / "missing.jsonl")


# --- training checkpoints: manifest and state skeletons -------------------------------------------------------
@FUZZ
@given(
    skeleton=st.recursive(
        _JSON_VALUES,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=9), c, max_size=3),
        max_leaves=8,
    )
)
def test_state_skeleton_fuzz(skeleton):
    out = _clean_error(lambda: cpt.unpack(skeleton, {"t0": torch.zeros(1)}, "state.json"), Path("state.json"))
    if out is not None:
        json.dumps(out, default=lambda t: t.tolist())


@FUZZ
@given(
    manifest=st.one_of(
        _JSON_VALUES,
        st.fixed_dictionaries({"format": st.just(cpt.FORMAT), "step": _JSON_VALUES, "files": _JSON_VALUES}),
    )
)
def test_manifest_fuzz(tmp_path_factory, manifest):
    root = _fresh(tmp_path_factory.getbasetemp())
    folder = cpt.write(root, 3, {"a.json": cpt.json_file({"x": 1})})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(cpt.CheckpointError) as err:
        cpt.latest(root, "pass --fresh")
    assert "\n" not in str(err.value) and str(folder) in str(err.value) and str(err.value).endswith("pass --fresh")
