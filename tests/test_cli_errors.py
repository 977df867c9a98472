"""Honest exit statuses (issue 27, issue 20 finding 7): a user error is one line on stderr and exit status 2 (no
traceback; `--debug` shows it), paths that do not exist say "not found: PATH", empty inputs are refused,
partial results exit 1 with the failures listed, and JSON output is strict."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from vtprune.cli import main
from vtprune.testbed import builtin_names

HAS_BUILTIN = "shapes-llava" in builtin_names()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    from PIL import Image

    Image.new("RGB", (64, 48), (120, 130, 140)).save(root / "img.png")
    (root / "empty.jsonl").write_text("\n")
    (root / "bad.jsonl").write_text('{"image": "a.png", "question": "q", "answer": "a", "type": "colour"}\n{oops\n')
    (root / "nokeys.jsonl").write_text('{"image": "a.png", "question": "q"}\n')
    (root / "noimage.jsonl").write_text(
        '{"id": "x", "image": "gone.png", "question": "q ?", "answer": "red", "type": "colour"}\n'
    )
    return root


CASES = [  # (argv, a phrase the one line must contain)
    (["eval", "--budget", "0"], "positive int"),
    (["eval", "--budget", "1.5"], "(0, 1)"),
    (["eval", "--budget", "abc"], "budget"),
    (["eval", "--method", "tome"], "unknown method 'tome'"),
    (["eval", "--option", "k=3"], "--option k"),
    (["eval", "--option", "novalue"], "KEY=VALUE"),
    (["eval", "--n", "0"], "positive integer"),
    (["eval", "--model", "no/such/model"], "not found: no/such/model"),
    (["eval", "--model", "builtin:nope"], "not found: builtin:nope"),
    (["eval", "--data", "{root}/missing.jsonl"], "not found: {root}/missing.jsonl"),
    (["eval", "--data", "{root}/empty.jsonl"], "empty.jsonl"),
    (["eval", "--data", "{root}/bad.jsonl"], "bad.jsonl"),
    (["eval", "--data", "{root}/nokeys.jsonl"], "nokeys.jsonl"),
    (["compare", "--methods", "pool,fastV"], "unknown method 'fastV'"),
    (["compare", "--budgets", "64,0"], "positive int"),
    (["compare", "--methods", "pool", "--option", "k=3"], "--option k"),
    (["compare", "--methods", "pool", "--option", "fastv.k=3"], "not one of the chosen methods"),
    (["show", "--image", "{root}/nope.png", "--prompt", "x"], "not found: {root}/nope.png"),
    (["show", "--image", "{root}/img.png", "--prompt", "x", "--budget", "0"], "positive int"),
    (["show", "--image", "{root}/img.png", "--prompt", "x", "--methods", "pool@0"], "positive int"),
    (["run", "--image", "{root}/img.png", "--prompt", "x", "--option", "pool.k=1"], "not one of the chosen"),
    (["run", "--image", "{root}/img.png", "--prompt", "x", "--model", "{root}"], "no config.json"),
    (["train-rcp", "--model", "nope", "--data", "x", "--out", "y"], "not found: nope"),
    (["train-rcp", "--model", "builtin:shapes-llava", "--data", "{root}/none.jsonl", "--out", "y"], "not found"),
    (["bench", "--model", "tiny:llava", "--budget", "0"], "positive int"),
    (["bench", "--model", "tiny:llava", "--image-size", "big"], "WxH"),
    (["testbed", "score", "--model", "nope"], "not found: nope"),
    (["testbed", "export", "--out", "x", "--per-type", "-1"], "positive integer"),
    (["calibrate-dcp", "--images", "{root}/no-dir"], "not found"),
    (["hard-subset", "{root}/missing.json"], "not found"),
    (["nosuchcommand"], "invalid choice"),
]


@pytest.mark.parametrize("argv,phrase", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_user_error_is_one_line_and_status_2(files, capsys, argv, phrase):
    argv = [a.format(root=files) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert len(lines) == 1, err
    assert lines[0].startswith("vtprune") and phrase.format(root=files) in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


def test_debug_shows_the_traceback(files, capsys):
    assert main(["eval", "--method", "tome", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UnknownMethodError" in err and err.rstrip().splitlines()[-1].startswith("vtprune")


def test_console_entry_point_prints_no_traceback(files):
    """The real process: status 2, one line, nothing on stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "vtprune.cli", "show", "--image", str(files / "gone.png"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"vtprune: error: image not found: {files / 'gone.png'}"


def test_missing_image_in_jsonl_is_a_user_error(files, capsys):
    assert main(["eval", "--data", str(files / "noimage.jsonl"), "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "gone.png" in err and ("not found" in err or "does not exist" in err) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_strict_json_has_no_nan():
    from vtprune.tables import to_json

    text = to_json({"a": float("nan"), "b": [1.0, float("inf")], "c": (1, 2)})

    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [1.0, None], "c": [1, 2]}
    assert not math.isnan(json.loads(to_json(0.5)))
