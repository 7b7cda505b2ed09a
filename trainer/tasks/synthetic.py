"""The bundled synthetic search task: facts about fictional entities, findable only by search.

From a seed it invents ``num_entities`` people with made-up names ("Zorvex Quill") and one
value per attribute ("home city" -> "Marlow"). The corpus holds one sentence per fact
("The home city of Zorvex Quill is Marlow."); a question asks one fact ("What is the home
city of Zorvex Quill?"). Values are drawn at random, so a fact cannot be inferred from the
others: the model has to search for it and copy the answer from the observation.

Splits: the (entity, attribute) facts are shuffled; ``heldout_fraction`` of them form the
held-out split, the rest the training split. Demonstrations are training questions with the
query ``"<name> <attribute>"``, which BM25 ranks first for exactly the right sentence.
"""

from __future__ import annotations

import random

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


def synthetic_task(num_entities: int = 48, attributes: list[str] | None = None,
                   heldout_fraction: float = 0.25, num_demos: int = 64, seed: int = 0) -> TaskData:
    """Build the task (deterministic in its arguments); all questions share corpus 0."""
    attributes = list(attributes or ATTRIBUTES)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; available: {sorted(ATTRIBUTES)}")
    rng = random.Random(f"facts-{seed}")
    names = entity_names(num_entities, seed)
    docs: list[str] = []
    examples: list[Example] = []
    for e, name in enumerate(names):
        for attribute in attributes:
            value = rng.choice(ATTRIBUTES[attribute])
            docs.append(fact_sentence(attribute, name, value))
            examples.append(Example(
                uid=f"syn-{seed}-{e}-{attribute.replace(' ', '_')}",
                question=question_text(attribute, name),
                answers=(value,),
                corpus_id=0,
                query=demo_query(attribute, name),
            ))
    rng.shuffle(examples)
    n_heldout = max(1, round(heldout_fraction * len(examples)))
    heldout, train = examples[:n_heldout], examples[n_heldout:]
    # the documents are shuffled too, so a fact's position says nothing about its entity
    rng.shuffle(docs)
    demos = train[: min(num_demos, len(train))]
    return TaskData(train=train, heldout=heldout, demos=demos, corpora={0: docs})
