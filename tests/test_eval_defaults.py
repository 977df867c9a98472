"""The default built-in model is the v3 one, named once (`vtprune.shipped.DEFAULT_BUILTIN`) and used by
`load_builtin`, the `eval` / `compare` defaults and `vtprune demo`; a missing one is reported in one line naming
the command that creates it and the built-in models that exist."""

from __future__ import annotations

import inspect

import pytest

import vtprune.shipped as shipped
from vtprune.cli import build_parser, main
from vtprune.testbed import builtin


def test_the_default_is_the_v3_model():
    assert shipped.DEFAULT_BUILTIN == "shapes-v3-llava"
    assert inspect.signature(builtin.load_builtin).parameters["name"].default == shipped.DEFAULT_BUILTIN
    parser = build_parser()
    for command in (["eval"], ["compare"]):
        assert parser.parse_args(command).model == "builtin:shapes-v3-llava", command
    assert parser.parse_args(["demo"]).model is None  # run_demo picks DEFAULT_BUILTIN (test_eval_cli, demo)


@pytest.mark.parametrize("command", [["eval", "--method", "pool"], ["compare", "--methods", "pool"]])
def test_a_missing_default_model_is_one_line_with_the_recipe(monkeypatch, capsys, command):
    monkeypatch.setattr(shipped, "DEFAULT_BUILTIN", "no-such-default")  # missing in any state of the checkout
    monkeypatch.setattr(builtin, "builtin_names", lambda: ["shapes-llava"])
    monkeypatch.setattr(shipped, "builtin_names", lambda: ["shapes-llava"])
    assert main([*command, "--model", "builtin:no-such-default"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1
    assert "model not found: builtin:no-such-default (built-in models: shapes-llava;" in err[0]
    assert "create it with: vtprune testbed train --preset v3" in err[0] and "vtprune.testbed.card" in err[0]


def test_another_missing_builtin_lists_what_exists(monkeypatch, capsys):
    monkeypatch.setattr(builtin, "builtin_names", lambda: ["shapes-llava"])
    monkeypatch.setattr(shipped, "builtin_names", lambda: ["shapes-llava"])
    assert main(["eval", "--model", "builtin:nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("model not found: builtin:nope (built-in models: shapes-llava)")
