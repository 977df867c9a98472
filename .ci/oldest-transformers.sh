#!/usr/bin/env bash
# The engine / adapter / oracle tests on the OLDEST transformers vtprune supports (the lower bound of the
# `transformers` range in pyproject.toml; the README's test command covers the newest).
#
# The virtualenv is built once and reused while its stamp matches: it sits on top of the current Python's
# packages (--system-site-packages: torch, vtprune's editable install, test tools) and only overrides
# transformers (and whatever that release pins).  Location: $VTPRUNE_OLDEST_VENV, default
# ~/.cache/vtprune/venv-oldest-transformers.
set -euo pipefail
cd "$(dirname "$0")/.."

oldest=$(python - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in deps if re.match(r"transformers\b", d))
print(re.search(r">=\s*([0-9.]+)", spec).group(1))
PY
)
venv=${VTPRUNE_OLDEST_VENV:-$HOME/.cache/vtprune/venv-oldest-transformers}
stamp="transformers==$oldest $(python -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)')"
if [[ ! -f "$venv/vtprune-stamp" || "$(cat "$venv/vtprune-stamp")" != "$stamp" ]]; then
    echo "building $venv ($stamp)"
    rm -rf "$venv"
    python -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q "transformers==$oldest"
    echo "$stamp" > "$venv/vtprune-stamp"
fi
"$venv/bin/python" - "$oldest" <<'PY'
import sys, transformers
assert transformers.__version__.startswith(sys.argv[1]), (transformers.__version__, sys.argv[1])
print(f"oldest supported transformers: {transformers.__version__}")
PY
# engine, adapter and oracle tests (every family's adapter file, the shared oracle suite, the compat regressions)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_transformers_compat.py tests/test_engine_oracles.py tests/test_method_oracles.py \
    tests/test_api_errors.py tests/test_signals.py tests/test_rcp_inference.py tests/test_adapter_*.py "$@"
