"""Task functions of `vtprune_shapes` / `vtprune_shapes_mc` (copied beside the exported data by
`vtprune.eval.lmms.write_task`; image paths are relative to this file's directory)."""

from pathlib import Path

from vtprune.eval.lmms import task as _task

ROOT = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return _task.doc_to_visual(doc, ROOT)


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _task.doc_to_text(doc, lmms_eval_specific_kwargs)


def doc_to_choice(doc):
    return _task.answer_choices()


def doc_to_target_mc(doc):
    return _task.answer_choices().index(doc["answer"])


def process_results(doc, results):
    return _task.process_results(doc, results)


def process_results_mc(doc, results):
    return _task.process_results_mc(doc, results)
