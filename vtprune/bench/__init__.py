"""`vtprune bench` (an application above the API): time prefill, decode and selection of pruning methods next
to the FLOPs bound (`core`), and its command-line parser (`cli`)."""

from .._lazy import lazy_exports

# public name -> submodule (imported on first access: `vtprune.commands.bench` stays cheap for the CLI)
_LAZY = {
    "BenchConfig": "core",
    "IdWordTokenizer": "core",
    "StockEquivalent": "core",
    "bench_table": "core",
    "layer_lengths": "core",
    "length_segments": "core",
    "load_bench_model": "core",
    "make_inputs": "core",
    "run_bench": "core",
}
__all__ = sorted(_LAZY)


lazy_exports(__name__, _LAZY)
