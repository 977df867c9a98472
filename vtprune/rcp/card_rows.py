"""The rows of an RCP card on the built-in benchmark (benchmarks/rcp_card_v3.py writes them, the core-methods report
reads them): row keys in card order and their labels."""

from __future__ import annotations

ROWS = ("full", "rcp", "rcp_delta0", "rcp_adapter_off", "rcp_untrained", "resprune", "divprune")
LABELS = {
    "full": "full model (576 tokens)",
    "rcp": "RCP, trained (calibrated δ)",
    "rcp_delta0": "RCP, trained, δ = 0",
    "rcp_adapter_off": "RCP, trained pruners, adapters off",
    "rcp_untrained": "RCP, untrained pruner (own δ)",
    "resprune": "ResPrune",
    "divprune": "DivPrune",
}
