"""The bundled synthetic search task: facts about fictional entities, findable only by search.

From a seed it invents ``num_entities`` people with made-up names ("Zorvex Quill") and one
value per attribute ("home city" -> "Marlow"). The corpus holds one sentence per fact
("The home city of Zorvex Quill is Marlow."); a question asks one fact ("What is the home
city of Zorvex Quill?"). Values are drawn at random, so a fact cannot be inferred from the
others: the model has to search for it and copy the answer from the observation.

Splits: the (entity, attribute) facts are shuffled; ``heldout_fraction`` of them form the
held-out split, the rest the training split.

Demonstrations (for the supervised warm-up) are successful trajectories of two scripted
demonstrators, either on training questions (``demos_from="train"``) or, as the tiny config
does, each in a small world of its own (``demos_from="worlds"``: a few of the task's
entities with freshly drawn values, in a separate corpus), so the warm-up learns the format
and to copy names and answers but cannot memorise a single answer. The careful
demonstrator searches ``"<name> <attribute>"``, which BM25 ranks first for exactly the right
sentence. The sloppy one (a share ``sloppy_demo_fraction`` of the attempts) searches only
``"<name>"``, which finds the entity's shortest fact, the right one for about one question
in three; only its lucky, successful trajectories are kept. A model warmed up on this
mixture has a habit that fails on most questions it is applied to; RL has to learn from
the reward alone to always name the attribute in the query.
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
           tag: str, corpus_id: int = 0) -> tuple[list[str], list[Example]]:
    docs, examples = [], []
    for e, name in enumerate(names):
        for attribute in attributes:
            value = rng.choice(ATTRIBUTES[attribute])
            docs.append(fact_sentence(attribute, name, value))
            examples.append(Example(
                uid=f"syn-{seed}-{tag}{e}-{attribute.replace(' ', '_')}",
                question=question_text(attribute, name),
                answers=(value,),
                corpus_id=corpus_id,
                query=demo_query(attribute, name),
            ))
    return docs, examples


def _sloppy(ex: Example, docs: list[str]) -> Example | None:
    """The demonstration of the name-only search, if its top hit is the asked fact."""
    name = ex.question.split(" of ", 1)[1].rstrip("?")
    attribute = ex.query[len(name) + 1:]
    hits = BM25Index(docs).search(name, top_k=1)
    if hits and docs[hits[0][0]] == fact_sentence(attribute, name, ex.answers[0]):
        return replace(ex, query=name)
    return None


def synthetic_task(num_entities: int = 48, attributes: list[str] | None = None,
                   heldout_fraction: float = 0.25, num_demos: int = 64, seed: int = 0,
                   sloppy_demo_fraction: float = 0.0, demos_from: str = "train",
                   world_size: int = 3) -> TaskData:
    """Build the task (deterministic in its arguments); questions search corpus 0.

    ``demos_from="train"`` demonstrates training questions. ``demos_from="worlds"`` builds
    each demonstration in its own small world: ``world_size`` of the task's entities with
    freshly drawn values, in a corpus of their own (ids 1, 2, ...). The warm-up then sees the
    entities' names but cannot memorise any answer (each world contradicts the others), so
    it has to learn to copy from the observation, and no held-out answer leaks into it.
    """
    attributes = list(attributes or ATTRIBUTES)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; available: {sorted(ATTRIBUTES)}")
    if demos_from not in ("train", "worlds"):
        raise ValueError(f"demos_from must be 'train' or 'worlds', got {demos_from!r}")
    rng = random.Random(f"facts-{seed}")
    names = entity_names(num_entities, seed)
    docs, examples = _facts(names, attributes, rng, seed, "")
    rng.shuffle(examples)
    n_heldout = max(1, round(heldout_fraction * len(examples)))
    heldout, train = examples[:n_heldout], examples[n_heldout:]
    # the documents are shuffled too, so a fact's position says nothing about its entity
    rng.shuffle(docs)
    corpora = {0: docs}
    demos_rng = random.Random(f"demos-{seed}")
    demos: list[Example] = []
    attempts = 0
    while len(demos) < num_demos and attempts < 20 * max(num_demos, 1):
        attempts += 1
        if demos_from == "train":
            if attempts > len(train):
                break
            ex, ex_docs = train[attempts - 1], docs
        else:
            world_id = len(corpora)
            members = demos_rng.sample(names, min(world_size, len(names)))
            ex_docs, world = _facts(members, attributes, demos_rng, seed, f"w{world_id}-",
                                    corpus_id=world_id)
            demos_rng.shuffle(ex_docs)
            ex = demos_rng.choice(world[: len(attributes)])  # a fact of the first member
        if sloppy_demo_fraction > 0 and demos_rng.random() < sloppy_demo_fraction:
            sloppy = _sloppy(ex, ex_docs)
            if sloppy is None:
                continue  # a failed sloppy trajectory is not a demonstration
            ex = sloppy
        if demos_from == "worlds":
            corpora[ex.corpus_id] = ex_docs
        demos.append(ex)
    return TaskData(train=train, heldout=heldout, demos=demos, corpora=corpora)
