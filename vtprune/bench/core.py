"""`vtprune bench`: time prefill, decode and selection of pruning methods on one model, next to the FLOPs bound.

For every (method, budget) and for the stock model (no pruning) in the same run, interleaved per round
after warm-up, on random pixel values and ids with the right placeholder counts:

- ``prefill_ms``: the language model's prefill (decoder layers, in-LLM selection and compaction included;
  the vision tower and pre-LLM selection excluded), so that it compares with the LLM FLOPs bound;
- ``forward_prefill_ms``: the whole first forward of ``generate`` (vision tower, pre-LLM selection, LLM,
  LM head on the last row);
- ``decode_ms_per_token``: median whole-model decode step; ``e2e_ms``: ``generate`` of T new tokens;
- ``selection_ms``: the method's own ``select`` calls of the prefill (the run record's ``selection_ms``);
- ``stock_equiv_ms``: the *stock* language model (no vtprune session, no hooks) run directly on random
  hidden states at each decoder layer's realised length (one stock forward over each run of layers with the
  same length: pre-LLM methods are one forward at n_text + K rows; an in-LLM cut at layer k is layers
  [0, k) at the full length, then layers [k, L) at the pruned one), timed in the same interleaved rounds.
  ``vs_stock`` = vtprune's pruned prefill ÷ that (min of the rounds of each): the engine's own overhead
  (hooks, in-LLM signals, selection and compaction inside the prefill); ``stock_vs_bound`` = the stock
  model's own speed-up at those lengths ÷ the FLOPs bound: the hardware's share of a miss;
- ``kv_bytes``: measured from the returned cache tensors (padding rows included) and analytic from
  ``last_run`` (``kv_bytes_analytic``);
- ``peak_mem_bytes``: CUDA ``max_memory_allocated`` (reset per call, weights included); on CPU an
  analytic estimate (KV cache after prefill + the widest layer's activations, weights excluded), named in
  ``peak_mem_source``;
- analytic LLM prefill FLOPs in the three conventions at the built depth and, for ``arch:`` models built
  with ``--layers``, at full depth (the method's schedule recomputed for the full depth).

Medians over ``repeats`` rounds (``vs_stock`` and ``stock_*``: minima, the robust statistic on a shared host);
device synchronisation around every timed region.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import vtprune
from vtprune import hf_compat as hf
from vtprune.api import session_of
from vtprune.budget import Budget
from vtprune.errors import UnsupportedInputError, VtpruneError
from vtprune.loading import TINY_MODELS, load, to_model
from vtprune.measurement.flops import LLMDims, prefill_flops_all, tokens_per_layer
from vtprune.measurement.timing import interleaved
from vtprune.models import adapter_for
from vtprune.results import BenchRow

__all__ = ["TINY_MODELS", "BenchConfig", "bench_table", "load_bench_model", "make_inputs", "run_bench"]
UNPRUNED = "none"


@dataclass
class BenchConfig:
    model: str
    methods: list[str]
    budgets: list[int | float]
    batch: int = 1
    dtype: str = "float32"
    attn: str = "sdpa"
    device: str = "cpu"
    layers: int | None = None
    repeats: int = 3
    warmup: int = 1
    new_tokens: int = 8
    image_size: tuple[int, int] | None = None  # (W, H) px
    text_tokens: int = 64
    budget_mode: str = "layer_avg"
    options: dict = field(default_factory=dict)
    seed: int = 0
    #: also time the stock language model at each case's realised per-layer lengths (`StockEquivalent`)
    stock: bool = True


# --- model and inputs -------------------------------------------------------------------------------------
def load_bench_model(cfg: BenchConfig) -> tuple[torch.nn.Module, LLMDims | None]:
    """`arch:NAME`, `tiny:KIND`, `builtin:NAME`, a directory or a hub id (`vtprune.loading.load`) -> (model, full dims).

    full dims: the full-depth `LLMDims` when an `arch:` model was built with fewer layers, else None. Models with
    random weights carry `IdWordTokenizer` for text-reading methods (`model._bench_tokenizer`); checkpoints
    generate without EOS (every call produces `new_tokens`).
    """
    from vtprune.loading.arch import full_dims

    loaded = load(cfg.model, device=cfg.device, dtype=getattr(torch, cfg.dtype), layers=cfg.layers, attn=cfg.attn,
                  seed=cfg.seed)  # fmt: skip
    model = loaded.model
    if loaded.synthetic:
        model._bench_tokenizer = IdWordTokenizer()
    else:
        model.set_attn_implementation(cfg.attn)
        model.generation_config.eos_token_id = None
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = 0
    if loaded.arch is None:
        return model.eval(), None
    dims = full_dims(loaded.arch)
    return model, (dims if dims.num_layers != model.config.text_config.num_hidden_layers else None)


def _text_id_limit(config) -> int:
    ids = [getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id")]
    vocab = config.text_config.vocab_size
    return min([vocab, *(i for i in ids if i is not None)])


def make_inputs(model, cfg: BenchConfig) -> dict:
    """Random ids (`text_tokens` text tokens around one image per sample) and random pixel values (the adapter's
    `synthetic_inputs`), on the model's device."""
    gen = torch.Generator().manual_seed(cfg.seed)
    high = _text_id_limit(model.config)
    n_pre = cfg.text_tokens // 2
    prompts = []
    for _ in range(cfg.batch):
        ids = torch.randint(3, high, (cfg.text_tokens,), generator=gen).tolist()
        prompts.append((ids[:n_pre], ids[n_pre:]))
    try:
        adapter = adapter_for(model)
        inputs = adapter.synthetic_inputs(prompts, cfg.image_size, seed=cfg.seed)
    except UnsupportedInputError as err:
        raise VtpruneError(f"vtprune bench cannot build inputs for {type(model).__name__}: {err}") from None
    return to_model(inputs, model)


# --- timing hooks -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seq_len(args, kwargs) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        x = kwargs.get(key)
        if x is not None:
            return int(x.shape[1])
    return int(args[0].shape[1]) if args and torch.is_tensor(args[0]) else None


class _PhaseTimer:
    """Times the model's prefill forward, each decode step, and the language model's prefill."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.lm = adapter_for(model).language_model
        self.reset()

    def reset(self) -> None:
        self.forward_prefill: list[float] = []
        self.decode: list[float] = []
        self.llm_prefill: list[float] = []
        self._t: dict[str, float] = {}

    def _pre(self, tag):
        def hook(module, args, kwargs):
            n = _seq_len(args, kwargs)
            _sync(self.device)
            self._t[tag] = (time.perf_counter(), n)

        return hook

    def _post(self, tag):
        def hook(module, args, kwargs, output):
            _sync(self.device)
            t0, n = self._t.pop(tag)
            ms = (time.perf_counter() - t0) * 1e3
            if tag == "llm":
                if n is not None and n > 1:
                    self.llm_prefill.append(ms)
            elif n is not None and n > 1:
                self.forward_prefill.append(ms)
            else:
                self.decode.append(ms)

        return hook

    def __enter__(self):
        self._handles = [
            self.model.register_forward_pre_hook(self._pre("model"), with_kwargs=True, prepend=True),
            self.model.register_forward_hook(self._post("model"), with_kwargs=True),
            self.lm.register_forward_pre_hook(self._pre("llm"), with_kwargs=True, prepend=True),
            self.lm.register_forward_hook(self._post("llm"), with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


# --- analytic ------------------------------------------------------------------------------------------
def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in hf.cache_tensors(cache))


def _activation_bytes(rec, dims: LLMDims, bytes_per_elem: int, eager: bool) -> int:
    """Widest layer of the prefill: residual, norm, q/k/v, attention output, 3 MLP tensors (+ scores if eager)."""
    widest = 0.0
    for layer in range(dims.num_layers):
        n = sum(s.visual_per_layer[layer] + s.n_text for s in rec.samples)
        n2 = sum((s.visual_per_layer[layer] + s.n_text) ** 2 for s in rec.samples)
        per_tok = 3 * dims.hidden + (dims.num_heads + 2 * dims.num_kv_heads) * dims.head_dim + 3 * dims.intermediate
        widest = max(widest, n * per_tok + (dims.num_heads * n2 if eager else 0))
    return int(widest * bytes_per_elem)


def full_depth_flops(rec, session, budget, budget_mode: str, full: LLMDims) -> dict[str, float]:
    """LLM prefill FLOPs of the batch at full depth: pre-LLM counts as realised, in-LLM cuts rescheduled."""
    total = {"fastv": 0.0, "swiglu": 0.0, "exact": 0.0}
    method = session.method if session is not None else None
    stages = method.stages() if method is not None else ()
    for s in rec.samples:
        n = s.n_visual
        k = Budget.parse(budget, budget_mode).tokens_for(n) if stages else n
        if not stages or k >= n:
            counts = [n] * full.num_layers
        else:
            scheduled = method.schedule(n, k, budget_mode, full.num_layers)
            cuts: list[tuple[int, int]] = []
            if any(st.before_llm for st in stages):
                cuts.append((0, s.retained_tokens))
            cuts += [(st.layer, c) for st, c in zip(stages, scheduled, strict=True) if not st.before_llm]
            counts = tokens_per_layer(n, cuts, full.num_layers)
        for conv, v in prefill_flops_all(counts, s.n_text, full).items():
            total[conv] += v
    return total


# --- stock equivalent ----------------------------------------------------------------------------------
def layer_lengths(rec) -> list[int]:
    """Sequence length entering each decoder layer of a prefill (a padded batch: its longest sample)."""
    layers = len(rec.samples[0].visual_per_layer)
    return [max(s.n_text + s.visual_per_layer[i] for s in rec.samples) for i in range(layers)]


def length_segments(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive layers with one length.  [640, 640, 256, 256] -> [(0, 2, 640), (2, 4, 256)]."""
    out: list[tuple[int, int, int]] = []
    for i, n in enumerate(lengths):
        if out and out[-1][2] == n:
            out[-1] = (out[-1][0], i + 1, n)
        else:
            out.append((i, i + 1, n))
    return out


class StockEquivalent:
    """The stock language model at a prefill's realised per-layer lengths: one plain forward of the decoder
    layers [a, b) per segment (`length_segments`) on random hidden states (batch, n, d) with an all-ones
    mask and a fresh cache, no vtprune session or hook involved. Call it to run once.

    Each extra segment pays the model's per-forward work once more (rotary table, mask, final norm): a few
    per cent of one layer, so an in-LLM row's stock equivalent slightly overstates the ideal.
    """

    def __init__(self, lm: torch.nn.Module, lengths: list[int], batch: int, seed: int = 0, pool: dict | None = None):
        """pool: a dict shared by the instances of one run, so that equal (batch, length) inputs are stored once."""
        self.lm = lm
        p = next(lm.parameters())
        hidden = int(lm.config.hidden_size)
        pool = {} if pool is None else pool
        self.segments = []
        for a, b, n in length_segments(lengths):
            if (batch, n) not in pool:
                gen = torch.Generator().manual_seed(seed + n)
                x = torch.randn(batch, n, hidden, generator=gen).to(p.device, p.dtype)
                pool[batch, n] = (x, torch.ones(batch, n, dtype=torch.long, device=p.device))
            self.segments.append((a, b, *pool[batch, n]))

    def __call__(self) -> None:
        layers = self.lm.layers
        try:
            with torch.inference_mode():
                for a, b, x, mask in self.segments:
                    self.lm.layers = layers[a:b]
                    self.lm(inputs_embeds=x, attention_mask=mask, use_cache=True)
        finally:
            self.lm.layers = layers


# --- the run -------------------------------------------------------------------------------------------
@dataclass
class _Case:
    method: str
    budget: int | float | None
    samples: dict[str, list[float]] = field(default_factory=dict)
    row: dict = field(default_factory=dict)
    error: str | None = None
    stock: StockEquivalent | None = None
    stock_ms: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget}"


class IdWordTokenizer:
    """Stand-in tokenizer for models built without one (`arch:`, `tiny:`): token id i reads as the word "wi".

    Bench prompts are random ids, so text-reading methods (ResPrune's question nouns, DCP-Prune's question)
    get a question of made-up words that are all nouns to the stop-word fallback; their whole selection
    path runs, on meaningless text. No id is special.
    """

    all_special_ids: list[int] = []

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{int(i)}" for i in ids)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split() if re.fullmatch(r"w\d+", w)]}


def _apply(model, case: _Case, cfg: BenchConfig) -> None:
    if case.budget is not None:  # budget None: the stock model (a `none` session only for the untimed probe)
        options = dict(cfg.options)
        if getattr(model, "_bench_tokenizer", None) is not None and "tokenizer" not in options:
            options["tokenizer"] = model._bench_tokenizer
        vtprune.apply(model, case.method, case.budget, budget_mode=cfg.budget_mode, **options)


def _remove(model) -> None:
    if session_of(model) is not None:
        vtprune.remove(model)


def run_bench(cfg: BenchConfig, progress: bool = True, built: tuple | None = None) -> dict:
    """Run the benchmark; -> {"config": ..., "rows": [one dict per case, the unpruned one first]}.

    built: `load_bench_model(cfg)`'s (model, full dims), to reuse one model over several runs.
    """
    device = torch.device(cfg.device)
    model, full = built if built is not None else load_bench_model(cfg)
    inputs = make_inputs(model, cfg)
    dims = LLMDims.from_config(model.config.text_config)
    cases = [_Case(UNPRUNED, None)]
    cases += [_Case(m, b) for m in cfg.methods if m != UNPRUNED for b in cfg.budgets]
    gen_kw = {"max_new_tokens": cfg.new_tokens, "min_new_tokens": cfg.new_tokens, "do_sample": False}
    timer = _PhaseTimer(model, device)

    stock_inputs: dict = {}
    total_steps = len(cases) * (1 + cfg.warmup + cfg.repeats)
    bar, task = _progress(progress, total_steps)
    try:
        # 1. untimed probe per case: record, measured KV cache, infeasible budgets
        for case in cases:
            try:
                if case.budget is None:
                    vtprune.apply(model, UNPRUNED, 1)
                else:
                    _apply(model, case, cfg)
                with torch.inference_mode():
                    out = model(**inputs, use_cache=True)
                rec = vtprune.last_run(model)
                sess = session_of(model)
                case.row = _analytic_row(case, cfg, rec, sess, dims, full, _cache_bytes(hf.output_cache(out)))
                case.row["layer_lengths"] = layer_lengths(rec)
                if cfg.stock:
                    lm = adapter_for(model).language_model
                    case.stock = StockEquivalent(lm, case.row["layer_lengths"], cfg.batch, pool=stock_inputs)
                del out
            except VtpruneError as err:
                case.error = str(err)
            finally:
                _remove(model)
            _advance(bar, task, 1 + cfg.warmup + cfg.repeats if case.error else 1)

        # 2. interleaved timed rounds
        live = [c for c in cases if c.error is None]

        def make_fn(case: _Case) -> Callable[[], None]:
            def fn() -> None:
                _apply(model, case, cfg)
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    timer.reset()
                    with timer:
                        _sync(device)
                        t0 = time.perf_counter()
                        model.generate(**inputs, **gen_kw)
                        _sync(device)
                        e2e = (time.perf_counter() - t0) * 1e3
                    s = case.samples
                    s.setdefault("e2e_ms", []).append(e2e)
                    s.setdefault("prefill_ms", []).append(sum(timer.llm_prefill))
                    s.setdefault("forward_prefill_ms", []).append(sum(timer.forward_prefill))
                    if timer.decode:
                        s.setdefault("decode_ms_per_token", []).append(statistics.median(timer.decode))
                    sess = session_of(model)  # None for the stock model
                    rec = sess.last if sess is not None else None
                    s.setdefault("selection_ms", []).append(rec.selection_ms if rec is not None else 0.0)
                    if device.type == "cuda":
                        s.setdefault("peak_mem_bytes", []).append(float(torch.cuda.max_memory_allocated(device)))
                finally:
                    _remove(model)
                _advance(bar, task, 1)

            return fn

        fns: dict[str, Callable[[], object]] = {}
        for c in live:
            fns[c.label] = make_fn(c)
            if c.stock is not None:  # same rounds, right after the vtprune run it stands for
                fns[f"stock:{c.label}"] = c.stock
        timings = interleaved(fns, rounds=cfg.repeats, warmup=cfg.warmup, device=device)
        for c in live:
            if c.stock is not None:
                c.stock_ms = timings[f"stock:{c.label}"].samples_ms
                c.stock = None  # free its inputs
    finally:
        if bar is not None:
            bar.stop()

    rows = [_finish_row(c, cfg, cases[0], device) for c in cases]
    return {"config": _config_dict(cfg, model, full), "rows": rows}


def _analytic_row(case, cfg, rec, sess, dims, full, kv_measured) -> dict:
    n = max(len(rec.samples), 1)
    row = {
        "method": case.method,
        "budget": case.budget if case.budget is not None else "all",
        "n_visual": sum(s.n_visual for s in rec.samples) / n,
        "n_text": sum(s.n_text for s in rec.samples) / n,
        "retained_tokens": sum(rec.retained_tokens) / n,
        "layer_avg_tokens": sum(rec.layer_avg_tokens) / n,
        "visual_per_layer": rec.samples[0].visual_per_layer,
        "flops": rec.flops,
        "kv_bytes": kv_measured,
        "kv_bytes_analytic": rec.kv_bytes,
        "layers": dims.num_layers,
    }
    if full is not None:
        row["flops_full_depth"] = full_depth_flops(rec, sess, case.budget or 1, cfg.budget_mode, full)
        row["layers_full"] = full.num_layers
    if torch.device(cfg.device).type != "cuda":
        row["peak_mem_bytes"] = rec.kv_bytes + _activation_bytes(rec, dims, rec.bytes_per_elem, cfg.attn == "eager")
        row["peak_mem_source"] = "analytic: KV cache after prefill + widest layer's prefill activations (no weights)"
    else:
        row["peak_mem_source"] = "torch.cuda.max_memory_allocated per call (weights included), median"
    return row


def _finish_row(case: _Case, cfg: BenchConfig, base: _Case, device: torch.device) -> BenchRow:
    common = {"device": str(device), "dtype": cfg.dtype, "attn": cfg.attn, "batch": cfg.batch}
    if case.error is not None:
        budget = case.budget if case.budget is not None else "all"
        return {"method": case.method, "budget": budget, "error": case.error, **common}
    row = dict(case.row)
    timed = {k: v[cfg.warmup :] for k, v in case.samples.items()}  # interleaved's warm-up calls come first
    for key, values in timed.items():
        row[key] = statistics.median(values) if values else None
    row["repeats"] = len(timed.get("e2e_ms", []))
    base_row = base.row if base.error is None else {}
    base_ms = statistics.median(base.samples["prefill_ms"][cfg.warmup :]) if base.samples.get("prefill_ms") else None
    row["prefill_ms_unpruned"] = base_ms
    row["speedup_prefill"] = base_ms / row["prefill_ms"] if base_ms and row.get("prefill_ms") else None
    if base_row:
        for conv in ("exact", "fastv", "swiglu"):
            key = "flops_bound" if conv == "exact" else f"flops_bound_{conv}"
            row[key] = base_row["flops"][conv] / row["flops"][conv]
        if "flops_full_depth" in row:
            row["flops_bound_full_depth"] = base_row["flops_full_depth"]["exact"] / row["flops_full_depth"]["exact"]
    if row.get("speedup_prefill") and row.get("flops_bound"):
        row["speedup_vs_bound"] = row["speedup_prefill"] / row["flops_bound"]
    if row.get("prefill_ms"):
        row["selection_pct_of_prefill"] = 100 * (row.get("selection_ms") or 0.0) / row["prefill_ms"]
    prefill = timed.get("prefill_ms") or []
    row["prefill_ms_min"] = min(prefill) if prefill else None
    if case.stock_ms:
        row["stock_equiv_ms"] = statistics.median(case.stock_ms)
        row["stock_equiv_ms_min"] = min(case.stock_ms)
        if row["prefill_ms_min"]:
            row["vs_stock"] = row["prefill_ms_min"] / row["stock_equiv_ms_min"]
        if base.stock_ms and row.get("flops_bound"):
            row["stock_speedup"] = min(base.stock_ms) / row["stock_equiv_ms_min"]
            row["stock_vs_bound"] = row["stock_speedup"] / row["flops_bound"]
    row.update(common)
    return row


def _config_dict(cfg: BenchConfig, model, full: LLMDims | None) -> dict:
    import transformers

    return {
        "model": cfg.model,
        "class": type(model).__name__,
        "layers": model.config.text_config.num_hidden_layers,
        "layers_full": full.num_layers if full is not None else None,
        "batch": cfg.batch,
        "dtype": cfg.dtype,
        "attn": cfg.attn,
        "device": cfg.device,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "new_tokens": cfg.new_tokens,
        "budget_mode": cfg.budget_mode,
        "options": cfg.options,
        "stock": cfg.stock,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _progress(enabled: bool, total: int):
    if not enabled:
        return None, None
    from vtprune.progress import Progress  # rich in a terminal, plain periodic lines in a log

    bar = Progress(transient=True)
    bar.start()
    return bar, bar.add_task("bench", total=total)


def _advance(bar, task, n: int) -> None:
    if bar is not None:
        bar.advance(task, n)


# --- report --------------------------------------------------------------------------------------------
def bench_table(result: dict):
    """One rich table: tokens, times, speed-up next to the FLOPs bound, selection, memory, FLOPs."""
    from rich.table import Table

    c = result["config"]
    full = c.get("layers_full")
    title = (
        f"{c['model']} ({c['class']}, {c['layers']} layers) · {c['dtype']} · {c['attn']} · {c['device']} · "
        f"batch {c['batch']} · {c['new_tokens']} new tokens · median of {c['repeats']}"
    )
    t = Table(title=title)
    cols = [
        "method",
        "budget",
        "K",
        "n̄",
        "prefill ms",
        "speed-up",
        "FLOPs bound",
        "% of bound",
        "÷ stock",
        "stock % of bound",
        "select ms",
        "select %",
        "decode ms/tok",
        "e2e ms",
        "KV MiB (meas/anal)",
        "peak MiB",
        "TFLOPs exact",
    ]
    if full:
        cols.append(f"TFLOPs @{full}L")
    cols.append("note")
    for col in cols:
        t.add_column(col, justify="right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in result["rows"]:
        if "error" in r:
            t.add_row(r["method"], str(r["budget"]), *["-"] * (len(cols) - 3), r["error"][:70])
            continue
        cells = [
            r["method"],
            str(r["budget"]),
            f(r["retained_tokens"], ".0f"),
            f(r["layer_avg_tokens"], ".1f"),
            f(r.get("prefill_ms"), ".1f"),
            f(r.get("speedup_prefill"), ".2f") + "×",
            f(r.get("flops_bound"), ".2f") + "×",
            f(100 * r["speedup_vs_bound"] if r.get("speedup_vs_bound") else None, ".0f"),
            f(r.get("vs_stock"), ".3f"),
            f(100 * r["stock_vs_bound"] if r.get("stock_vs_bound") else None, ".0f"),
            f(r.get("selection_ms"), ".2f"),
            f(r.get("selection_pct_of_prefill"), ".2f"),
            f(r.get("decode_ms_per_token"), ".1f"),
            f(r.get("e2e_ms"), ".0f"),
            f"{r['kv_bytes'] / 2**20:.1f}/{r['kv_bytes_analytic'] / 2**20:.1f}",
            f(r.get("peak_mem_bytes", 0) / 2**20, ".0f"),
            f(r["flops"]["exact"] / 1e12, ".3f"),
        ]
        if full:
            cells.append(f(r["flops_full_depth"]["exact"] / 1e12, ".3f"))
        t.add_row(*cells, "")
    return t
