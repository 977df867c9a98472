"""ResPrune's question nouns (issue #22 item 4; spec resprune.md Step A.1): answer-format instructions are removed
before tagging, an offline rule-based tagger stands in when spaCy + en_core_web_sm are not installed, the
extractor and words are recorded, and the default greedy path equals the batched one.

Reference set: 90 VQA-style questions written for this test (COCO / VQAv2 / GQA / TextVQA style), with the
nouns a careful annotator tags NOUN / PROPN, as lemmas, minus `META_NOUNS`. The last 25 were written before
the tagger was run on them: its first run scored P = R = 0.980 there (one miss, "leaves" read as a verb, and
one extra noun, "cut" in "Is the pizza cut into eight slices?", still wrong and kept as a known error). The
old fallback (every non-stop-word of length >= 3) scores P = 0.65, R = 0.86 on the full set. The asserted
floor, P >= 0.95 and R >= 0.95, allows about 4 wrong words of ~180 and fails for any tagger that lets
verbs / adjectives through the way the old fallback did.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from factories import image_tokens

from vtprune.errors import VtpruneError
from vtprune.methods.resprune import (
    ResPrune,
    residual_greedy,
    residual_greedy_batched,
    residual_greedy_blocked,
    residual_greedy_gram,
    text_relevance,
)
from vtprune.text import (
    INSTRUCTION_PATTERNS,
    META_NOUNS,
    extract_nouns,
    question_nouns,
    rule_nouns,
    spacy_available,
    strip_instructions,
)
from vtprune.text import nouns as nouns_module
from vtprune.text.nouns import singular

torch.set_num_threads(1)

GOLD: list[tuple[str, list[str]]] = [
    ('What color is the fire hydrant?', ['color', 'fire', 'hydrant']),
    ('How many giraffes are standing in the field?', ['giraffe', 'field']),
    ('Is the man wearing a helmet?', ['man', 'helmet']),
    ('What is the woman holding in her left hand?', ['woman', 'hand']),
    ('Where is the cat sleeping?', ['cat']),
    ('What sport is being played?', ['sport']),
    ('Are there any people on the beach?', ['people', 'beach']),
    ('What is on top of the cake?', ['top', 'cake']),
    ('Is the traffic light red?', ['traffic', 'light']),
    ('What does the sign say?', ['sign']),
    ('How many slices of pizza are on the plate?', ['slice', 'pizza', 'plate']),
    ('What brand is the laptop?', ['brand', 'laptop']),
    ('Is the dog chasing the frisbee?', ['dog', 'frisbee']),
    ('What animal is lying on the couch?', ['animal', 'couch']),
    ('Which side of the road is the bus on?', ['side', 'road', 'bus']),
    ('What is the boy riding?', ['boy']),
    ('Are the bananas ripe?', ['banana']),
    ('What kind of tree is behind the bench?', ['kind', 'tree', 'bench']),
    ('Is the window open or closed?', ['window']),
    ('What time does the clock show?', ['time', 'clock']),
    ('What number is on the jersey of the baseball player?', ['number', 'jersey', 'baseball', 'player']),
    ('Who is sitting on the motorcycle?', ['motorcycle']),
    ('What is the name of the store?', ['name', 'store']),
    ('What is written on the bottle?', ['bottle']),
    ('How many cows are grazing in the pasture?', ['cow', 'pasture']),
    ('Is the sky cloudy?', ['sky']),
    ('What vegetables are in the bowl?', ['vegetable', 'bowl']),
    ("Is the tennis racket in the man's right hand?", ['tennis', 'racket', 'man', 'hand']),
    ('What is the little girl eating?', ['girl']),
    ('Are the skis parallel to each other?', ['ski']),
    ("What color are the woman's shoes?", ['color', 'woman', 'shoe']),
    ('Is there a stop sign at the corner?', ['stop', 'sign', 'corner']),
    ('What are the children playing with?', ['child']),
    ('How many windows does the building have?', ['window', 'building']),
    ('Is the elephant drinking water?', ['elephant', 'water']),
    ('What is parked next to the curb?', ['curb']),
    ('Which animal is bigger, the horse or the dog?', ['animal', 'horse', 'dog']),
    ('What is the pattern on the shirt?', ['pattern', 'shirt']),
    ('Is the glass full of wine?', ['glass', 'wine']),
    ('What is the airplane flying over?', ['airplane']),
    ('What is written on the red sign next to the door?', ['sign', 'door']),
    ('What is the license plate number of the car?', ['license', 'plate', 'number', 'car']),
    ('What does the text on the mug say?', ['text', 'mug']),
    ('What year is shown on the coin?', ['year', 'coin']),
    ('Who is the author of the book?', ['author', 'book']),
    ('What is the title of the movie on the poster?', ['title', 'movie', 'poster']),
    ('What street is this sign for?', ['street', 'sign']),
    ('What does the Nike logo on the shirt look like?', ['nike', 'logo', 'shirt']),
    ('Is the train at the station?', ['train', 'station']),
    ('What is the person on the left holding?', ['person', 'left']),
    ('Is the cup to the left or to the right of the laptop?', ['cup', 'left', 'right', 'laptop']),
    ('What piece of furniture is in front of the television?', ['piece', 'furniture', 'front', 'television']),
    ('Are the glasses on the table?', ['glasses', 'table']),
    ('Is the surfer riding a wave?', ['surfer', 'wave']),
    ('What is the orange vegetable on the plate?', ['vegetable', 'plate']),
    ('Is the knife made of plastic?', ['knife', 'plastic']),
    ('Do the shelves hold books?', ['shelf', 'book']),
    ('Can you see the mountains in the background?', ['mountain', 'background']),
    ('Is the boy on the skateboard doing a trick?', ['boy', 'skateboard', 'trick']),
    ('What is the weather like?', ['weather']),
    ('Is this photo taken indoors?', []),
    ('Describe the image in detail.', ['detail']),
    ('Is there a cat in the image? Answer the question using a single word or phrase.', ['cat']),
    ("Which object is closer to the camera, the lamp or the chair?\nA. lamp\nB. chair\n"
     "Answer with the option's letter from the given choices directly.", ['object', 'camera', 'lamp', 'chair']),
    ('Is there a blue car in this image? Please answer yes or no.', ['car']),
    ('What is the man in the blue jacket carrying?', ['man', 'jacket']),
    ('How many candles are on the birthday cake?', ['candle', 'birthday', 'cake']),
    ('Is the giraffe eating leaves from the tree?', ['giraffe', 'leaf', 'tree']),
    ('What color is the umbrella the woman is holding?', ['color', 'umbrella', 'woman']),
    ('Are the lights on in the kitchen?', ['light', 'kitchen']),
    ('What is the dog lying next to?', ['dog']),
    ('Which direction is the arrow pointing?', ['direction', 'arrow']),
    ('What kind of bird is perched on the fence?', ['kind', 'bird', 'fence']),
    ('Is it raining?', []),
    ('How many people are waiting at the bus stop?', ['people', 'bus', 'stop']),
    ('What is the price of the bananas?', ['price', 'banana']),
    ('What is the cat looking at?', ['cat']),
    ('Is the pizza cut into eight slices?', ['pizza', 'slice']),
    ('What game are the kids playing?', ['game', 'kid']),
    ('What is hanging from the ceiling?', ['ceiling']),
    ('Does the bathroom have a bathtub?', ['bathroom', 'bathtub']),
    ('What is the horse pulling?', ['horse']),
    ('Is the computer monitor turned on?', ['computer', 'monitor']),
    ('What is the sheep standing on?', ['sheep']),
    ('What website is written at the bottom of the poster?', ['website', 'bottom', 'poster']),
    ('Is the player about to hit the ball?', ['player', 'ball']),
    ('What flavor is the donut with pink frosting?', ['flavor', 'donut', 'frosting']),
    ('Why is the man wearing a wetsuit?', ['man', 'wetsuit']),
    ('What are the zebras doing?', ['zebra']),
    ('Which hand is the batter using?', ['hand', 'batter']),
]

#: Unambiguous questions whose exact noun list (order included) is asserted one by one.
CLEAR = [
    ("How many giraffes are standing in the field?", ["giraffe", "field"]),
    ("Is the man wearing a helmet?", ["man", "helmet"]),
    ("What color is the car parked next to the red bus?", ["color", "car", "bus"]),
    ("Is the woman holding an umbrella? Is the umbrella open?", ["woman", "umbrella"]),
    ("What's on the table, and who is sitting at it?", ["table"]),
    ("Are there any people on the beach?", ["people", "beach"]),
    ("How many slices of pizza are on the plate?", ["slice", "pizza", "plate"]),
    ("What color are the woman's shoes?", ["color", "woman", "shoe"]),
    ("Is there a stop sign at the corner?", ["stop", "sign", "corner"]),
    ("What does the sign say?", ["sign"]),
    ("How many windows does the building have?", ["window", "building"]),
    ("Do the shelves hold books?", ["shelf", "book"]),
    ("What does the Nike logo on the shirt look like?", ["nike", "logo", "shirt"]),
    ("Is the traffic light red?", ["traffic", "light"]),
    ("Is it raining?", []),
]


def _scores(pairs):
    tp = fp = fn = 0
    for q, want in pairs:
        got = set(extract_nouns(q, "rules").words)
        tp, fp, fn = tp + len(got & set(want)), fp + len(got - set(want)), fn + len(set(want) - got)
    return tp / (tp + fp), tp / (tp + fn)


def test_reference_set_precision_recall():
    assert len(GOLD) >= 40 and len({q for q, _ in GOLD}) == len(GOLD)
    precision, recall = _scores(GOLD)
    print(f"rule-based nouns on {len(GOLD)} questions: precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.95 and recall >= 0.95
    held_out = _scores(GOLD[-25:])
    assert min(held_out) >= 0.95


@pytest.mark.parametrize("question,nouns", CLEAR)
def test_clear_cases_exact(question, nouns):
    found = extract_nouns(question, "rules")
    assert list(found.words) == nouns and found.extractor == "rules"
    assert question_nouns(question, use_spacy=False) == nouns


def test_no_verbs_adjectives_or_instruction_words():
    """The issue's examples: "parked", "red", "holding" and "question", "word", "phrase" are never nouns."""
    banned = {"parked", "red", "holding", "question", "word", "phrase", "option", "letter", "choice", "answer",
              "image", "picture", "blue", "open", "standing", "wearing"}
    for q, _ in GOLD:
        assert not banned & set(extract_nouns(q, "rules").words), q


@pytest.mark.parametrize(
    "suffix",
    [
        "\nAnswer the question using a single word or phrase.",
        " Answer the question using a single word or phrase.",
        "\nAnswer with the option's letter from the given choices directly.",
        "\nAnswer with the option's letter (A, B, C, D or E) from the given choices directly.",
        " Please answer yes or no.",
        "\nAnswer the question with Yes or No.",
        "\nAnswer the question with a single word.",
        "\nRespond with one word.",
        "\nProvide a short and direct response.",
        "\nYour response must be concise.",
        "\nAnswer with the option letter only.",
        "\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.",
        "\nReference OCR token: Stop, Main, Street\nAnswer the question using a single word or phrase.",
        " Answer:",
        "\nLet's think step by step.",
    ],
)
def test_instruction_suffixes_are_stripped(suffix):
    """LLaVA-1.5 / lmms-eval / MME / POPE / TextVQA / GQA / ScienceQA answer formats leave the question only."""
    q = "Is there a dog next to the fire hydrant?"
    assert strip_instructions(q + suffix) == q
    assert extract_nouns(q + suffix, "rules").words == ("dog", "fire", "hydrant")
    assert extract_nouns(q + suffix, "rules").question == q


def test_multiple_choice_layout_keeps_option_texts_drops_labels():
    """ScienceQA / MMBench layout: labels and markers go, the question and option texts stay."""
    text = ("Hint: The picture shows a kitchen.\nQuestion: Which appliance is used to keep food cold?\n"
            "Options:\nA. oven\nB. refrigerator\nC. toaster\n"
            "Answer with the option's letter from the given choices directly.")
    stripped = strip_instructions(text)
    assert "Answer with" not in stripped and "Options" not in stripped and "Hint:" not in stripped
    assert not re.search(r"(^|\n)[A-C]\. ", stripped)
    assert extract_nouns(text, "rules").words == ("kitchen", "appliance", "food", "oven", "refrigerator", "toaster")


def test_templates_and_system_prompt():
    # Qwen2.5-VL's default system prompt if a template puts it in the span; the header is stripped by the engine
    assert extract_nouns("You are a helpful assistant. What is the cat eating?", "rules").words == ("cat",)
    # the built-in testbed's role words (multi-turn span: "q1 assistant : a1 </s> user : q2")
    assert extract_nouns("what colour is the triangle ? assistant : red user : what number is in the box ?",
                         "rules").words == ("colour", "triangle", "number", "box")


def test_every_pattern_documents_its_source():
    assert len(INSTRUCTION_PATTERNS) >= 15
    for pattern, source in INSTRUCTION_PATTERNS:
        re.compile(pattern)
        assert source.strip()


def _testbed_questions() -> list[tuple[str, list[str]]]:
    """Every v3 question template (testbed/questions_v3.candidates), with its object words as expected nouns."""
    from vtprune.testbed.questions import PLURAL
    from vtprune.testbed.scenes import COLOURS, SHAPES

    names = [(s, [s]) for s in SHAPES] + [(f"{c} object", ["object"]) for c in COLOURS]
    names += [(f"{c} {s}", [s]) for c in COLOURS for s in SHAPES]
    out = [("what number is in the box ?", ["number", "box"])]
    out += [(f"what colour is the {s} ?", ["colour", s]) for s in SHAPES]
    out += [(f"what shape is the {c} object ?", ["shape", "object"]) for c in COLOURS]
    out += [(f"is there a {c} {s} ?", [s]) for c in COLOURS for s in SHAPES]
    out += [(f"how many {c} objects are there ?", ["object"]) for c in COLOURS]
    out += [(f"how many {PLURAL[s]} are there ?", [s]) for s in SHAPES]
    for (a, na), (b, nb) in itertools.product(names, names):
        if a != b:
            for rel in ("left of", "above"):
                out.append((f"is the {a} {rel} the {b} ?", list(dict.fromkeys(na + nb))))
    out += [(f"what colour is the object left of the {a} ?", list(dict.fromkeys(["colour", "object"] + na)))
            for a, na in names]
    return out


def test_testbed_v3_questions_yield_their_object_words():
    """Spec Step A.1 keeps NOUN/PROPN: shape names and "object" / "box" are nouns, colour names modifying them
    are adjectives; every noun is a word of the v3 vocabulary (so its embedding is a real row, not <unk>)."""
    from vtprune.testbed.data_v3 import vocabulary
    from vtprune.testbed.questions_v3 import question_words

    vocab = vocabulary()
    qs = _testbed_questions()
    assert {w for q, _ in qs for w in q.split()} == set(question_words())  # the templates cover the vocabulary
    for q, want in qs:
        got = list(extract_nouns(q, "rules").words)
        assert got == want, q
        assert all(w in vocab for w in got)


@pytest.mark.parametrize(
    "plural,lemma",
    [("dogs", "dog"), ("buses", "bus"), ("boxes", "box"), ("benches", "bench"), ("horses", "horse"),
     ("cherries", "cherry"), ("movies", "movie"), ("knives", "knife"), ("women", "woman"), ("tomatoes", "tomato"),
     ("shoes", "shoe"), ("glasses", "glasses"), ("tennis", "tennis"), ("grass", "grass"), ("skis", "ski"),
     ("crosses", "cross"), ("leaves", "leaf"), ("sizes", "size"), ("houses", "house"), ("bus", "bus")],
)
def test_singular(plural, lemma):
    assert singular(plural) == lemma


def test_extractor_choice_and_errors(monkeypatch):
    with pytest.raises(VtpruneError, match="noun extractor must be one of"):
        extract_nouns("a dog", "nltk")
    monkeypatch.setattr(nouns_module, "_spacy_model", lambda: None)
    extract_nouns.cache_clear()
    try:
        assert not spacy_available()
        assert extract_nouns("Is there a dog?").extractor == "rules"
        with pytest.raises(VtpruneError, match="en_core_web_sm"):
            extract_nouns("Is there a dog?", "spacy")
    finally:
        extract_nouns.cache_clear()


class _Tok:
    def __init__(self, text, pos, lemma):
        self.text, self.pos_, self.lemma_ = text, pos, lemma


def _fake_nlp(text):
    """A stand-in for en_core_web_sm: tags the words of a small table; records what it was given."""
    _fake_nlp.seen.append(text)
    table = {"Question": ("NOUN", "question"), "word": ("NOUN", "word"), "phrase": ("NOUN", "phrase"),
             "dogs": ("NOUN", "dog"), "Nike": ("PROPN", "Nike"), "image": ("NOUN", "image"), "USER": ("PROPN", "USER"),
             "parked": ("VERB", "park"), "red": ("ADJ", "red")}
    return [_Tok(w, *table.get(w, ("X", w.lower()))) for w in re.findall(r"[A-Za-z]+", text)]


def test_spacy_path_sees_the_stripped_question(monkeypatch):
    """With spaCy + en_core_web_sm (stubbed here: not installed on the test machine) the instruction never
    reaches the tagger, NOUN/PROPN lemmas are kept, role and meta nouns dropped, and "spacy" is reported."""
    _fake_nlp.seen = []
    monkeypatch.setattr(nouns_module, "_spacy_model", lambda: _fake_nlp)
    extract_nouns.cache_clear()
    try:
        text = ("How many dogs parked by the red Nike sign in the image USER\n"
                "Answer the question using a single word or phrase.")
        found = extract_nouns(text)
        assert found.extractor == "spacy" and found.words == ("dog", "nike")
        assert _fake_nlp.seen == [found.question] and "phrase" not in found.question
        assert extract_nouns(text, "rules").extractor == "rules"
    finally:
        extract_nouns.cache_clear()


def test_this_machine_has_no_spacy_model_so_auto_is_rules():
    """The default path on a machine without en_core_web_sm is the rule-based tagger (and is reported so)."""
    found = extract_nouns("What is the dog holding?")
    assert found.extractor == ("spacy" if spacy_available() else "rules")
    if not spacy_available():
        assert list(found.words) == rule_nouns("What is the dog holding?") == ["dog"]


def test_meta_nouns_are_dropped():
    assert {"image", "picture", "photo"} <= META_NOUNS
    assert extract_nouns("What is in the picture on the wall of this photo?", "rules").words == ("wall",)


# --------------------------------------------------------------------------------- default vs batched greedy


@pytest.mark.parametrize("n", [576, 2880])
def test_default_path_equals_batched_greedy(n):
    """Both selection paths give identical keep sets on realistic candidate counts and budgets 16..192 (the
    default, `residual_greedy_gram` on CPU, was measured faster: see the resprune module docstring)."""
    g = torch.Generator().manual_seed(n)
    d, r = 192, 96
    V = (torch.randn(n, r, generator=g) * torch.logspace(0, -1.5, r)) @ torch.randn(r, d, generator=g)
    V += 0.05 * torch.randn(n, d, generator=g)
    T = torch.randn(3, d, generator=g)
    w = text_relevance(V, T)
    valid = torch.ones(1, n, dtype=torch.bool)
    for k in (16, 64, 128, 192):
        plan = ResPrune().select(0, _image(V, T), k)
        keep_b, _ = residual_greedy_batched(V[None], w[None], valid, [k])
        assert torch.equal(plan.keep_idx, keep_b[0]), k
        assert torch.equal(plan.keep_idx, residual_greedy_gram(V, w, k)[0])
        assert torch.equal(plan.keep_idx, residual_greedy_blocked(V, w, k)[0])
        if n == 576:
            assert torch.equal(plan.keep_idx, residual_greedy(V, w, k)[0])


def _image(feats, nouns):
    n = feats.shape[0]
    return image_tokens(
        ((n // 24 + 1, 24),), n=n, feats=feats, signals={"noun_embeddings": nouns}, seed=0, question="Is there a dog?"
    )


def test_select_records_extractor_and_nouns():
    V = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    image = _image(V, torch.randn(1, 16))
    image.question = ("What color is the car parked next to the red bus?\n"
                      "Answer the question using a single word or phrase.")
    ResPrune().select(0, image, 10)
    rec = image.memo["record"]
    assert rec["noun_extractor"] == extract_nouns(image.question).extractor
    assert rec["nouns"] == list(extract_nouns(image.question).words)
    assert rec["question"] == "What color is the car parked next to the red bus?"
    image.memo.clear()
    ResPrune(ResPrune.config_class(alpha=0.0)).select(0, image, 10)
    assert image.memo["record"] == {"noun_extractor": None, "nouns": []}
