"""Question text helpers for text-conditioned methods: the user-question tokens and their nouns.

Our decisions (spec README §3, resprune.md Step A):
- The *question span* of a sample is the text after its last image span up to the last prompt token.
- The *user-question tokens* are that span without special tokens and, when a tokenizer is known,
  without the trailing generation header of the chat template (`ASSISTANT:`, `assistant\\n`, ...).
- Nouns (`extract_nouns`, `vtprune.text.nouns`): the answer-format instruction is removed first
  (`vtprune.text.instructions`); then spaCy `en_core_web_sm` (NOUN/PROPN lemmas) when spaCy and that model
  are installed, else the built-in rule-based tagger; lower-cased, de-duplicated, in order of first appearance.
"""

from __future__ import annotations

import re

from .instructions import INSTRUCTION_PATTERNS, strip_instructions
from .lexicon import META_NOUNS, ROLE_WORDS
from .nouns import EXTRACTORS, Nouns, extract_nouns, rule_nouns, spacy_available

__all__ = [
    "EXTRACTORS", "INSTRUCTION_PATTERNS", "META_NOUNS", "ROLE_WORDS", "STOP_WORDS", "Nouns", "extract_nouns",
    "question_nouns", "rule_nouns", "spacy_available", "strip_generation_header", "strip_instructions",
]

#: English function words, frequent verbs/adjectives of VQA prompts and answer-format instructions (kept for
#: callers that filter words; the noun extractor uses `vtprune.text.lexicon`).
STOP_WORDS = ROLE_WORDS | frozenset(
    """
    a about above after again against all also am an and any are aren as at be because been before being
    below between both but by can cannot could couldn did didn do does doesn doing don down during each
    either else ever every few for from further get gets got had hadn has hasn have haven having he her
    here hers herself him himself his how however i if in into is isn it its itself just least less let
    like may me might mine more most much must mustn my myself neither never no nor not now of off often
    on once one only onto or other others ought our ours ourselves out over own per please rather same
    shall shan she should shouldn since so some such than that the their theirs them themselves then
    there these they this those though through thus to too toward towards under until up upon us very
    via was wasn we were weren what whatever when where whether which while who whom whose why will with
    within without won would wouldn yes yet you your yours yourself yourselves
    answer answers using word phrase single short briefly brief describe description detail details
    detailed tell give show provide explain identify choose select option options correct letter
    directly given following based according question questions image picture photo shown visible see
    seen look looks appear appears many kind type sort color colour there's what's it's
    """.split()
)

_HEADER = re.compile(r"\s*(assistant|gpt)\s*:?\s*$", re.IGNORECASE)


def strip_generation_header(pieces: list[str]) -> int:
    """Number of leading pieces to keep so that the trailing chat header (e.g. "ASSISTANT:") is removed.

    pieces: decoded text of each token of the question span, in order.  -> count to keep.
    """
    tail = ""
    for i in range(len(pieces) - 1, -1, -1):
        tail = pieces[i] + tail
        if _HEADER.fullmatch(tail) and re.search(r"[A-Za-z]", tail):
            return i
        if len(tail) > 24:
            break
    return len(pieces)


def question_nouns(text: str, *, use_spacy: bool = True) -> list[str]:
    """Nouns of a question (`extract_nouns(text).words`; `use_spacy=False` forces the rule-based tagger)."""
    return list(extract_nouns(text, "auto" if use_spacy else "rules").words)
