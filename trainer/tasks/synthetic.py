"""The bundled synthetic search task: facts about fictional entities, findable only by search.

From a seed it invents ``num_entities`` people with made-up names ("Zorvex Quill"), one
value per attribute ("home city" -> "Marlow") and, when two-hop questions are asked, a
mentor for two thirds of them (the students; the other third are the mentors). The corpus holds one sentence per fact ("The home city of Zorvex
Quill is Marlow.", "The mentor of Zorvex Quill is Amra Tel."). Values are drawn at random,
so a fact cannot be inferred from the others: the model has to search for it and copy the
answer from the observation.

Question kinds (``kinds`` maps a kind to its share of the questions):

* ``single``: "What is the pet of Zorvex Quill?" - one search, ``"Zorvex Quill pet"``;
* ``two_fact``: "What are the profession and the pet of Zorvex Quill?" - two searches, one
  per fact; the answer is "potter and heron" (either order is accepted);
* ``two_hop`` (students only): "What is the home city of the mentor of Zorvex Quill?" - search
  ``"Zorvex Quill mentor"``, read the mentor's name, then search ``"Amra Tel home city"``.

Every question carries its ground truth: per hop, the document that answers it. A call is
*good* when its observation contains one of them. Multi-call questions are where GRPO
misassigns credit: a trajectory with one good and one bad search fails, and its good
search is punished with it.

Splits: entities are shuffled; ``heldout_fraction`` of them are held out, with every
question about them (mentors may be any entity).

Demonstrations (for the supervised warm-up) are successful trajectories of a scripted
demonstrator, either on training questions (``demos_from="train"``) or, as the tiny config
does, each in a small world of its own (``demos_from="worlds"``: a few of the task's
entities with freshly drawn values, in a separate corpus), so the warm-up learns the format
and to copy names and answers but cannot memorise a single answer. Each call of a
demonstration is careful (``"<name> <attribute>"``, which BM25 ranks first for exactly the
right sentence) or, with probability ``sloppy_demo_fraction`` and drawn independently per
call, sloppy (only ``"<name>"``, which finds the entity's shortest fact: the right one for
some attributes, never for others). Only demonstrations whose every call found its fact
are kept, so the warm-up teaches a habit that looks right in the demonstrations and fails
on most questions it is applied to; RL has to learn from the reward alone to always name
the attribute, call by call.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..tools.text_search import BM25Index
from .base import Example, TaskData

ATTRIBUTES: dict[str, list[str]] = {
    "home city": [
        "Marlow",
        "Dunmore",
        "Kestrel",
        "Oakhaven",
        "Brightwater",
        "Ravenholm",
        "Silverton",
        "Ashford",
        "Thornbury",
        "Elmstead",
        "Caldera",
        "Pinecrest",
    ],
    "profession": [
        "potter",
        "baker",
        "sailor",
        "glassblower",
        "cartographer",
        "beekeeper",
        "weaver",
        "locksmith",
        "astronomer",
        "falconer",
        "brewer",
        "tailor",
    ],
    "pet": [
        "heron",
        "ferret",
        "tortoise",
        "parrot",
        "badger",
        "gecko",
        "otter",
        "raven",
        "hamster",
        "lynx",
        "newt",
        "pony",
    ],
    "favorite color": [
        "crimson",
        "teal",
        "amber",
        "violet",
        "ochre",
        "indigo",
        "scarlet",
        "olive",
        "cobalt",
        "magenta",
        "ivory",
        "jade",
    ],
    "instrument": [
        "lute",
        "harp",
        "cello",
        "flute",
        "oboe",
        "banjo",
        "viola",
        "drum",
        "zither",
        "trumpet",
        "organ",
        "fiddle",
    ],
}
RELATION = "mentor"  # entity-valued attribute that links two-hop questions
KINDS = ("single", "two_fact", "two_hop")

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "th",
    "qu",
    "st",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "x", "l", "m", "s", "th", "ck"]


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def entity_names(n: int, seed: int) -> list[str]:
    """``n`` two-word fictional names with distinct word sets, reproducible from ``seed``
    (so that a bag-of-words search for a name finds only that entity's facts)."""
    rng = random.Random(f"names-{seed}")
    names: list[str] = []
    seen: set[frozenset[str]] = set()
    while len(names) < n:
        first, last = _word(rng, rng.randint(1, 2)), _word(rng, rng.randint(1, 2))
        words = frozenset((first.lower(), last.lower()))
        if len(words) == 2 and words not in seen:
            seen.add(words)
            names.append(f"{first} {last}")
    return names


def fact_sentence(attribute: str, name: str, value: str) -> str:
    return f"The {attribute} of {name} is {value}."


def question_text(attribute: str, name: str) -> str:
    return f"What is the {attribute} of {name}?"


def two_fact_text(first: str, second: str, name: str) -> str:
    return f"What are the {first} and the {second} of {name}?"


def two_hop_text(attribute: str, name: str) -> str:
    return f"What is the {attribute} of the {RELATION} of {name}?"


def demo_query(attribute: str, name: str) -> str:
    return f"{name} {attribute}"


def two_fact_answers(first: str, second: str) -> tuple[str, str]:
    """Accepted answers of a two-fact question: both values, in either order."""
    return f"{first} and {second}", f"{second} and {first}"


@dataclass
class World:
    """Entities with their facts and the corpus (shuffled fact sentences) that states them."""

    names: list[str]
    attributes: list[str]
    corpus_id: int
    values: dict[tuple[str, str], str] = field(default_factory=dict)  # (name, attribute) -> value
    docs: list[str] = field(default_factory=list)

    def doc(self, name: str, attribute: str) -> str:
        return fact_sentence(attribute, name, self.values[name, attribute])


def make_world(
    names: list[str],
    attributes: list[str],
    rng: random.Random,
    corpus_id: int = 0,
    relation: bool = False,
) -> World:
    """Draw a value per (entity, attribute) and, with ``relation``, a mentor for each
    *student*: the last third of ``names`` (at least one) are mentors, the others students.
    A mentor has no mentor, so the only document that holds both a student's name and the
    word "mentor" is the student's own mentor fact: ``"<student> mentor"`` finds it."""
    world = World(list(names), list(attributes), corpus_id)
    for name in names:
        for attribute in attributes:
            world.values[name, attribute] = rng.choice(ATTRIBUTES[attribute])
    if relation and len(names) > 1:
        mentors = names[len(names) - max(1, len(names) // 3) :]
        students = names[: len(names) - len(mentors)]
        for name in students:
            world.values[name, RELATION] = rng.choice(mentors)
    world.docs = [fact_sentence(a, n, v) for (n, a), v in world.values.items()]
    rng.shuffle(world.docs)  # a fact's position says nothing about its entity
    return world


def _example(
    world: World,
    kind: str,
    uid: str,
    text: str,
    answers: tuple[str, ...],
    calls: list[tuple[str, str]],
) -> Example:
    """An example whose call ``i`` searches ``calls[i] = (entity, attribute)``."""
    queries = tuple(demo_query(attribute, name) for name, attribute in calls)
    evidence = tuple((world.doc(name, attribute),) for name, attribute in calls)
    return Example(
        uid=uid,
        question=text,
        answers=answers,
        corpus_id=world.corpus_id,
        query=queries[0],
        queries=queries,
        evidence=evidence,
        kind=kind,
    )


def questions_about(world: World, name: str, kind: str, uid: str) -> list[Example]:
    """Every question of one kind about entity ``name`` of the world."""
    out = []
    attrs = world.attributes
    if kind == "single":
        for a in attrs:
            out.append(
                _example(
                    world,
                    kind,
                    f"{uid}-{a}",
                    question_text(a, name),
                    (world.values[name, a],),
                    [(name, a)],
                )
            )
    elif kind == "two_fact":
        for i, a in enumerate(attrs):
            for b in attrs[i + 1 :]:
                answers = two_fact_answers(world.values[name, a], world.values[name, b])
                out.append(
                    _example(
                        world,
                        kind,
                        f"{uid}-{a}+{b}",
                        two_fact_text(a, b, name),
                        answers,
                        [(name, a), (name, b)],
                    )
                )
    elif kind == "two_hop":
        mentor = world.values.get((name, RELATION))
        if mentor is None:  # mentors have no mentor
            return []
        for a in attrs:
            out.append(
                _example(
                    world,
                    kind,
                    f"{uid}-{RELATION}-{a}",
                    two_hop_text(a, name),
                    (world.values[mentor, a],),
                    [(name, RELATION), (mentor, a)],
                )
            )
    else:
        raise ValueError(f"unknown question kind {kind!r}; available: {list(KINDS)}")
    return out


def _mix(
    by_kind: Mapping[str, list[Example]], weights: Mapping[str, float], rng: random.Random
) -> list[Example]:
    """The largest shuffled selection whose kinds follow ``weights``."""
    active = {k: w for k, w in weights.items() if w > 0 and by_kind.get(k)}
    if not active:
        return []
    total = sum(active.values())
    scale = min(len(by_kind[k]) / (w / total) for k, w in active.items())
    out: list[Example] = []
    for k, w in active.items():
        pool = list(by_kind[k])
        rng.shuffle(pool)
        out.extend(pool[: max(1, int(scale * w / total))])
    rng.shuffle(out)
    return out


def sloppy_variant(
    ex: Example, world: World, index: BM25Index, rng: random.Random, fraction: float
) -> Example | None:
    """The example with each query made sloppy (the bare entity name) with probability
    ``fraction``, independently per call; ``None`` if a sloppy query misses its fact."""
    if fraction <= 0:
        return ex
    queries = list(ex.queries)
    for i, (query, hop) in enumerate(zip(ex.queries, ex.evidence, strict=True)):
        if rng.random() >= fraction:
            continue
        name = " ".join(query.split(" ")[:2])  # entity names are two words
        hits = index.search(name, top_k=1)
        if not hits or index.documents[hits[0][0]] not in hop:
            return None  # a failed sloppy trajectory is not a demonstration
        queries[i] = name
    return Example(
        ex.uid,
        ex.question,
        ex.answers,
        ex.corpus_id,
        queries[0],
        tuple(queries),
        ex.evidence,
        ex.kind,
    )


def normalise_kinds(kinds: Mapping[str, float] | None) -> dict[str, float]:
    """Validated kind weights (default: single questions only)."""
    kinds = dict(kinds) if kinds else {"single": 1.0}
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; available: {list(KINDS)}")
    if (
        any(not isinstance(w, (int, float)) or not w >= 0 for w in kinds.values())
        or not sum(kinds.values()) > 0
    ):
        raise ValueError(f"question kind weights must be >= 0 with a positive sum, got {kinds}")
    return {k: float(w) for k, w in kinds.items()}


def synthetic_task(
    num_entities: int = 48,
    attributes: list[str] | None = None,
    heldout_fraction: float = 0.25,
    num_demos: int = 64,
    seed: int = 0,
    sloppy_demo_fraction: float = 0.0,
    demos_from: str = "train",
    world_size: int = 3,
    kinds: Mapping[str, float] | None = None,
) -> TaskData:
    """Build the task (deterministic in its arguments); questions search corpus 0.

    ``kinds`` maps question kinds to their shares (default: ``single`` only).
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
    kinds = normalise_kinds(kinds)
    if kinds.get("two_fact", 0) > 0 and len(attributes) < 2:
        raise ValueError("two_fact questions need at least two attributes")
    relation = kinds.get("two_hop", 0) > 0
    rng = random.Random(f"facts-{seed}")
    names = entity_names(num_entities, seed)
    world = make_world(names, attributes, rng, 0, relation)
    order = list(names)
    rng.shuffle(order)
    n_heldout = max(1, round(heldout_fraction * len(order)))
    splits = []
    for members in (order[n_heldout:], order[:n_heldout]):
        by_kind = {
            k: [
                ex
                for name in members
                for ex in questions_about(world, name, k, f"syn-{seed}-{names.index(name)}")
            ]
            for k in kinds
        }
        splits.append(_mix(by_kind, kinds, rng))
    train, heldout = splits
    corpora = {0: world.docs}

    demos_rng = random.Random(f"demos-{seed}")
    kind_names, kind_weights = list(kinds), list(kinds.values())
    main_index = (
        BM25Index(world.docs) if demos_from == "train" and sloppy_demo_fraction > 0 else None
    )
    demos: list[Example] = []
    attempts = 0
    while len(demos) < num_demos and attempts < 20 * max(num_demos, 1):
        attempts += 1
        if demos_from == "train":
            if attempts > len(train):
                break
            ex, ex_world, index = train[attempts - 1], world, main_index
        else:
            members = demos_rng.sample(names, min(world_size, len(names)))
            ex_world = make_world(members, attributes, demos_rng, len(corpora), relation)
            kind = demos_rng.choices(kind_names, kind_weights)[0]
            options = questions_about(ex_world, members[0], kind, f"syn-{seed}-w{len(corpora)}")
            ex = demos_rng.choice(options)
            index = BM25Index(ex_world.docs) if sloppy_demo_fraction > 0 else None
        if index is not None:
            sloppy = sloppy_variant(ex, ex_world, index, demos_rng, sloppy_demo_fraction)
            if sloppy is None:
                continue
            ex = sloppy
        if demos_from == "worlds":
            corpora[ex.corpus_id] = ex_world.docs
        demos.append(ex)
    return TaskData(train=train, heldout=heldout, demos=demos, corpora=corpora)
