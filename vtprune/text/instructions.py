"""Answer-format instructions and prompt scaffolding removed from a question before noun extraction.

Spec resprune.md Step A.1 runs the noun extractor on "the user-question text only (no system prompt, template
or answer-format instruction)". The engine's question span (`vtprune.text`, spec README §3) already drops
special tokens and the trailing generation header; what remains can still carry the evaluation harness's
instruction ("Answer the question using a single word or phrase."), whose words ("question", "word",
"phrase", "option", "letter") are nouns to any tagger. `strip_instructions` removes them.

Where each phrase comes from (written from the public prompt formats; no text copied from those projects):
- LLaVA-1.5 evaluation prompts (LLaVA repo, `scripts/v1_5/eval`): "Answer the question using a single word
  or phrase." (VQAv2, GQA, VizWiz, TextVQA, POPE, MME), "When the provided information is insufficient,
  respond with 'Unanswerable'." (VizWiz), "Answer with the option's letter from the given choices
  directly." (ScienceQA, MMBench, SEED-Bench), TextVQA's "Reference OCR token: ..." line.
- lmms-eval task configs (`lmms_eval/tasks/*`, `post_prompt` / `pre_prompt`): the two LLaVA sentences
  above (default post-prompts of MME, POPE, TextVQA, GQA, VQAv2, DocVQA, ScienceQA, MMBench, AI2D), and
  "Answer the question with Yes or No." (MME), "Answer the question with a single word." (ChartQA),
  "Respond with one word." (OK-VQA), "Provide a short and direct response." (TextVQA, OCRBench), "Your
  response must be concise." (POPE), "Answer with the option letter only." / "Answer the question with A, B,
  C, or D." / "Please answer directly with only the letter of the correct option and nothing else." /
  "Only give the best option." / "The best answer is:" / "Select the best answer to the above
  multiple-choice question based on the image. Respond with only the letter (...) of the correct option."
  (multiple-choice suites), "Answer with a single integer." / "Answer briefly and directly in one float
  number." (math suites), "Let's think step by step." / "Think step by step and give your final answer ..."
  (reasoning variants), the "Question:" pre-prompt and the " Answer:" post-prompt of the Qwen-VL / plain
  variants, and the "Hint:", "Context:", "Options:" / "Choices:" labels and "A." option markers of the
  MMBench / ScienceQA / MMMU layouts (the option texts themselves are kept: they name things to look for).
- Dataset-side suffixes: MME questions end with "Please answer yes or no."; POPE asks "Is there a X in the
  image?" (no suffix; the image noun is dropped by `META_NOUNS`).
- Qwen2.5-VL chat template: its default system prompt "You are a helpful assistant." (normally before the
  image, removed here when a template puts it in the span); the role markers are `ROLE_WORDS`.
- The built-in testbed (`<s> user : <image> q assistant :`): no instruction; its role words are removed by
  the engine's header strip and `ROLE_WORDS`.

Our decision: the phrases are matched case-insensitively, with flexible spacing and optional final
punctuation, anywhere in the text (an instruction may precede or follow the question); each match is
replaced by a sentence break so the words around it never join into one noun phrase.
"""

from __future__ import annotations

import re

#: (regular expression, where it comes from). Matched case-insensitively; whitespace inside is `\s+`.
INSTRUCTION_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(?:please\s+)?answer\s+(?:the\s+question\s+|this\s+question\s+|it\s+)?(?:using|with|in)\s+"
     r"(?:a\s+|one\s+)?(?:single\s+|short\s+)?(?:word|phrase|number|integer|sentence)"
     r"(?:\s+or\s+(?:a\s+)?(?:short\s+)?(?:word|phrase|number|sentence))?\s*[.!]?",
     "LLaVA-1.5 / lmms-eval default post-prompt (VQAv2, GQA, TextVQA, POPE, MME, DocVQA); ChartQA"),
    (r"when\s+the\s+provided\s+information\s+is\s+insufficient,?\s+respond\s+with\s+['\"]?unanswerable['\"]?\s*[.!]?",
     "LLaVA-1.5 / lmms-eval VizWiz"),
    (r"(?:please\s+)?answer\s+with\s+the\s+option'?s?\s+letter\s*(?:\([^)]*\)\s*)?from\s+the\s+given\s+choices"
     r"(?:\s+directly)?\s*[.!]?",
     "LLaVA-1.5 / lmms-eval ScienceQA, MMBench, SEED-Bench, AI2D; Qwen2-VL multiple-choice prompts"),
    (r"(?:please\s+)?answer\s+(?:with\s+)?the\s+option\s+letter(?:\s+only)?(?:\s+from\s+the\s+given\s+choices"
     r"(?:\s+directly)?)?\s*[.!]?",
     "lmms-eval MMMU / AI2D variants"),
    (r"(?:please\s+)?answer\s+(?:the\s+question\s+)?with\s+(?:yes\s+or\s+no|a,\s*b,\s*c,?\s*(?:or\s+)?d)\s*[.!]?",
     "lmms-eval MME ('with Yes or No'), multiple-choice 'with A, B, C, or D'"),
    (r"please\s+answer\s+(?:with\s+)?(?:yes\s+or\s+no|yes/no)\s*[.!]?",
     "MME dataset question suffix"),
    (r"please\s+answer\s+directly\s+with\s+only\s+the\s+letter\s+of\s+the\s+correct\s+option"
     r"(?:\s+and\s+nothing\s+else)?\s*[.!]?",
     "lmms-eval multiple-choice suites"),
    (r"select\s+the\s+best\s+answer\s+to\s+the\s+above\s+multiple-choice\s+question\s+based\s+on\s+the\s+"
     r"(?:image|video)\s*[.!]?",
     "lmms-eval multiple-choice suites"),
    (r"respond\s+with\s+only\s+the\s+letter\s*(?:\([^)]*\)\s*)?of\s+the\s+correct\s+option\s*[.!]?",
     "lmms-eval multiple-choice suites"),
    (r"respond\s+with\s+(?:one|a\s+single)\s+word\s*[.!]?", "lmms-eval OK-VQA"),
    (r"provide\s+a\s+short\s+and\s+direct\s+response\s*[.!]?", "lmms-eval TextVQA / OCRBench"),
    (r"your\s+(?:response|answer)\s+must\s+be\s+concise\s*[.!]?", "lmms-eval POPE variant"),
    (r"only\s+give\s+the\s+best\s+option\s*[.!]?", "lmms-eval multiple-choice suites"),
    (r"(?:give\s+me\s+the\s+answer\s+letter\s+directly\.?\s*)?the\s+best\s+answer\s+is\s*:?",
     "lmms-eval video multiple-choice suites"),
    (r"answer\s+briefly\s+and\s+directly\s+in\s+one\s+(?:float\s+|integer\s+)?number\s*[.!]?",
     "lmms-eval numeric answers"),
    (r"answer\s+(?:this\s+question\s+)?briefly\s*[.!]?", "lmms-eval MME (InternLM-XComposer variant)"),
    (r"(?:let'?s|please)\s+think\s+step\s+by\s+step\s*[.!]?", "lmms-eval chain-of-thought variants"),
    (r"think\s+step\s+by\s+step\s+and\s+give\s+your\s+final\s+answer[^.\n]*[.!]?",
     "lmms-eval chain-of-thought variants"),
    (r"put\s+your\s+final\s+answer\s+in[^.\n]*[.!]?", "chain-of-thought answer-format variants"),
    (r"please\s+answer\s+the\s+following\s+questions?\s+about\s+the\s+(?:image|video)s?\s*[.!:]?",
     "lmms-eval pre-prompt"),
    (r"you\s+are\s+a\s+helpful\s+assistant\s*[.!]?", "Qwen2.5-VL / Qwen2-VL default system prompt"),
    (r"reference\s+ocr\s+tokens?\s*:[^\n]*", "LLaVA-1.5 TextVQA prompt (OCR tokens of the image, not the user's)"),
    (r"(?:^|(?<=\n))\s*(?:question|hint|context|options|choices|answer)\s*:",
     "lmms-eval / MMBench / ScienceQA / MMMU field labels ('Question:', 'Hint:', 'Options:', ' Answer:')"),
    (r"\banswer\s*:\s*$", "Qwen-VL / plain ' Answer:' post-prompt"),
    (r"(?:^|(?<=\n))\s*\(?[A-Ha-h][.)]\s", "multiple-choice option markers ('A. ', '(B) ') at a line start"),
    (r"(?<=\s)\([A-Ha-h]\)\s", "inline multiple-choice option markers '(A) '"),
)

_COMPILED = tuple(re.compile(p, re.IGNORECASE) for p, _ in INSTRUCTION_PATTERNS)


def strip_instructions(text: str) -> str:
    """The question text without answer-format instructions, harness labels and option markers.

    text: the decoded user-question span.  -> the remaining text (each removal leaves a sentence break "\\n").
    """
    out = text
    for pat in _COMPILED:
        out = pat.sub("\n", out)
    out = re.sub(r"[ \t]+", " ", out)
    out = re.sub(r"\s*\n\s*", "\n", out)
    return out.strip()
