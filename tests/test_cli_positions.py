"""`--positions` accepts one rule per stage (what ViTCoP's preset="reference" needs) and refuses anything else in
one line."""

from __future__ import annotations

import pytest

from vtprune.cli import build_parser, main


@pytest.mark.parametrize("value", ["keep", "reindex", "reindex,keep,reindex", "keep,keep,reindex"])
def test_positions_accepts_rules_and_per_stage_lists(value):
    assert build_parser().parse_args(["eval", "--positions", value]).positions == value
    argv = ["run", "--image", "x.png", "--prompt", "q", "--positions", value]
    assert build_parser().parse_args(argv).positions == value


@pytest.mark.parametrize("value", ["", "keep,", "orig", "keep,bad"])
def test_positions_refuses_other_values_in_one_line(value, capsys):
    assert main(["eval", "--positions", value]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--positions" in err[0] and "reindex,keep,reindex" in err[0]
