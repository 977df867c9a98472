"""DCP-Prune on the built-in benchmark v3 (issue 22): one command each for the τ_κ calibration, the λ_ctx ×
recovery sweep (calibration split) and the recovery-vs-anchors-only report (held-out test split).

    python benchmarks/dcp_sweep_v3.py calibrate --write   # builtin:shapes-v3-llava -> vtprune/assets/dcp_tau.json
    python benchmarks/dcp_sweep_v3.py sweep
    python benchmarks/dcp_sweep_v3.py report

Everything lives in `vtprune.calibration.dcp_v3` (options: `--help` of each command); this file is the entry point.
"""

import sys

from vtprune.calibration.dcp_v3 import main

if __name__ == "__main__":
    sys.exit(main())
