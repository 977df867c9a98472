"""The default built-in model is named once (`vtprune.shipped.DEFAULT_BUILTIN`), ships with the package, and is
used by `load_builtin`, the `eval` / `compare` / `run` / `show` / `calibrate-dcp` defaults and `vtprune demo`; a
missing built-in model is reported in one line naming the built-in models that exist and, when it has a recipe (the
v3 model), the commands that create it."""

from __future__ import annotations

import inspect

import pytest

import vtprune.shipped as shipped
from vtprune.cli import build_parser, main
from vtprune.testbed import builtin


def test_the_default_is_shipped_and_used_everywhere():
    assert shipped.DEFAULT_BUILTIN in shipped.builtin_names()  # never a default the package cannot load
    assert inspect.signature(builtin.load_builtin).parameters["name"].default == shipped.DEFAULT_BUILTIN
    parser = build_parser()
    one_image = ["--image", "x.png", "--prompt", "what colour?"]
    for command in (["eval"], ["compare"], ["run", *one_image], ["show", *one_image],
                    ["calibrate-dcp", "--images", "d"]):
        assert parser.parse_args(command).model == "builtin:" + shipped.DEFAULT_BUILTIN, command
    assert parser.parse_args(["demo"]).model is None  # run_demo picks DEFAULT_BUILTIN (test_eval_cli, demo)


@pytest.mark.parametrize("command", [["eval", "--method", "pool"], ["compare", "--methods", "pool"]])
def test_a_missing_model_with_a_recipe_is_one_line_with_the_recipe(monkeypatch, capsys, command):
    monkeypatch.setattr(builtin, "builtin_names", lambda: ["shapes-llava"])  # the v3 model missing in any state
    monkeypatch.setattr(shipped, "builtin_names", lambda: ["shapes-llava"])
    assert main([*command, "--model", "builtin:shapes-v3-llava"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1
    assert "model not found: builtin:shapes-v3-llava (built-in models: shapes-llava;" in err[0]
    assert "create it with: vtprune testbed recipe --out" in err[0] and "vtprune.testbed.card" in err[0]


def test_another_missing_builtin_lists_what_exists(monkeypatch, capsys):
    monkeypatch.setattr(builtin, "builtin_names", lambda: ["shapes-llava"])
    monkeypatch.setattr(shipped, "builtin_names", lambda: ["shapes-llava"])
    assert main(["eval", "--model", "builtin:nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("model not found: builtin:nope (built-in models: shapes-llava)")
