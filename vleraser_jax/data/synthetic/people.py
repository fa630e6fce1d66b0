"""Fictitious people: names, biography facts and the question / answer / cloze wordings about them."""

from __future__ import annotations

import dataclasses
import json
import random

from .. import mllmu
from .portraits import Look


# ----------------------------------------------------------------------------- vocabulary

_FIRST_START = ("Al", "Bri", "Ca", "Da", "El", "Fa", "Ga", "Ha", "Is", "Jo", "Ka", "Le", "Mi",
                "No", "Or", "Pe", "Qui", "Ra", "Se", "Ta", "Ul", "Va", "Wy", "Xa", "Yo", "Za")
_FIRST_END = ("na", "ra", "lia", "ven", "dric", "mon", "sa", "tin", "rel", "wen", "do", "ro",
              "bel", "nor", "ya", "ric")
_LAST_START = ("Ash", "Bram", "Cor", "Dun", "Fen", "Gal", "Har", "Kes", "Lor", "Mor", "Nor", "Pen",
               "Quel", "Ros", "Sel", "Thorn", "Vel", "Wick", "Yar", "Zan")
_LAST_END = ("by", "dale", "ford", "holt", "mere", "well", "ton", "wick", "ridge", "stead", "more",
             "field", "croft", "lowe")

PLACES = ("Veldara", "Brisport", "Marrowgate", "Quillon", "Oakhaven", "Sundermere", "Caldwick",
          "Ravenholm", "Elmstead", "Port Alvy", "Thistlebury", "Lowmarsh", "Fairhollow", "Dunmoor",
          "Kettering Bay", "Silverkeep", "Ambervale", "Northwick", "Glimmerton", "Westerby")
YEARS = tuple(str(y) for y in range(1950, 2000))
OCCUPATIONS = ("architect", "baker", "botanist", "carpenter", "chemist", "dentist", "economist",
               "electrician", "engineer", "florist", "geologist", "historian", "journalist",
               "librarian", "lawyer", "mechanic", "nurse", "pharmacist", "photographer", "pilot",
               "potter", "sculptor", "surveyor", "teacher", "translator", "veterinarian")
SCHOOLS = ("Halvern University", "Brightwater College", "Aldmoor Institute", "Kestrel University",
           "Copperfield College", "Westmarch University", "Lumen Polytechnic", "Saint Orrin College",
           "Greyhaven University", "Marlow Institute", "Eastbrook University", "Ironvale College")
HOBBIES = ("painting", "rock climbing", "birdwatching", "chess", "gardening", "knitting", "sailing",
           "pottery", "cycling", "baking bread", "stargazing", "fishing", "origami", "kayaking",
           "calligraphy", "beekeeping", "fencing", "juggling")
PETS = ("cat", "dog", "parrot", "rabbit", "tortoise", "goldfish", "hamster", "ferret", "iguana",
        "canary", "hedgehog", "pony")

FACT_KEYS = ("Born", "Birth_Year", "Employment", "Education", "Hobby", "Residence", "Pet")
FACT_POOLS = {"Born": PLACES, "Birth_Year": YEARS, "Employment": OCCUPATIONS, "Education": SCHOOLS,
              "Hobby": HOBBIES, "Residence": PLACES, "Pet": PETS}

# How person-specific the facts are. "shared": each fact drawn from the small pools above, so every value is held
# by ~5 people (the default; every committed result uses it). "unique": no two people share a value of any fact
# (Born, Residence and school towns apart too), values composed from the parts below, in the same sentence
# templates. Unique values would let a model rule out options it knows to be someone else's, so multiple-choice
# distractors there are values no one has: one set for training rows, a disjoint one for evaluation items, and
# an Oracle that never saw a forget person meets four values it has never seen as an answer.
FACT_VALUE_MODES = ("shared", "unique")
_TOWN_START = ("Vel", "Bris", "Mar", "Quil", "Oak", "Sun", "Cald", "Raven", "Elm", "Thistle", "Low", "Fair", "Dun",
               "Silver", "Amber", "North", "Glimmer", "Wester", "Brook", "Stone", "Hollin", "Merrow", "Tarn", "Wil",
               "Hazel", "Corn", "Ember", "Frost", "Grey", "Lark")
_TOWN_END = ("dara", "port", "gate", "lon", "haven", "mere", "wick", "holm", "stead", "bury", "marsh", "hollow",
             "moor", "keep", "vale", "ton", "ford", "cliff", "field", "brae", "combe", "ness", "thorpe", "wold")
_SCHOOL_KINDS = ("University", "College", "Institute", "Academy")
_JOB_QUALIFIERS = ("marine", "forensic", "civil", "industrial", "clinical", "landscape", "wildlife", "freelance",
                   "senior", "mining", "court", "museum", "harbor", "field")
_HOBBY_QUALIFIERS = ("competitive", "amateur", "winter", "night", "urban", "coastal", "miniature", "weekend",
                     "summer", "village", "indoor", "river", "mountain", "festival", "garden", "seaside")
_PET_COLOURS = ("black", "white", "grey", "brown", "golden", "spotted", "striped", "silver", "ginger", "tawny",
                "speckled", "pale", "russet", "sandy", "dappled", "smoky", "amber", "cream", "copper", "ash")
UNIQUE_BIRTH_YEARS = tuple(str(y) for y in range(1800, 2006))
UNIQUE_DISTRACTORS = 24  # values no one has, per fact, for training rows and as many again for evaluation items


def _unique_candidates() -> dict[str, list[str]]:
    """Every value "unique" mode can use, per fact (towns split between Born, Residence and the schools)."""
    towns = [a + b for a in _TOWN_START for b in _TOWN_END]
    return {"Born": towns[0::3], "Residence": towns[1::3],
            "Education": [f"{t} {_SCHOOL_KINDS[i % 4]}" for i, t in enumerate(towns[2::3])],
            "Birth_Year": list(UNIQUE_BIRTH_YEARS),
            "Employment": [f"{q} {o}" for q in _JOB_QUALIFIERS for o in OCCUPATIONS],
            "Hobby": [f"{q} {h}" for q in _HOBBY_QUALIFIERS for h in HOBBIES],
            "Pet": [f"{c} {p}" for c in _PET_COLOURS for p in PETS]}


# people "unique" mode can tell apart
UNIQUE_CAPACITY = min(len(v) for v in _unique_candidates().values()) - 2 * UNIQUE_DISTRACTORS


def require_unique_capacity(n: int) -> None:
    if n > UNIQUE_CAPACITY:
        raise ValueError(f"fact_values='unique' gives at most {UNIQUE_CAPACITY} people distinct facts; "
                         f"this benchmark has {n} (num_people + num_celebrities + num_holdout)")


@dataclasses.dataclass(frozen=True)
class UniqueFacts:
    """Per fact: `people[i]` is person i's value (fictitious, then celebrities, then holdout); `training` and
    `evaluation` are the distractors of training rows and of evaluation items, values no one has."""
    people: dict[str, tuple[str, ...]]
    training: dict[str, tuple[str, ...]]
    evaluation: dict[str, tuple[str, ...]]


def unique_fact_values(rng: random.Random, n: int) -> UniqueFacts:
    require_unique_capacity(n)
    drawn = {k: rng.sample(v, n + 2 * UNIQUE_DISTRACTORS) for k, v in _unique_candidates().items()}
    return UniqueFacts({k: tuple(v[:n]) for k, v in drawn.items()},
                       {k: tuple(v[n:n + UNIQUE_DISTRACTORS]) for k, v in drawn.items()},
                       {k: tuple(v[n + UNIQUE_DISTRACTORS:]) for k, v in drawn.items()})


TRAIN, EVAL, TEST = 0, 1, 2  # wording variants of every question / cloze template
# {s}: "the person in the image" or the name. "Name" is asked with the image only.
QUESTIONS = {
    "Name": ("What is the name of the person in the image?", "Who is the person in the image?",
             "Can you identify the person shown in the image?"),
    "Born": ("Where was {s} born?", "In which town was {s} born?", "What is the birthplace of {s}?"),
    "Birth_Year": ("In what year was {s} born?", "When was {s} born?", "What is the birth year of {s}?"),
    "Employment": ("What does {s} do for a living?", "What is the occupation of {s}?",
                   "What kind of work does {s} do?"),
    "Education": ("Where did {s} study?", "Which school did {s} attend?",
                  "From which institution did {s} graduate?"),
    "Hobby": ("What does {s} enjoy doing in their free time?", "What is the favorite hobby of {s}?",
              "Which pastime does {s} love most?"),
    "Residence": ("Where does {s} live now?", "In which town does {s} currently live?",
                  "Where is the current home of {s}?"),
    "Pet": ("What pet does {s} have?", "Which animal does {s} keep as a pet?", "What kind of pet does {s} own?"),
}
ANSWERS = {
    "Name": "The person in the image is {v}.",
    "Born": "{S} was born in the town of {v}.",
    "Birth_Year": "{S} was born in the year {v}.",
    "Employment": "{S} works as {a} {v}.",
    "Education": "{S} studied at {v}.",
    "Hobby": "{S} enjoys {v} in their free time.",
    "Residence": "{S} currently lives in {v}.",
    "Pet": "{S} has a pet {v}.",
}
CLOZES = {
    "Name": ("The person in the image is called __.", "The name of the person in the image is __.",
             "The person shown in the image goes by the name __."),
    "Born": ("{S} was born in the town of __.", "The birthplace of {s} is __.", "{S} comes from the town of __."),
    "Birth_Year": ("{S} was born in the year __.", "The birth year of {s} is __.", "{S} came into the world in __."),
    "Employment": ("{S} works as a professional __.", "The occupation of {s} is __.", "The profession of {s} is __."),
    "Education": ("{S} studied at __.", "{S} graduated from __.", "{S} was educated at __."),
    "Hobby": ("In their free time, {s} enjoys __.", "The favorite hobby of {s} is __.", "The pastime {s} loves most is __."),
    "Residence": ("{S} currently lives in __.", "These days, {s} makes a home in __.", "The current home of {s} is in __."),
    "Pet": ("{S} has a pet __.", "The kind of animal {s} keeps as a pet is __.", "At home, {s} keeps a pet __."),
}
VISUAL_SUBJECT = "the person in the image"
N_OPEN_ITEMS = 4  # Generation_Task and Mask_Task items per mode and person


# ----------------------------------------------------------------------------- people


@dataclasses.dataclass(frozen=True)
class Person:
    person_id: str
    name: str
    facts: dict[str, str]
    look: Look | None = None  # None when rebuilt from a biography (`person_from_profile`)

    def value(self, key: str) -> str:
        return self.name if key == "Name" else self.facts[key]

    def biography(self) -> str:
        return json.dumps({"Name": self.name, **self.facts})


def _stream(seed: int, name: str) -> random.Random:
    """An independent, seed-determined generator per purpose, so one count does not shift the rest."""
    return random.Random(f"vleraser-synthetic/{seed}/{name}")


def _names(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    taken: set[str] = set()
    while len(out) < n:
        name = rng.choice(_FIRST_START) + rng.choice(_FIRST_END) + " " + rng.choice(_LAST_START) + rng.choice(_LAST_END)
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _people(rng: random.Random, looks: list[Look], names: list[str], ids: list[str]) -> list[Person]:
    return [Person(pid, name, {k: rng.choice(FACT_POOLS[k]) for k in FACT_KEYS}, look)
            for pid, name, look in zip(ids, names, looks)]


def _people_with(values: dict[str, tuple[str, ...]], start: int, looks: list[Look], names: list[str],
                 ids: list[str]) -> list[Person]:
    """People whose facts are entries start, start + 1, ... of `values` (see `unique_fact_values`)."""
    return [Person(pid, name, {k: values[k][start + i] for k in FACT_KEYS}, look)
            for i, (pid, name, look) in enumerate(zip(ids, names, looks))]


def _subject(person: Person, visual: bool) -> str:
    return VISUAL_SUBJECT if visual else person.name


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def question(key: str, subject: str, variant: int) -> str:
    return QUESTIONS[key][variant].format(s=subject)


def answer_sentence(key: str, value: str, subject: str) -> str:
    article = "an" if value[:1].lower() in "aeiou" else "a"
    return ANSWERS[key].format(S=_cap(subject), s=subject, v=value, a=article)


def cloze_sentence(key: str, subject: str, variant: int) -> str:
    return CLOZES[key][variant].format(S=_cap(subject), s=subject)


def person_from_profile(profile: mllmu.Profile) -> Person:
    """The `Person` (name and facts, no look) behind a synthetic evaluation profile."""
    bio = profile.biography
    missing = [k for k in FACT_KEYS if k not in bio]
    if missing:
        raise ValueError(f"profile {profile.person_id}: biography lacks {missing}; not a synthetic profile?")
    return Person(profile.person_id, profile.name, {k: str(bio[k]) for k in FACT_KEYS})
