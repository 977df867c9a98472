#!/usr/bin/env bash
# Install a 4-layer v3 model as the preview `builtin:shapes-v3-llava` and re-measure everything measured on it.
#
#   bash benchmarks/v3_install_preview.sh MODEL LINEAGE RUN [DRIFT] > runs/install.log 2>&1 &
#
# MODEL: a 4-layer v3 model directory (e.g. a `vtprune testbed soup-rounds` soup); LINEAGE: a JSON list of the runs
# it went through (the form of benchmarks/lineage/*.json, `card.check_lineage`); RUN: a work directory under runs/;
# DRIFT: Stage C's feature-drift penalty (default 50, the twenty-sixth session's choice on the calibration split), or
# "none": no Stage C (a MODEL whose [CLS] embedding was tuned before its decoder adapted: soup-rounds --cls-drift).
# Steps (docs/testbed.md, twenty-second, twenty-third and twenty-sixth sessions; 70 min on the 2-core machine in the
# twenty-sixth, RCP's three seeds most of it; RCP's default recipe is 900 steps since the thirtieth session, about
# three times as long: seed 42 alone, then 43 and 44 side by side, about 2 h; then one seed at each of 192, 128 and
# 32 tokens side by side, about 1.5 h more since the thirty-first session): growth to 32 layers ("spread_next") and Stage C; the model card (held-out test, 2,100
# questions) with the lineage extended by the growth; DCP-Prune's tau_kappa (calibration split), its report and
# sweep; RCP's three training seeds at 64 tokens, their combined card and seed 42's checkpoint installed, and one
# checkpoint for each of 192 / 128 / 32 tokens; the compare table at
# 192 / 128 / 64 / 32 / 16 tokens; the generated sections of docs/testbed.md, docs/methods.md and the README.
# Re-run the same command after an interruption: a finished step (RUN/done-STEP) is skipped, the RCP runs resume.
# The hand-written numbers (README's v3 paragraph, benchmarks/checkpoints/README.md, the prose of docs/methods.md)
# are not generated: check them against the new card afterwards, and update the card's notes
# (benchmarks/lineage/shapes-v3-llava-notes.md) before the card step. The default built-in model is not changed.
set -euo pipefail
if [ $# -lt 3 ] || [ $# -gt 4 ]; then
    echo "usage: bash benchmarks/v3_install_preview.sh MODEL LINEAGE RUN [DRIFT]" >&2
    exit 2
fi
model=$1 lineage=$2 run=$3 drift=${4:-50}
if [ "$drift" = none ]; then stage_c="--cls-steps 0"; else stage_c="--cls-drift-weight $drift"; fi
[ -f "$model/config.json" ] || { echo "MODEL $model is not a model directory (no config.json)" >&2; exit 2; }
[ -f "$lineage" ] || { echo "LINEAGE $lineage is not a file" >&2; exit 2; }
mkdir -p "$run"
export OMP_NUM_THREADS=1

step() {  # step NAME: true when NAME still has to run
    if [ -e "$run/done-$1" ]; then echo "== $1: done before"; return 1; fi
    echo "== $1: $(date -u +%H:%M:%S)"
}
finish() { touch "$run/done-$1"; }

if step grow; then
    t0=$(date +%s)
    python benchmarks/v3_deep_from.py "$model" "$run" --placement spread_next $stage_c
    echo $(( $(date +%s) - t0 )) > "$run/grow-seconds"
    finish grow
fi
if step card; then
    python - "$lineage" "$run" "$model" "$drift" "$stage_c" <<'EOF'
import json, sys
from pathlib import Path
lineage, run, model, drift, stage_c = (json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), sys.argv[3],
                                       sys.argv[4], sys.argv[5])
then = ("no Stage C (the [CLS] embedding tuned before)" if drift == "none"
        else f"then Stage C: the [CLS] embedding alone, feature-drift penalty {drift} (no Stage-B steps)")
summary = json.loads((run / "deep" / "train_summary.json").read_text())
steps = max((h["step"] for h in summary["history"] if h["stage"] == "C"), default=0)
lineage.append({"run": f"{run.name} grown" + ("" if drift == "none" else " + Stage C"),
                "what": "decoder grown from 4 to 32 layers computing the same function (placement spread_next), "
                        + then,
                "command": f"python benchmarks/v3_deep_from.py {model} {run} --placement spread_next {stage_c}",
                "steps": int(steps), "seconds": float((run / "grow-seconds").read_text()), "threads": 1,
                "machine": summary["machine"]})
(run / "lineage.json").write_text(json.dumps(lineage, indent=1) + "\n")
EOF
    python -m vtprune.testbed.card "$run/deep" --name shapes-v3-llava --per-type 100 \
        --command "python benchmarks/v3_deep_from.py $model $run --placement spread_next $stage_c (the last of the runs in the lineage)" \
        --notes "$(cat benchmarks/lineage/shapes-v3-llava-notes.md)" --lineage "$run/lineage.json"
    finish card
fi
if step dcp-calibrate; then python benchmarks/dcp_sweep_v3.py calibrate --write; finish dcp-calibrate; fi
if step dcp-report; then python benchmarks/dcp_sweep_v3.py report; finish dcp-report; fi
if step dcp-sweep; then python benchmarks/dcp_sweep_v3.py sweep; finish dcp-sweep; fi
if step rcp; then
    if [ ! -e "$run/rcp-started" ]; then
        for d in runs/rcp-v3 runs/rcp-v3-192 runs/rcp-v3-128 runs/rcp-v3-32; do
            if [ -d "$d" ]; then mv "$d" "$d-before-$(date +%s)"; fi
        done
        # the checkpoints of the other budgets were trained on the model being replaced: drop them
        rm -rf vtprune/assets/rcp/shapes-v3-llava/budgets
    fi
    touch "$run/rcp-started"
    # seed 42 first: it also scores the rows every seed shares (runs/rcp-v3/rows/); then 43 and 44 side by side
    python benchmarks/rcp_card_v3.py --model builtin:shapes-v3-llava --seed 42 --out runs/rcp-v3
    python benchmarks/rcp_card_v3.py --model builtin:shapes-v3-llava --seed 43 --out runs/rcp-v3 & p43=$!
    python benchmarks/rcp_card_v3.py --model builtin:shapes-v3-llava --seed 44 --out runs/rcp-v3 & p44=$!
    wait $p43
    wait $p44
    python benchmarks/rcp_card_v3.py --combine runs/rcp-v3
    python benchmarks/rcp_card_v3.py --model builtin:shapes-v3-llava --seed 42 --out runs/rcp-v3 --install
    # one checkpoint per other budget RCP can reach (16 of 576 it cannot: its first pruning layer alone averages
    # 18), seed 42 each, side by side; installed under vtprune/assets/rcp/shapes-v3-llava/budgets/K/
    pids=()
    for k in 192 128 32; do
        python benchmarks/rcp_card_v3.py --model builtin:shapes-v3-llava --seed 42 --budget $k --out runs/rcp-v3-$k \
            > "$run/rcp-$k.log" 2>&1 & pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    for k in 192 128 32; do
        python benchmarks/rcp_card_v3.py --model builtin:shapes-v3-llava --seed 42 --budget $k --out runs/rcp-v3-$k --install
    done
    finish rcp
fi
if step compare; then
    # exit status 1: some cells cannot run on this model (the table lists why: CDPruner's CLIP text tower offline,
    # budgets a schedule cannot reach); anything else is a failure
    status=0
    vtprune compare --model builtin:shapes-v3-llava --out vtprune-out/compare-v3 --budgets 192,128,64,32,16 --jobs 2 \
        || status=$?
    [ "$status" -le 1 ] || exit "$status"
    finish compare
fi
if step docs; then
    python -m vtprune.eval.v3_report vtprune-out/compare-v3 --docs docs/testbed.md --readme README.md
    python -m vtprune.eval.core_report vtprune-out/compare-v3 --methods-doc docs/methods.md --readme README.md \
        --dcp-report vtprune-out/dcp_v3/report.json --rcp-card runs/rcp-v3/card.json --kind rcp=in_llm
    finish docs
fi
echo "== installed $(date -u +%H:%M:%S): run the slow tests (python -m pytest -m slow tests/test_rcp_card.py tests/test_dcp_v3.py)"
