"""Question nouns for text-conditioned pruning (spec resprune.md Step A.1), offline.

`extract_nouns(text)` first removes the answer-format instruction (`vtprune.text.instructions`), then tags the
rest with spaCy `en_core_web_sm` (NOUN / PROPN lemmas) when spaCy *and* that model are installed, otherwise
with the built-in rule-based tagger below. Both paths lower-case, drop role words (`ROLE_WORDS`), words that
name the input itself (`META_NOUNS`: "image", "picture", ...), non-alphabetic and one-letter words, and
de-duplicate in order of first appearance. The result says which extractor ran ("spacy" / "rules").

The rule-based tagger (Our decision; no download, nothing unpickled) reads the words left to right with one
word of look-ahead. Closed classes (determiners, pronouns, prepositions, auxiliaries, numbers, ...) and the
verbs / adjectives frequent in VQA questions come from `vtprune.text.lexicon`; a word in none of its lists
is a noun unless its suffix marks it otherwise (-ing / -ed verb forms, -ly adverbs, -ous / -ful / -less /
-able / -ive adjectives, comparatives of listed adjectives). Context decides the ambiguous words:
- noun / verb words ("sign", "ride", "cross"): a verb after a subject pronoun, a modal, a negation or "to",
  or after a noun when a determiner / pronoun / number follows ("the man rides a horse"); a noun otherwise;
- adjective / noun words ("orange", "square", "light"): an adjective before a noun or adjective, a noun after
  a determiner / preposition with no noun following ("the red square ?");
- positions ("left", "top", "front"): a noun after a determiner, possessive, preposition or adjective when no
  noun follows ("on the left", "in front of"), else not ("left of the cross", "the left side");
- -ing words: a noun after a determiner / possessive / adjective ("the building") or when listed as a noun
  that is no verb form ("morning", "ceiling"), else a verb;
- a capitalised word inside a sentence is a proper noun (kept as written, lower-cased), unless most words
  are capitalised (a title-case or upper-case question).
Nouns are lemmatised by singularising regular and listed irregular plurals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..errors import VtpruneError
from . import lexicon as lx
from .instructions import strip_instructions

#: Accepted values of `extract_nouns(extractor=...)`.
EXTRACTORS = ("auto", "spacy", "rules")


@dataclass(frozen=True)
class Nouns:
    """The nouns of one question and how they were found.

    words:     lemmas, lower-case, de-duplicated, in order of first appearance.
    extractor: "spacy" (en_core_web_sm) or "rules" (the built-in tagger).
    question:  the text the extractor read (the input without its answer-format instruction).
    """

    words: tuple[str, ...]
    extractor: str
    question: str


def _verb_forms(bases: frozenset[str]) -> frozenset[str]:
    """Base, -s, -ed and -ing forms of each verb (regular spelling rules, doubled final consonant included)."""
    out = set()
    for b in bases:
        out.add(b)
        if b.endswith("y") and b[-2:-1] not in ("a", "e", "o", "u"):
            out |= {b[:-1] + "ies", b[:-1] + "ied", b + "ing"}
            continue
        out.add(b + ("es" if b.endswith(("s", "x", "z", "ch", "sh", "o")) else "s"))
        if b.endswith("ie"):
            out |= {b + "d", b[:-2] + "ying"}
        elif b.endswith("ee"):
            out |= {b + "d", b + "ing"}
        elif b.endswith("e"):
            out |= {b + "d", b[:-1] + "ing"}
        else:
            out |= {b + "ed", b + "ing"}
            if len(b) >= 3 and b[-1] not in "aeiouwxy" and b[-2] in "aeiou" and b[-3] not in "aeiou":
                out |= {b + b[-1] + "ed", b + b[-1] + "ing"}
    return frozenset(out)


_ALL_VERB_BASES = lx.VERBS | lx.NOUN_VERBS
_PURE_VERB_FORMS = (_verb_forms(lx.VERBS - lx.NOUN_VERBS) | lx.IRREGULAR_VERB_FORMS) - lx.POSITIONAL
_NV_FORMS = frozenset(w for w in _verb_forms(lx.NOUN_VERBS) if not w.endswith(("ing", "ed", "d")) or w in lx.NOUN_VERBS)
_VERBAL_ING = frozenset(w for w in _verb_forms(_ALL_VERB_BASES) if w.endswith("ing"))
_DETLIKE = {"DET", "POSS", "NUM", "ADJ"}
_HEADS = {"N", "NV", "AN", "PROPN"}
_ADJ_SUFFIX = ("ous", "ful", "less", "able", "ible", "ive", "ish")

_TOKEN = re.compile(r"[A-Za-z]+|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,:]\d+)*|\n|[^\sA-Za-z\d]")


def _tokens(text: str) -> list[tuple[str, bool]]:
    """(word, sentence-initial) pairs; contractions split ("don't" -> do not, "man's" -> man 's)."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\b([Cc])an't\b", r"\1an not", text)
    text = re.sub(r"\b([Ww])on't\b", r"\1ill not", text)
    text = re.sub(r"n't\b", " not", text)
    out, initial = [], True
    for tok in _TOKEN.findall(text):
        out.append((tok, initial))
        initial = tok in (".", "?", "!", ":", ";", "\n")
    return out


def _comparative_of_adjective(w: str) -> bool:
    for suf in ("est", "er"):
        if w.endswith(suf) and len(w) > len(suf) + 2:
            stem = w[: -len(suf)]
            cands = {stem, stem + "e", stem[:-1] if len(stem) > 2 and stem[-1] == stem[-2] else stem,
                     stem[:-1] + "y" if stem.endswith("i") else stem}
            if cands & lx.ADJECTIVES:
                return True
    return False


def _raw_class(w: str, prev: str | None) -> str:
    """Context-free class of a lower-case word (closed classes, lexicon entries, suffix rules)."""
    if w.isdigit() or w in lx.NUMBERS:
        return "NUM"
    if w == "'s":
        return "AUX" if prev in lx.WH_WORDS | lx.PRONOUNS | {"there", "here", "that", "this"} else "POSS"
    if w in ("what", "which", "whose"):
        return "DET"
    if w in ("who", "whom"):
        return "PRON"
    if w == "to":
        return "TO"
    for cls, words in (("DET", lx.DETERMINERS | lx.QUANTIFIERS), ("POSS", lx.POSSESSIVES), ("PRON", lx.PRONOUNS),
                       ("PREP", lx.PREPOSITIONS), ("CONJ", lx.CONJUNCTIONS), ("AUX", lx.AUXILIARIES),
                       ("MODAL", lx.MODALS), ("NEG", lx.NEGATIONS), ("ADV", lx.ADVERBS | lx.WH_WORDS)):
        if w in words:
            return cls
    if not w.isalpha():
        return "PUNCT"
    if w in lx.POSITIONAL:
        return "POSN"
    if w in lx.ADJECTIVE_NOUNS:
        return "AN"
    if w in lx.ADJECTIVES:
        return "ADJ"
    if w in lx.IRREGULAR_PLURALS:
        return "N"  # "leaves", "men" (never read as verb forms)
    if w.endswith("ing") and len(w) > 4 and w not in lx.AUXILIARIES:
        return "ING"  # verb form or -ing noun: decided in context
    if w in _NV_FORMS:
        return "NV"
    if w in _PURE_VERB_FORMS:
        return "VERB"
    if w.endswith("ings") and len(w) > 5:
        return "N"  # plural of an -ing noun ("buildings", "earrings")
    if w.endswith("ed") and len(w) > 4 and w not in lx.ED_NOUNS:
        return "ADJ"  # participle / adjective ("parked", "striped")
    if w.endswith("ly") and len(w) > 4 and w not in lx.LY_NOUNS:
        return "ADV"
    if w.endswith(_ADJ_SUFFIX) and len(w) > 5 and w not in lx.ADJ_SUFFIX_NOUNS:
        return "ADJ"
    if _comparative_of_adjective(w):
        return "ADJ"
    return "N"


def singular(w: str) -> str:
    """Lemma of a lower-case noun: listed irregular plurals, invariant nouns, then the regular -s rules."""
    if w in lx.IRREGULAR_PLURALS:
        return lx.IRREGULAR_PLURALS[w]
    if w in lx.INVARIANT_S or len(w) <= 3 or w.endswith(("ss", "us", "ous")):
        return w
    if w.endswith("ies"):
        return w[:-1] if w in lx.IE_PLURALS or len(w) <= 4 else w[:-3] + "y"
    if w.endswith("oes"):
        return w[:-2] if w in lx.OES_PLURALS else w[:-1]
    if w.endswith(("xes", "zzes", "ches", "shes", "sses")):
        return w[:-2]
    if w.endswith("s"):
        return w[:-1]
    return w


def rule_nouns(text: str) -> list[str]:
    """Nouns of `text` by the built-in rule-based tagger (lemmas, lower-case, in order, with repeats)."""
    toks = _tokens(text)
    alpha = [t for t, _ in toks if t.isalpha()]
    caps_off = len(alpha) > 0 and sum(t[0].isupper() for t in alpha) > len(alpha) / 2
    low = [t.lower() for t, _ in toks]
    raw = []
    for i, (tok, initial) in enumerate(toks):
        w = low[i]
        cls = _raw_class(w, low[i - 1] if i else None)
        if (not initial and not caps_off and tok[0].isupper() and tok.isalpha() and tok != "I"
                and cls not in ("DET", "POSS", "PRON", "PREP", "CONJ", "AUX", "MODAL", "NEG", "NUM", "TO")):
            cls = "PROPN"
        raw.append(cls)
    out: list[str] = []
    prev = "START"
    verb_ahead = [False] * len(raw)  # a listed verb form later in the same sentence
    seen = False
    for i in range(len(raw) - 1, -1, -1):
        verb_ahead[i] = seen
        seen = (seen or raw[i] == "VERB") and not (toks[i][1] and i)
        if toks[i][0] in (".", "?", "!", ";", "\n"):
            seen = False
    do_support = False  # a do / does / did whose main verb has not come yet ("What does the sign say?")
    for i, cls in enumerate(raw):
        if i and toks[i][1]:
            prev, do_support = "START", False
        nxt = raw[i + 1] if i + 1 < len(raw) else "END"
        w = low[i]
        res = cls
        if cls == "PROPN":
            out.append(w)
            res = "NOUN"
        elif cls == "N":
            res = "VERB" if prev in ("MODAL", "NEG") else "NOUN"
        elif cls == "NV":
            if prev in ("START", "CONJ") and nxt in ("DET", "POSS", "PRON", "NUM"):
                res = "VERB"  # imperative ("Count the apples.")
            elif prev in ("MODAL", "NEG", "TO", "SUBJ"):
                res = "VERB"
            elif prev == "NOUN" and (nxt in ("DET", "POSS", "PRON", "NUM") or (do_support and not verb_ahead[i])):
                res = "VERB"
            else:
                res = "NOUN"
        elif cls == "AN":
            if prev == "NOUN" and nxt not in _HEADS:
                res = "NOUN"  # head of a compound ("traffic light")
            elif nxt in _HEADS or nxt == "ADJ":
                res = "ADJ"
            else:
                res = "NOUN" if prev in _DETLIKE or prev in ("PREP", "TO") else "ADJ"
        elif cls == "POSN":
            res = "NOUN" if (prev in _DETLIKE or prev in ("PREP", "TO")) and nxt not in _HEADS else "ADV"
        elif cls == "ING":
            nominal = w in lx.ING_NOUNS and w not in _VERBAL_ING
            res = "NOUN" if nominal or prev in _DETLIKE else "VERB"
        if res == "NOUN" and cls != "PROPN":
            out.append(singular(w))
        if w in ("do", "does", "did"):
            do_support = True
        elif res == "VERB":
            do_support = False
        if cls == "PRON" and w in lx.SUBJECT_PRONOUNS:
            prev = "SUBJ"
        else:
            prev = res if res in ("NOUN", "VERB", "ADJ") else cls
    return out


@lru_cache(maxsize=1)
def _spacy_model():
    """spaCy's `en_core_web_sm` pipeline, or None when spaCy or that model is not installed (never downloads)."""
    try:
        import spacy  # noqa: PLC0415

        return spacy.load("en_core_web_sm", disable=["parser", "ner"])
    except Exception:  # spaCy missing, or installed without the model: the rule-based tagger is used
        return None


def spacy_available() -> bool:
    """True when spaCy with `en_core_web_sm` can be loaded (no download is attempted)."""
    return _spacy_model() is not None


@lru_cache(maxsize=4096)
def extract_nouns(text: str, extractor: str = "auto") -> Nouns:
    """Nouns of a user question (instruction stripped first).

    extractor: "auto" (spaCy with en_core_web_sm when loadable, else the rules), "spacy" (error when not
    loadable) or "rules".
    """
    if extractor not in EXTRACTORS:
        raise VtpruneError(f"noun extractor must be one of {EXTRACTORS}, got {extractor!r}")
    question = strip_instructions(text)
    nlp = _spacy_model() if extractor != "rules" else None
    if extractor == "spacy" and nlp is None:
        raise VtpruneError(
            "noun extractor 'spacy' needs spaCy with the en_core_web_sm model installed; use 'auto' or 'rules'"
        )
    if nlp is not None:
        words = [t.lemma_.lower() for t in nlp(question) if t.pos_ in ("NOUN", "PROPN")]
        name = "spacy"
    else:
        words = rule_nouns(question)
        name = "rules"
    words = [w for w in words if w.isalpha() and len(w) >= 2 and w not in lx.ROLE_WORDS and w not in lx.META_NOUNS]
    return Nouns(tuple(dict.fromkeys(words)), name, question)
