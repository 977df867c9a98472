"""The README's first "Use" example (on `builtin:shapes-llava`) runs offline as written (issue 27)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_builtin_example_runs_offline():
    text = README.read_text()
    use = text[text.index("## Use") :]
    code = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    assert 'load_builtin("shapes-llava")' in code and "from_pretrained" not in code  # the offline one comes first
    torch.set_num_threads(1)
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    lines = out.getvalue().splitlines()
    assert "expected:" in lines[0]
    retained, layer_avg = lines[1].split()[:2]
    assert int(retained) == 64 and float(layer_avg) == 64.0
    import vtprune

    assert vtprune.session_of(scope["model"]) is None  # removed again after the `with` block
