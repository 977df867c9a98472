"""`--model vtprune`: an lmms-eval 0.7.x model (simple API) that runs a pruned HF vision-language model.

    lmms-eval --model vtprune --tasks gqa --batch_size 8 --log_samples --output_path runs/ \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=64[,budget_mode=retained,k=3]

model_args: `pretrained` (a hub id, a local directory, `builtin:NAME` or `arch:NAME`), `method` (default
`none`), `budget` (int tokens or ratio in (0, 1)), `budget_mode`, `positions`, `device` (default cuda if
available), `dtype` (`auto` = bfloat16 on GPU, float32 on CPU), `attn_implementation` (default sdpa),
`chat_template` (overrides the processor's), `max_new_tokens` (default when a task sets none: 1024),
`threads` (torch CPU threads), `revision`; every other key is a method option (e.g. `k=3`).

Every family vtprune has an adapter for (loaded by `vtprune.loading.load`). The prompt is the task's context
after the images, in the chat template of the processor (or tokenizer); a processor without one gets the
adapter's default (`USER: <image>\\n{text} ASSISTANT:` for LLaVA); inputs are built by the adapter
(`vtprune.loading.prepare_inputs`).

- `generate_until`: batched, left-padded `model.generate` (greedy unless the task asks for sampling), the
  text cut at the first `until` string.
- `loglikelihood`: the context is prefilled exactly as for generation (so a method sees the same prompt and
  selects the same tokens; a forward over context + continuation would let the continuation steer
  text-conditioned methods), then the continuation is teacher-forced through `generate`'s cached decode;
  the raw logits of each step give its log-probabilities. Requests sharing a context share one prefill when
  their continuations are one token long. Each `(log-likelihood, is_greedy)` pair is returned inside a
  `GenerationResult`: lmms-eval 0.7.3's `unwrap_generation_output` turns a bare tuple into its string,
  which `multiple_choice` scoring cannot read.
- Efficiency: every response carries `token_counts` whose `vtprune` entry holds the sample's visual,
  retained and layer-averaged tokens, analytic LLM prefill FLOPs (pruned and unpruned, three conventions)
  and the LLM prefill time of its batch (`vtprune.eval.lmms.efficiency`); lmms-eval logs it per sample
  (`--log_samples`). At the end (`clean`) the per-document fields of all ranks are gathered in document
  order and their means are logged through lmms-eval's metric log, so they appear in the results file under
  `throughput` (`avg_vtprune_retained_tokens`, ...).
"""

from __future__ import annotations

import atexit
import json
import time

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from transformers import LogitsProcessor, LogitsProcessorList

import vtprune
from vtprune.errors import VtpruneError
from vtprune.eval.lmms.efficiency import summarize_by_task, summary_metrics
from vtprune.measurement.flops import prefill_flops_all
from vtprune.measurement.timing import PrefillTimer

NO_PRUNING_BUDGET = 10**9  # method=none: the budget is never used


class VtpruneTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus vtprune's efficiency fields (logged as `token_counts[i]`)."""

    def __init__(self, input_tokens=None, output_tokens=None, vtprune_fields: dict | None = None):
        super().__init__(input_tokens=input_tokens, output_tokens=output_tokens)
        self.vtprune_fields = vtprune_fields or {}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "vtprune": self.vtprune_fields}


def _dtype(name, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, str(name))


class _ForceTokens(LogitsProcessor):
    """Teacher forcing inside `generate`: at step t, row b must emit `forced[b, t]` (rows with -1 are free)."""

    def __init__(self, forced: torch.Tensor, start: int):
        self.forced, self.start = forced, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.start
        if t >= self.forced.shape[1]:
            return scores
        want = self.forced[:, t].to(scores.device)
        rows = want >= 0
        forced = torch.full_like(scores, float("-inf"))
        forced[rows, want[rows]] = 0.0
        return torch.where(rows[:, None], forced, scores)


class VtpruneLMM(lmms):
    """lmms-eval model `vtprune`: a stock HF VLM with `vtprune.apply(model, method, budget, ...)` attached."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "builtin:shapes-llava",
        method: str = "none",
        budget: int | float | None = None,
        budget_mode: str = "layer_avg",
        positions: str = "keep",
        device: str | None = None,
        dtype: str | None = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str = "sdpa",
        chat_template: str | None = None,
        max_new_tokens: int = 1024,
        threads: int | None = None,
        revision: str | None = None,
        **options,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        from vtprune.loading import load

        if threads:
            torch.set_num_threads(int(threads))
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self._device = accelerator.device
            atexit.register(_destroy_process_group)  # the group Accelerator opened; lmms-eval never closes it
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self.loaded = load(
            pretrained, device=str(self._device), dtype=_dtype(dtype, self._device), attn=attn_implementation,
            revision=revision,
        )  # fmt: skip
        self._model = self.loaded.model
        self.pretrained = str(pretrained)
        tok = self.loaded.tokenizer
        tok.padding_side = "left"
        if self.loaded.processor is not None and getattr(self.loaded.processor, "tokenizer", None) is not None:
            self.loaded.processor.tokenizer.padding_side = "left"
        self.chat_template = chat_template
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens = int(max_new_tokens)
        self.method = str(method)
        self.budget = NO_PRUNING_BUDGET if budget is None and self.method == "none" else budget
        if self.budget is None:
            raise VtpruneError(f"--model_args: method={self.method} needs a budget (tokens, or a ratio in (0, 1))")
        self.budget_mode, self.positions, self.options = budget_mode, positions, dict(options)
        vtprune.apply(
            self._model,
            self.method,
            self.budget,
            budget_mode=budget_mode,
            positions=positions,
            tokenizer=tok,
            **self.options,
        )
        self.efficiency: dict[tuple, dict] = {}  # (task, split, doc_id, request type) -> fields
        self._gen_tokens, self._gen_seconds = 0, 0.0

    # --- lmms-eval plumbing ------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtprune's lmms-eval model does not run multi-round generation")

    # --- prompts and inputs ------------------------------------------------------------------------------
    def _image_token(self) -> str:
        return self.loaded.adapter.image_token_text(self.tokenizer)

    def prompt(self, text: str, n_images: int) -> str:
        """The context after `n_images` images, in the chat template (or the adapter's default)."""
        from vtprune.loading import prompt_text

        image_token = self._image_token()
        if image_token in text:  # some task texts carry the placeholder themselves
            text = text.replace(image_token, "").strip()
        return prompt_text(self.loaded, text, n_images, chat_template=self.chat_template)

    def inputs(self, prompts: list[str], images: list[list]) -> dict:
        """Left-padded model inputs for prompts with their images (PIL), on the model's device."""
        from vtprune.loading import prepare_inputs

        return prepare_inputs(self.loaded, prompts, [im for ims in images for im in ims])

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        flat = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if isinstance(v, (list, tuple)):
                flat.extend(v)
            elif v is not None:
                flat.append(v)
        if any(not hasattr(v, "convert") for v in flat):
            raise VtpruneError("vtprune's lmms-eval model takes images (PIL); this task gives videos or audio")
        return flat

    # --- one batched generate ----------------------------------------------------------------------------
    def _generate(self, prompts: list[str], images: list[list], gen: dict, forced: torch.Tensor | None = None):
        """-> (new token ids (B, T), raw logits per step [(B, V)], per-row efficiency fields)."""
        inputs = self.inputs(prompts, images)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.eot_token_id
        kwargs = dict(gen, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
        if forced is not None:
            width = inputs["input_ids"].shape[1]
            kwargs.update(
                max_new_tokens=int(forced.shape[1]),
                do_sample=False,
                num_beams=1,
                logits_processor=LogitsProcessorList([_ForceTokens(forced, width)]),
                eos_token_id=None,
                min_new_tokens=None,
            )
        with torch.inference_mode(), PrefillTimer(self.loaded.language_model) as timer:
            t0 = time.perf_counter()
            out = self._model.generate(**inputs, **kwargs)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            seconds = time.perf_counter() - t0
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        fields = self._fields(len(prompts), timer.ms[0] if timer.ms else float("nan"))
        self._gen_seconds += seconds
        return new, list(out.logits or []), fields

    def _fields(self, batch: int, prefill_ms: float) -> list[dict]:
        """Efficiency fields of each row of the last prefill (`vtprune.last_run`)."""
        rec = vtprune.last_run(self._model)
        if rec is None:
            return [{} for _ in range(batch)]
        step = max(len(rec.samples) // batch, 1)  # beam search expands rows
        rows = []
        for s in rec.samples[::step][:batch]:
            rows.append(
                {
                    "method": self.method,
                    "budget": self.budget if self.method != "none" else None,
                    "budget_mode": self.budget_mode,
                    "visual_tokens": s.n_visual,
                    "text_tokens": s.n_text,
                    "retained_tokens": s.retained_tokens,
                    "layer_avg_tokens": s.layer_avg_tokens,
                    "flops": prefill_flops_all(s.visual_per_layer, s.n_text, rec.dims),
                    "flops_unpruned": prefill_flops_all([s.n_visual] * rec.dims.num_layers, s.n_text, rec.dims),
                    "prefill_ms": prefill_ms,
                    "batch_size": batch,
                }
            )
        return rows

    @staticmethod
    def _gen_kwargs(gen_kwargs: dict, default_max: int) -> tuple[dict, list[str]]:
        g = dict(gen_kwargs or {})
        until = g.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(g.get("temperature") or 0.0)
        do_sample = bool(g.get("do_sample", False)) or temperature > 0
        out = {
            "max_new_tokens": int(g.get("max_new_tokens") or default_max),
            "do_sample": do_sample,
            "num_beams": int(g.get("num_beams") or 1),
        }
        if do_sample:
            out["temperature"] = temperature
            if g.get("top_p") is not None:
                out["top_p"] = float(g["top_p"])
        return out, until

    def _record(self, key: tuple, fields: dict) -> None:
        self.efficiency[key] = fields

    # --- lmms-eval requests ------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.eot_token_id
        for idx in groups.values():
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))  # stable: longest contexts first
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                args = [requests[i].args for i in chunk]
                images = [self._visuals(a[2], a[4], a[5], a[3]) for a in args]
                prompts = [self.prompt(a[0], len(ims)) for a, ims in zip(args, images, strict=True)]
                gen, until = self._gen_kwargs(args[0][1], self.max_new_tokens)
                new, _, fields = self._generate(prompts, images, gen)
                for row, (i, a) in enumerate(zip(chunk, args, strict=True)):
                    ids = new[row].tolist()
                    if eos is not None and eos in ids:
                        ids = ids[: ids.index(eos)]
                    pad = self.tokenizer.pad_token_id
                    ids = [t for t in ids if t != pad] if pad is not None and pad != eos else ids
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    self._gen_tokens += len(ids)
                    f = fields[row]
                    self._record((a[4], a[5], a[3], "generate_until"), f)
                    counts = VtpruneTokenCounts(
                        input_tokens=f.get("text_tokens", 0) + f.get("retained_tokens", 0),
                        output_tokens=len(ids),
                        vtprune_fields=f,
                    )
                    results[i] = GenerationResult(text=text, token_counts=counts)
        return results

    def _continuation_ids(self, prompt: str, continuation: str) -> list[int]:
        """Token ids of `continuation` after `prompt` (tokenised together, then split at the prompt's end)."""
        tok = self.tokenizer
        whole = tok(prompt + continuation, add_special_tokens=False)["input_ids"]
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        if whole[: len(head)] == head and len(whole) > len(head):
            return list(whole[len(head) :])
        return list(tok(continuation, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _ll_args(args: tuple) -> tuple:
        """(context, continuation, doc_to_visual, doc_id, task, split); lmms-eval's unconditional requests
        (`acc_mutual_info`) are `(context, continuation)` only: no image."""
        if len(args) == 2:
            return (args[0], args[1], None, None, None, None)
        return tuple(args)

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request."""
        results: list[GenerationResult | None] = [None] * len(requests)
        args = [self._ll_args(req.args) for req in requests]
        contexts: dict[tuple, list[int]] = {}  # (task, split, doc_id, context) -> request indices
        for i, (context, _, _, doc_id, task, split) in enumerate(args):
            contexts.setdefault((task, split, doc_id, context), []).append(i)
        # rows: one per distinct multi-token continuation of a context, else one per context
        rows: list[tuple[tuple, list[int] | None]] = []
        plan: dict[int, tuple[int, list[int]]] = {}  # request -> (row, continuation ids)
        cache: dict[tuple, tuple[list, str]] = {}
        for key, idx in contexts.items():
            task, split, doc_id, context = key
            images = self._visuals(args[idx[0]][2], task, split, doc_id)
            prompt = self.prompt(context, len(images))
            cache[key] = (images, prompt)
            first_row = None
            by_cont: dict[tuple, int] = {}
            for i in idx:
                target = args[i][1]
                cont = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                ids = self._continuation_ids(prompt, str(cont))
                if not ids:
                    raise VtpruneError(f"empty continuation {cont!r} for doc {doc_id} of {task}")
                if len(ids) > 1 and tuple(ids) not in by_cont:
                    by_cont[tuple(ids)] = len(rows)
                    rows.append((key, ids))
                row = by_cont.get(tuple(ids)) if len(ids) > 1 else None
                plan[i] = (row, ids)
                if first_row is None and row is not None:
                    first_row = row
            if first_row is None:
                first_row = len(rows)
                rows.append((key, None))
            for i in idx:
                if plan[i][0] is None:
                    plan[i] = (first_row, plan[i][1])
        # run the rows in batches; each row's logits per step
        row_logits: dict[int, list[torch.Tensor]] = {}
        row_fields: dict[int, dict] = {}
        for start in range(0, len(rows), self.batch_size):
            batch = list(range(start, min(start + self.batch_size, len(rows))))
            steps = max(len(rows[r][1] or [0]) for r in batch)
            forced = torch.full((len(batch), steps), -1, dtype=torch.long)
            for j, r in enumerate(batch):
                ids = rows[r][1]
                if ids:
                    forced[j, : len(ids)] = torch.tensor(ids)
            prompts = [cache[rows[r][0]][1] for r in batch]
            images = [cache[rows[r][0]][0] for r in batch]
            _, logits, fields = self._generate(prompts, images, {}, forced=forced)
            for j, r in enumerate(batch):
                row_logits[r] = [step[j].float().log_softmax(-1).cpu() for step in logits]
                row_fields[r] = fields[j]
        for key, idx in contexts.items():
            task, split, doc_id, _ = key
            if task is not None:  # not for unconditional (text-only) requests
                self._record((task, split, doc_id, "loglikelihood"), row_fields[plan[idx[0]][0]])
        for i in range(len(requests)):
            row, ids = plan[i]
            steps = row_logits[row]
            lp = sum(float(steps[t][tok]) for t, tok in enumerate(ids))
            greedy = all(int(steps[t].argmax()) == tok for t, tok in enumerate(ids))
            f = row_fields[row]
            counts = VtpruneTokenCounts(
                input_tokens=f.get("text_tokens", 0) + f.get("retained_tokens", 0),
                output_tokens=len(ids),
                vtprune_fields=f,
            )
            results[i] = GenerationResult(text=(lp, greedy), token_counts=counts)
        return results

    # --- end of the run: efficiency summary --------------------------------------------------------------
    def gathered_efficiency(self) -> list[dict]:
        """Per-document efficiency fields of every rank, sorted by (task, split, doc id, request type)."""
        items = sorted(self.efficiency.items(), key=lambda kv: tuple(str(x) for x in kv[0][:2]) + kv[0][2:])
        local = [{"task": k[0], "split": k[1], "doc_id": k[2], "request": k[3], **v} for k, v in items]
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * self._world_size
            torch.distributed.all_gather_object(parts, local)
            local = [x for part in parts for x in part]
            local.sort(key=lambda r: (r["task"], str(r["split"]), r["doc_id"], r["request"]))
        return local

    def clean(self):
        """Log the efficiency means (all ranks) into lmms-eval's metric log, then free the model."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        records = self.gathered_efficiency()
        self.efficiency_summary = summarize_by_task(records)
        if records and self._rank == 0:
            log_metrics(
                total_elapsed_time=self._gen_seconds,
                total_gen_tokens=self._gen_tokens,
                avg_speed=self._gen_tokens / self._gen_seconds if self._gen_seconds > 0 else 0.0,
                additional_metrics=summary_metrics(self.efficiency_summary),
            )
        if vtprune.session_of(self._model) is not None:
            vtprune.remove(self._model)
        self.loaded.model = None  # let lmms-eval's clean free the weights (e.g. before an LLM judge)
        super().clean()


def _destroy_process_group() -> None:
    """Close torch.distributed's default group at exit, while the interpreter is alive: a gloo group left open can
    abort a rank at shutdown ("terminate called without an active exception", exit -6; seen once in the two-process
    lmms-eval test, and a known PyTorch behaviour when destroy_process_group is not called). Local, no collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
