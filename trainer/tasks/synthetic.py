"""The bundled synthetic search task: facts about fictional entities, findable only by search.

From a seed it invents ``num_entities`` people with made-up names ("Zorvex Quill") and one
value per attribute ("home city" -> "Marlow"). The corpus holds one sentence per fact
("The home city of Zorvex Quill is Marlow."); a question asks one fact ("What is the home
city of Zorvex Quill?"). Values are drawn at random, so a fact cannot be inferred from the
others: the model has to search for it and copy the answer from the observation.

Splits: the (entity, attribute) facts are shuffled; ``heldout_fraction`` of them form the
held-out split, the rest the training split.

Demonstrations (for the supervised warm-up) are successful trajectories of two scripted
demonstrators on training questions. The careful one searches ``"<name> <attribute>"``,
which BM25 ranks first for exactly the right sentence. The sloppy one (a share
``sloppy_demo_fraction`` of the demonstrations) searches only ``"<name>"``, which finds the
entity's shortest fact, right for about one question in ``len(attributes)``; only its lucky,
successful trajectories are kept. A model warmed up on this mixture has learned the format
and a habit that fails on most questions it is applied to; RL has to learn from reward
alone to always name the attribute in the query (and to copy the answer faithfully).
"""

from __future__ import annotations

import random

from dataclasses import replace

from ..tools.text_search import BM25Index
from .base import Example, TaskData

ATTRIBUTES: dict[str, list[str]] = {
    "home city": ["Marlow", "Dunmore", "Kestrel", "Oakhaven", "Brightwater", "Ravenholm",
                  "Silverton", "Ashford", "Thornbury", "Elmstead", "Caldera", "Pinecrest"],
    "profession": ["potter", "baker", "sailor", "glassblower", "cartographer", "beekeeper",
                   "weaver", "locksmith", "astronomer", "falconer", "brewer", "tailor"],
    "pet": ["heron", "ferret", "tortoise", "parrot", "badger", "gecko", "otter", "raven",
            "hamster", "lynx", "newt", "pony"],
    "favorite color": ["crimson", "teal", "amber", "violet", "ochre", "indigo", "scarlet",
                       "olive", "cobalt", "magenta", "ivory", "jade"],
    "instrument": ["lute", "harp", "cello", "flute", "oboe", "banjo", "viola", "drum",
                   "zither", "trumpet", "organ", "fiddle"],
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "tr", "th", "qu", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "x", "l", "m", "s", "th", "ck"]


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def entity_names(n: int, seed: int) -> list[str]:
    """``n`` distinct two-word fictional names, reproducible from ``seed``."""
    rng = random.Random(f"names-{seed}")
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = f"{_word(rng, rng.randint(1, 2))} {_word(rng, rng.randint(1, 2))}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def fact_sentence(attribute: str, name: str, value: str) -> str:
    return f"The {attribute} of {name} is {value}."


def question_text(attribute: str, name: str) -> str:
    return f"What is the {attribute} of {name}?"


def demo_query(attribute: str, name: str) -> str:
    return f"{name} {attribute}"


def _facts(names: list[str], attributes: list[str], rng: random.Random, seed: int,
           tag: str) -> tuple[list[str], list[Example]]:
    docs, examples = [], []
    for e, name in enumerate(names):
        for attribute in attributes:
            value = rng.choice(ATTRIBUTES[attribute])
            docs.append(fact_sentence(attribute, name, value))
            examples.append(Example(
                uid=f"syn-{seed}-{tag}{e}-{attribute.replace(' ', '_')}",
                question=question_text(attribute, name),
                answers=(value,),
                corpus_id=0,
                query=demo_query(attribute, name),
            ))
    return docs, examples


def synthetic_task(num_entities: int = 48, attributes: list[str] | None = None,
                   heldout_fraction: float = 0.25, num_demos: int = 64, seed: int = 0,
                   sloppy_demo_fraction: float = 0.0, num_demo_entities: int = 0) -> TaskData:
    """Build the task (deterministic in its arguments); all questions share corpus 0.

    ``num_demo_entities > 0`` draws the demonstrations from that many extra entities whose
    facts are in the corpus but never asked in training or evaluation (so the warm-up cannot
    memorise answers and has to learn to copy); 0 draws them from the training questions.
    """
    attributes = list(attributes or ATTRIBUTES)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; available: {sorted(ATTRIBUTES)}")
    rng = random.Random(f"facts-{seed}")
    all_names = entity_names(num_entities + num_demo_entities, seed)
    docs, examples = _facts(all_names[:num_entities], attributes, rng, seed, "")
    demo_docs, demo_pool = _facts(all_names[num_entities:], attributes, rng, seed, "demo")
    docs += demo_docs
    rng.shuffle(examples)
    n_heldout = max(1, round(heldout_fraction * len(examples)))
    heldout, train = examples[:n_heldout], examples[n_heldout:]
    # the documents are shuffled too, so a fact's position says nothing about its entity
    rng.shuffle(docs)
    if num_demo_entities:
        rng.shuffle(demo_pool)
    else:
        demo_pool = train
    index = BM25Index(docs) if sloppy_demo_fraction > 0 else None
    demos_rng = random.Random(f"demos-{seed}")
    demos: list[Example] = []
    for ex in demo_pool:
        if len(demos) == num_demos:
            break
        if index is not None and demos_rng.random() < sloppy_demo_fraction:
            name = ex.question.split(" of ", 1)[1].rstrip("?")
            hits = index.search(name, top_k=1)
            attribute = ex.query[len(name) + 1:]
            if hits and docs[hits[0][0]] == fact_sentence(attribute, name, ex.answers[0]):
                demos.append(replace(ex, query=name))  # the sloppy search happened to work
            continue  # a failed sloppy trajectory is not a demonstration
        demos.append(ex)
    return TaskData(train=train, heldout=heldout, demos=demos, corpora={0: docs})
