"""Start-up cost: `import vtprune` imports neither transformers, the methods nor matplotlib, and `vtprune --help`
answers quickly (issue 27). Each check runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import time

HEAVY = ("transformers", "vtprune.methods", "vtprune.api", "vtprune.models", "matplotlib", "torch")
HELP_BOUND_S = 8.0  # generous: 0.4–0.6 s measured on a loaded 2-core machine; it took 8–54 s before


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, timeout=120)


def test_import_vtprune_is_lazy_and_every_public_name_works():
    code = (
        "import sys, vtprune\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import vtprune.cli, vtprune.eval, vtprune.testbed, vtprune.rcp, vtprune.measurement\n"
        "vtprune.cli.build_parser()\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, ('parser', heavy)\n"
        "names = vtprune.methods()\n"
        "assert 'fastv' in names and callable(vtprune.methods), names\n"
        "import vtprune.methods as sub\n"  # the subpackage import must not shadow the function
        "assert callable(vtprune.methods) and vtprune.methods() == names\n"
        "for name in vtprune.__all__:\n"
        "    assert getattr(vtprune, name) is not None, name\n"
        "from vtprune import apply, pruned, remove, last_run, Stage, KeepPlan, RunRecord\n"
        "from vtprune.methods import method_class\n"
        "import vtprune.testbed.evaluate, vtprune.eval.compare\n"  # submodules named like exported functions
        "from vtprune.testbed import evaluate\n"
        "from vtprune.eval import compare\n"
        "assert callable(evaluate) and callable(compare) and callable(vtprune.testbed.evaluate), evaluate\n"
        "assert callable(vtprune.models.adapter_for) and callable(vtprune.testbed.scenes.make_scene)\n"  # as before
        "assert not hasattr(vtprune, 'no_such_name') and not hasattr(vtprune.testbed, 'no_such_name')\n"
        "assert method_class('pool').name == 'pool'\n"
        "for mod in (vtprune.eval, vtprune.testbed, vtprune.rcp, vtprune.measurement):\n"
        "    for name in mod.__all__:\n"
        "        assert getattr(mod, name) is not None, (mod.__name__, name)\n"
        "print('ok')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_vtprune_help_is_fast_and_lists_every_command():
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vtprune.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "eval", "compare", "run", "show", "bench", "testbed", "train-rcp", "methods"):
        assert command in proc.stdout
    assert elapsed < HELP_BOUND_S, f"vtprune --help took {elapsed:.2f} s"


def test_subcommand_help_still_shows_lazily_added_arguments():
    """train-rcp's and testbed's arguments (whose defaults need the trainer) appear in their own --help."""
    proc = subprocess.run(
        [sys.executable, "-m", "vtprune.cli", "train-rcp", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "--grad-accum" in proc.stdout and "--resume" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "vtprune.cli", "testbed", "score", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "--per-type" in proc.stdout, proc.stderr[-2000:]
