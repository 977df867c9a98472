"""The lmms-eval plugin (`--model vtprune`), the offline `vtprune_shapes` tasks and multi-process evaluation.

The real lmms-eval 0.7.3 evaluator runs in subprocesses (it patches file locks and SSL pickling process-wide;
the suite's other tests should not see that): `simple_evaluate` for two methods on the exported built-in
benchmark, and the `lmms-eval` command under `accelerate launch --num_processes 2 --cpu`. Their per-sample
answers, scores and efficiency fields are checked against `vtprune eval` (`run_eval`) on the same samples,
and the two-process run against the one-process one. The plugin itself (batched generation, teacher-forced
log-likelihood, chat templates, efficiency fields) runs in-process on tiny LLaVA-NeXT and Qwen2.5-VL
checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from saved_models import save_tiny_families

torch.set_num_threads(1)

PER_TYPE = 5  # 30 questions
BATCH = 8
METHODS = {  # method -> (budget, options); fastv is in-LLM and text-conditioned, pool pre-LLM
    "pool": (64, {}),
    "fastv": (64, {"budget_mode": "retained", "k": 1}),
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# simple_evaluate for each method in one process; prints one JSON line per method
RUNNER = r"""
import json, os, sys, torch
torch.set_num_threads(1)
from lmms_eval import evaluator
from lmms_eval.tasks import TaskManager
task_dir, runs = sys.argv[1], json.loads(sys.argv[2])
tm = TaskManager("WARNING", include_path=task_dir, include_defaults=False)
for name, model_args in runs.items():
    tasks = ["vtprune_shapes", "vtprune_shapes_mc"]
    out = evaluator.simple_evaluate(model="vtprune", model_args=model_args, tasks=tasks, batch_size=BATCH,
                                    task_manager=tm, log_samples=True, verbosity="WARNING")
    keep = {k: out[k] for k in ("results", "samples", "throughput")}
    print("RESULT " + json.dumps({"method": name, **keep}, default=str), flush=True)
""".replace("BATCH", str(BATCH))


def _model_args(method: str, threads: int = 1) -> str:
    budget, options = METHODS[method]
    extra = "".join(f",{k}={v}" for k, v in options.items())
    return f"pretrained=builtin:shapes-llava,method={method},budget={budget}{extra},threads={threads}"


def _env(tmp: Path) -> dict:
    return {**os.environ, **OFFLINE, "LMMS_EVAL_DATASETS_CACHE": str(tmp / "datasets-cache")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    from vtprune.cli import main

    out = tmp_path_factory.mktemp("vtprune_shapes")
    assert main(["testbed", "export", "--out", str(out), "--per-type", str(PER_TYPE), "--lmms"]) == 0
    return out


@pytest.fixture(scope="module")
def lmms_runs(task_dir, tmp_path_factory) -> dict:
    """method -> {results, samples {task: [...]}, throughput} of lmms-eval's `simple_evaluate`."""
    tmp = tmp_path_factory.mktemp("lmms-runs")
    runs = {m: _model_args(m) for m in METHODS}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(task_dir), json.dumps(runs)],
        capture_output=True,
        text=True,
        env=_env(tmp),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return {r["method"]: r for r in lines}


@pytest.fixture(scope="module")
def vtprune_evals(task_dir) -> dict:
    """method -> `vtprune eval`'s result (`run_eval`) on the same exported samples."""
    from vtprune.eval.shapes import load_model, load_samples, run_eval

    model, processor = load_model("builtin:shapes-llava")
    samples, root = load_samples(data=task_dir / "questions.jsonl")
    out = {}
    for method, (budget, options) in METHODS.items():
        options = dict(options)
        mode = options.pop("budget_mode", "layer_avg")
        out[method] = run_eval(
            model,
            processor,
            samples,
            method,
            budget,
            budget_mode=mode,
            options=options,
            batch_size=BATCH,
            image_root=root,
        )
    return out


# --- the package without lmms-eval, registration --------------------------------------------------------
def test_import_vtprune_does_not_import_lmms_eval():
    code = (
        "import sys\n"
        "sys.modules['lmms_eval'] = None  # as if lmms-eval were not installed\n"
        "import vtprune, vtprune.eval, vtprune.eval.lmms, vtprune.eval.hard_subset\n"
        "from vtprune.cli import build_parser\n"
        "build_parser().parse_args(['hard-subset', 'x.json'])\n"
        "from vtprune.eval.lmms import TASKS_DIR, summarize_efficiency\n"
        "assert (TASKS_DIR / 'vtprune_shapes.yaml').is_file()\n"
        "try:\n"
        "    import vtprune.eval.lmms.model\n"
        "    raise SystemExit('the model module imported without lmms_eval')\n"
        "except ImportError:\n"
        "    pass\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **OFFLINE})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_entry_point_registers_the_model():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert eps.get("vtprune") == "vtprune.eval.lmms:manifest", (
        "reinstall vtprune (pip install -e .) for the entry point"
    )
    from vtprune.eval.lmms import manifest

    m = manifest()
    assert m.model_id == "vtprune" and m.simple_class_path == "vtprune.eval.lmms.model.VtpruneLMM"


# --- the offline task through the real evaluator == vtprune eval ------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_offline_task_scores_equal_vtprune_eval(lmms_runs, vtprune_evals, method):
    from vtprune.testbed.questions import answer_vocabulary

    run, ref = lmms_runs[method], vtprune_evals[method]
    records = {r["id"]: r for r in ref["records"]}
    n = ref["n"]
    assert n == 6 * PER_TYPE
    gen = sorted(run["samples"]["vtprune_shapes"], key=lambda s: s["doc_id"])
    mc = sorted(run["samples"]["vtprune_shapes_mc"], key=lambda s: s["doc_id"])
    assert len(gen) == len(mc) == n
    vocab = set(answer_vocabulary())
    gen_correct: dict[str, list[bool]] = {}  # generate_until's expected exact match per type
    off_vocab = 0
    for g, c in zip(gen, mc, strict=True):
        rec = records[g["doc"]["id"]]
        greedy = g["filtered_resps"][0]
        if greedy in vocab:
            # generate_until: a greedy answer word is vtprune eval's restricted argmax
            assert greedy == rec["prediction"]
            assert bool(g["exact_match"]) == rec["correct"]
        else:  # the greedy token is not an answer word (e.g. </s> under pruning): wrong for generate_until
            off_vocab += 1
            assert not g["exact_match"]
        gen_correct.setdefault(rec["type"], []).append(greedy in vocab and rec["correct"])
        assert bool(c["exact_match"]) == rec["correct"]
        # multiple_choice: 24 log-likelihoods, the argmax is vtprune eval's prediction
        lls = [float(r[0]) for r in c["filtered_resps"]]
        assert len(lls) == len(vocab) and list(answer_vocabulary())[lls.index(max(lls))] == rec["prediction"]
        # per-sample efficiency fields == the engine's record in vtprune eval
        f = g["token_counts"][0]["vtprune"]
        assert f["method"] == method and f["visual_tokens"] == rec["n_visual"] == 576
        assert f["retained_tokens"] == rec["retained_tokens"]
        assert f["layer_avg_tokens"] == pytest.approx(rec["layer_avg_tokens"])
        assert f["flops"] == pytest.approx(rec["flops"]) and f["flops"]["exact"] < f["flops_unpruned"]["exact"]
        assert f["prefill_ms"] > 0 and 1 <= f["batch_size"] <= BATCH
        assert c["token_counts"][0]["vtprune"]["retained_tokens"] == rec["retained_tokens"]
    assert off_vocab <= n // 10  # the model answers with an answer word almost always
    expected = {"vtprune_shapes": {t: sum(v) / len(v) for t, v in gen_correct.items()},
                "vtprune_shapes_mc": ref["per_type"]}
    for task in ("vtprune_shapes", "vtprune_shapes_mc"):
        res = run["results"][task]
        want = expected[task]
        assert res["exact_match,none"] == pytest.approx(sum(want.values()) / len(want))  # equal counts per type
        for qtype, acc in want.items():
            assert res[f"exact_match_{qtype},none"] == pytest.approx(acc)
    # the aggregate in the results summary
    thr = run["throughput"]
    assert thr["avg_vtprune_samples"] == 2 * n
    assert thr["avg_vtprune_retained_tokens"] == pytest.approx(ref["retained_tokens"])
    assert thr["avg_vtprune_layer_avg_tokens"] == pytest.approx(ref["layer_avg_tokens"])
    assert thr["avg_vtprune_flops_exact"] == pytest.approx(ref["flops"]["exact"])
    assert thr["avg_vtprune_vtprune_shapes_samples"] == n and thr["avg_vtprune_prefill_ms_per_sample"] > 0


# --- two processes (accelerate, CPU) == one --------------------------------------------------------------
def test_two_process_cli_run_is_sharded_gathered_and_equal(task_dir, lmms_runs, tmp_path):
    """`accelerate launch` with two CPU processes (torch.distributed gloo): `--cpu` alone starts one process
    unless MPI is set up, so the launcher is the multi-process one and ACCELERATE_USE_CPU=1 makes it gloo."""
    from vtprune.eval.lmms import read_samples

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "lmms_eval",
        "--model",
        "vtprune",
        "--model_args",
        _model_args("fastv"),
        "--include_path",
        str(task_dir),
        "--tasks",
        "vtprune_shapes,vtprune_shapes_mc",
        "--batch_size",
        str(BATCH),
        "--log_samples",
        "--output_path",
        str(out),
        "--verbosity",
        "WARNING",
    ]
    env = {**_env(tmp_path), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    one = lmms_runs["fastv"]
    n = 6 * PER_TYPE
    for task in ("vtprune_shapes", "vtprune_shapes_mc"):
        (samples_file,) = out.rglob(f"*_samples_{task}.jsonl")
        raw = [json.loads(line) for line in samples_file.read_text().splitlines()]
        # lmms-eval shards documents round-robin and writes rank 0's, then rank 1's
        assert [s["doc_id"] for s in raw] == list(range(0, n, 2)) + list(range(1, n, 2))
        two = read_samples(samples_file)  # vtprune's reader: document order
        assert [s["doc_id"] for s in two] == list(range(n))
        ref = sorted(one["samples"][task], key=lambda s: s["doc_id"])
        for a, b in zip(ref, two, strict=True):
            assert a["exact_match"] == b["exact_match"]
            if task == "vtprune_shapes":
                assert b["filtered_resps"] == a["filtered_resps"][0]
            else:
                # other batch compositions (8 + 7 against 8 + 8 + 8 + 6): fp32 rounding only
                assert [float(x[0]) for x in b["filtered_resps"]] == pytest.approx(
                    [float(x[0]) for x in a["filtered_resps"]], rel=1e-5, abs=1e-5
                )
            fa, fb = a["token_counts"][0]["vtprune"], b["token_counts"][0]["vtprune"]
            assert fa["retained_tokens"] == fb["retained_tokens"] and fa["flops"] == pytest.approx(fb["flops"])
        # each rank ran its 15 documents in batches of 8 and 7 (one process: 8, 8, 8, 6)
        assert {s["token_counts"][0]["vtprune"]["batch_size"] for s in two} == {8, 7}
        assert {s["token_counts"][0]["vtprune"]["batch_size"] for s in ref} == {8, 6}
        assert results["results"][task]["exact_match,none"] == pytest.approx(one["results"][task]["exact_match,none"])
    thr = results["throughput"]
    assert thr["avg_vtprune_samples"] == 2 * n  # the efficiency summary gathered from both ranks
    for key in ("retained_tokens", "layer_avg_tokens", "flops_exact"):
        assert thr[f"avg_vtprune_{key}"] == pytest.approx(one["throughput"][f"avg_vtprune_{key}"])


# --- the plugin on tiny LLaVA-NeXT and Qwen2.5-VL checkpoints ------------------------------------------
@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    dirs = save_tiny_families(tmp_path_factory.mktemp("families"))
    return {"llava_next": (dirs["llava_next"], " w8"), "qwen2_5_vl": (dirs["qwen2_5_vl"], " w9")}


def _docs() -> list[dict]:
    sizes = [(160, 100), (112, 168), (120, 120)]  # (W, H): different token counts per image
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    return [
        {"image": Image.new("RGB", size, colour), "question": q}
        for size, colour, q in zip(sizes, colours, ["w5 w6 w7", "w10 w11", "w12 w13 w14 w15"], strict=True)
    ]


def _instance(kind: str, args: tuple, doc_id: int):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def _visual(doc):
    return [doc["image"]]


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_plugin_generates_in_batches_and_scores_continuations(family_dirs, family):
    from vtprune.eval.lmms.model import VtpruneLMM

    path, marker = family_dirs[family]
    lm = VtpruneLMM(pretrained=str(path), method="pool", budget=0.5, batch_size=2, threads=1)
    docs = _docs()
    lm.task_dict = {"t": {"test": docs}}
    # the processor's chat template, one image first
    text = lm.prompt(docs[0]["question"], 1)
    assert text.endswith(marker) and text.count(lm._image_token()) == 1 and "w5 w6 w7" in text

    gen = {"max_new_tokens": 3, "until": [], "temperature": 0}
    reqs = [
        _instance("generate_until", (d["question"], dict(gen), _visual, i, "t", "test"), i) for i, d in enumerate(docs)
    ]
    batched = lm.generate_until(reqs)
    lm.batch_size_per_gpu = 1
    alone = lm.generate_until(reqs)
    assert [r.text for r in batched] == [r.text for r in alone]
    assert all(1 <= r.token_counts.output_tokens <= 3 for r in batched)
    fields = [r.token_counts.to_dict()["vtprune"] for r in batched]
    for f, g in zip(fields, [r.token_counts.to_dict()["vtprune"] for r in alone], strict=True):
        assert f["retained_tokens"] == f["layer_avg_tokens"] == g["retained_tokens"]  # pre-LLM: n̄ = retained
        assert abs(f["retained_tokens"] - 0.5 * f["visual_tokens"]) <= 2 and f["flops"] == pytest.approx(g["flops"])
    assert len({f["visual_tokens"] for f in fields}) >= 2  # images of different token counts in one batch
    # longest contexts first: docs 2 and 0 share a batch, doc 1 runs alone
    assert [f["batch_size"] for f in fields] == [2, 1, 2]
    assert {r.token_counts.to_dict()["vtprune"]["batch_size"] for r in alone} == {1}

    # loglikelihood: teacher-forced through the pruned prefill == one pruned forward over context + continuation
    lm.batch_size_per_gpu = 2
    conts = [" w20 w21 w22", " w30", " w20 w21 w22"]
    reqs = [
        _instance("loglikelihood", (d["question"], c, _visual, i, "t", "test"), i)
        for i, (d, c) in enumerate(zip(docs, conts, strict=True))
    ]
    reqs.append(_instance("loglikelihood", (docs[1]["question"], " w31", _visual, 1, "t", "test"), 1))
    out = lm.loglikelihood(reqs)
    for req, res in zip(reqs, out, strict=True):
        ctx, cont, _, doc_id, _, _ = req.args
        prompt = lm.prompt(ctx, 1)
        ids = lm._continuation_ids(prompt, cont)
        assert len(ids) == len(cont.split())
        inputs = lm.inputs([prompt + cont], [[docs[doc_id]["image"]]])
        with torch.no_grad():
            logits = lm.model(**inputs).logits[0].float().log_softmax(-1)
        rows = logits[-(len(ids) + 1) : -1]
        want = sum(float(rows[t, tok]) for t, tok in enumerate(ids))
        greedy = all(int(rows[t].argmax()) == tok for t, tok in enumerate(ids))
        ll, is_greedy = res.text
        assert ll == pytest.approx(want, abs=1e-4) and is_greedy == greedy
        assert res.token_counts.to_dict()["vtprune"]["method"] == "pool"
    assert set(lm.efficiency) == {
        ("t", "test", i, kind) for i in range(3) for kind in ("generate_until", "loglikelihood")
    }


def test_plugin_refuses_a_method_without_budget_and_unknown_options(family_dirs):
    from vtprune.errors import VtpruneError
    from vtprune.eval.lmms.model import VtpruneLMM

    path, _ = family_dirs["qwen2_5_vl"]
    with pytest.raises(VtpruneError, match="needs a budget"):
        VtpruneLMM(pretrained=str(path), method="pool")
    with pytest.raises(VtpruneError):
        VtpruneLMM(pretrained=str(path), method="pool", budget=8, no_such_option=1)


# --- efficiency aggregation -------------------------------------------------------------------------------
def test_efficiency_summary_and_flat_metrics():
    from vtprune.eval.lmms.efficiency import (
        efficiency_of_samples,
        summarize_by_task,
        summarize_efficiency,
        summary_metrics,
    )

    def rec(task, retained, avg, exact, ms, batch):
        flops = {"exact": exact, "fastv": exact / 2, "swiglu": exact / 3}
        unpruned = {"exact": 100.0, "fastv": 50.0, "swiglu": 40.0}
        return {
            "task": task,
            "method": "pool",
            "budget": 64,
            "budget_mode": "layer_avg",
            "visual_tokens": 576,
            "text_tokens": 10,
            "retained_tokens": retained,
            "layer_avg_tokens": avg,
            "flops": flops,
            "flops_unpruned": unpruned,
            "prefill_ms": ms,
            "batch_size": batch,
        }

    records = [rec("a", 64, 64.0, 20.0, 40.0, 4), rec("a", 32, 40.0, 10.0, 40.0, 4), rec("b", 16, 16.0, 6.0, 9.0, 1)]
    s = summarize_efficiency(records)
    assert s["samples"] == 3 and s["retained_tokens"] == pytest.approx(112 / 3)
    assert s["layer_avg_tokens"] == pytest.approx(40.0) and s["flops"]["exact"] == pytest.approx(12.0)
    assert s["flops_ratio"] == pytest.approx(0.12) and s["prefill_ms_per_sample"] == pytest.approx((10 + 10 + 9) / 3)
    assert s["prefill_ms_batch_median"] == 40.0
    by = summarize_by_task(records)
    assert by["by_task"]["a"]["samples"] == 2 and by["by_task"]["b"]["retained_tokens"] == 16
    flat = summary_metrics(by)
    assert flat["vtprune_retained_tokens"] == pytest.approx(112 / 3) and flat["vtprune_flops_exact"] == 12.0
    assert flat["vtprune_a_retained_tokens"] == 48 and flat["vtprune_b_samples"] == 1
    assert all(isinstance(v, float) for v in flat.values())
    assert summarize_efficiency([{}]) == {"samples": 0}
    samples = [{"doc_id": 7, "token_counts": [{"input_tokens": 1, "vtprune": records[0]}]}, {"doc_id": 8}]
    assert efficiency_of_samples(samples) == [{"doc_id": 7, **records[0]}]


@pytest.fixture(scope="module")
def dirs_2026(tmp_path_factory) -> dict:
    from saved_models import save_tiny_2026_families

    return save_tiny_2026_families(tmp_path_factory.mktemp("families-2026"))


@pytest.mark.parametrize("family", ["llava_onevision", "gemma3", "internvl"])
def test_plugin_accepts_the_2026_families(dirs_2026, family):
    """The lmms-eval plugin loads LLaVA-OneVision / Gemma 3 / InternVL from a saved folder, prunes, and a batch of
    prompts with different images generates what each prompt does alone."""
    from vtprune.eval.lmms.model import VtpruneLMM

    lm = VtpruneLMM(pretrained=str(dirs_2026[family]), method="pool", budget=0.5, batch_size=2, threads=1)
    docs = _docs()
    lm.task_dict = {"t": {"test": docs}}
    assert lm.prompt(docs[0]["question"], 1).count(lm._image_token()) == 1
    gen = {"max_new_tokens": 2, "until": [], "temperature": 0}
    reqs = [
        _instance("generate_until", (d["question"], dict(gen), _visual, i, "t", "test"), i) for i, d in enumerate(docs)
    ]
    batched = lm.generate_until(reqs)
    lm.batch_size_per_gpu = 1
    alone = lm.generate_until(reqs)
    assert [r.text for r in batched] == [r.text for r in alone]
    fields = [r.token_counts.to_dict()["vtprune"] for r in batched]
    assert all(0 < f["retained_tokens"] < f["visual_tokens"] for f in fields)
    assert [f["retained_tokens"] for f in fields] == [
        r.token_counts.to_dict()["vtprune"]["retained_tokens"] for r in alone
    ]


def test_the_plugin_closes_the_process_group_it_leaves_open(tmp_path):
    """The exit hook registered for multi-process runs destroys torch.distributed's default group, and is a no-op
    when there is none (a second call, or a one-process run)."""
    import torch.distributed as dist

    from vtprune.eval.lmms.model import _destroy_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    _destroy_process_group()
    assert not dist.is_initialized()
    _destroy_process_group()  # nothing open: no error
