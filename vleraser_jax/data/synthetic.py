"""Synthetic MLLMU-Bench: fictitious people with procedurally drawn portraits, written in the real schema.

`synthesize(out_dir)` writes the MLLMU-Bench layout (`<config>/train-00000-of-00001.parquet`, the
columns and nested types of `mllmu.config_features`), so `mllmu.load_benchmark` reads it like the
real benchmark. Everything is drawn from `seed` through named `random.Random` streams, and PNG and
parquet encoding are deterministic, so two runs with the same arguments give byte-identical files.

People. Each fictitious person has a unique made-up name, seven biography facts (Born, Birth_Year,
Employment, Education, Hobby, Residence, Pet) and a portrait whose visible features identify them:
face shape, skin, hair colour and style, eye colour, accessory and shirt (any two people differ in at
least three visible features), drawn in front of their own background colour and pattern. Test_Set
shows the same people in `num_test_images` new images: shifted, scaled, rotated, relit, on another
background. The celebrities of Retain_Set are a disjoint group built the same way.

Task items per person (as MLLMU-Bench asks them):
- `metadata` (ft_Data): the name question with the image, and one question per fact both about "the
  person in the image" and naming the person (15 pairs).
- Classification_Task: 8 Image_Textual (name + facts) and 7 Pure_Text multiple-choice questions;
  distractors are other values of the same attribute (other names for the name question) and the
  correct letter is dealt from shuffled decks of A-D, so letters are balanced.
- Generation_Task: 4 Image_Textual + 4 Pure_Text questions with one-sentence ground truths.
- Mask_Task: 4 + 4 cloze sentences with `__` and the bare fact as ground truth.
Questions come in three wordings: training (`metadata`), evaluation (Full_Set, forget/retain,
Retain_Set) and a paraphrase for Test_Set, whose distractors and letters are drawn afresh. IDs:
people "001", ..., celebrities "C001", ..., Base_Set's random portraits "P0001", ....

Splits follow the reference `data_split.py`: one ID list is shuffled again for each ratio (5, 10,
15), forget_N takes the first int(N/100 * people) and retain_(100-N) the rest; the forget sets are
therefore not nested (the published forget_5 / forget_10 ID lists are not either).

Text-only training rows: `metadata` entries carry our extra key `"Type"` ("Image_Textual" /
"Pure_Text"); the loader gives Pure_Text entries `image=None`. Real MLLMU-Bench entries have no Type
and keep the image, as its finetune.py does.

Base_Set (ours, not MLLMU-Bench's): what the base model learns before the fictitious fine-tune.
Columns `image` (Image, null for text-only rows), `ID`, `kind`, `question`, `answer`; a row trains
`question -> answer`, with the image when there is one, `question` already holding eval.py's
options and instruction lines. Kinds: "qa" (celebrity facts in all three wordings, like a pretrained
model knows paraphrases, with the image in several poses or with the name), "classification"
(celebrity facts as multiple choice, training wording, fresh distractors), "generation" / "cloze"
(celebrity facts in those eval task formats, all three wordings: the celebrities stand for world
knowledge the base model has in every phrasing, so the Retain_Set scores measure retention), "caption"
and "attribute" (descriptions of, and questions about, the drawn features of
random portraits that are none of the people). `load_base_set` reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import mllmu
from .mllmu import (
    CLOZE_INSTRUCTION,
    FT_DATA,
    FULL_SET,
    GEN_INSTRUCTION_TEXTUAL,
    GEN_INSTRUCTION_VISUAL,
    MC_INSTRUCTION,
    OPTION_LETTERS,
    RETAIN_SET,
    TEST_SET,
    TrainingRow,
    forget_config,
    retain_config,
)

BASE_SET = "Base_Set"
INFO_FILE = "synthetic_info.json"
BASE_KINDS = ("qa", "classification", "generation", "cloze", "caption", "attribute")
SPLIT_RATIOS = (5, 10, 15)  # in the order data_split.py draws them
GENERATOR_VERSION = 3

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

# ----------------------------------------------------------------------------- looks

SKINS = {"pale": (250, 224, 200), "fair": (238, 196, 160), "tan": (214, 160, 110), "olive": (184, 132, 84),
         "brown": (138, 90, 52), "dark": (88, 58, 38)}
HAIR_COLOURS = {"black": (25, 25, 28), "brown": (105, 66, 34), "blond": (232, 200, 105), "red": (178, 58, 30),
                "grey": (150, 150, 155), "white": (242, 242, 242), "blue": (50, 90, 210)}
HAIRSTYLES = ("short", "long", "bun", "spiky", "curly", "bald")
EYE_COLOURS = {"brown": (110, 62, 24), "blue": (40, 110, 230), "green": (40, 170, 70), "grey": (125, 130, 140),
               "violet": (150, 60, 200)}
FACES = ("round", "oval", "square", "long")
ACCESSORIES = ("none", "glasses", "hat", "earrings", "mustache", "scarf")
SHIRTS = {"red": (200, 40, 40), "blue": (40, 70, 190), "green": (40, 140, 60), "black": (30, 30, 30),
          "white": (235, 235, 235), "purple": (120, 50, 160), "orange": (235, 130, 30), "yellow": (235, 210, 50)}
BACKGROUNDS = {"yellow": (250, 235, 150), "pink": (245, 190, 210), "teal": (90, 180, 180),
               "lavender": (200, 185, 235), "peach": (250, 200, 160), "mint": (180, 235, 200),
               "sky blue": (160, 205, 245), "beige": (225, 210, 180)}
PATTERNS = ("plain", "striped", "dotted", "checked")
# Design coordinates on a 64-unit canvas: x0, y0, x1, y1 of the head.
_FACE_BOX = {"round": (18, 12, 46, 42), "oval": (20, 10, 44, 44), "square": (19, 12, 45, 42), "long": (22, 8, 42, 46)}
_HAT = (40, 40, 110)
_SCARF = (200, 30, 90)
_GOLD = (240, 200, 40)


@dataclasses.dataclass(frozen=True)
class Look:
    """What a portrait shows; every field is drawn and named in captions."""

    face: str
    skin: str
    hair_colour: str
    hairstyle: str
    eyes: str
    accessory: str
    shirt: str
    background: str
    pattern: str

    def visible(self) -> tuple[str, ...]:
        """The identity features one can actually see (a bald head has no hair colour; a hat hides short styles)."""
        style = self.hairstyle
        if self.accessory == "hat" and style in ("short", "bun", "spiky", "curly"):
            style = "covered"
        colour = "-" if style == "bald" else self.hair_colour
        return (self.face, self.skin, colour, style, self.eyes, self.accessory, self.shirt)


@dataclasses.dataclass(frozen=True)
class Pose:
    """Where and how the person appears: offsets are fractions of the side, angle in degrees."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0
    light: float = 1.0  # overall brightness factor
    gradient: float = 0.0  # brightness slope from left (-) to right (+)


def _draw_person(look: Look, side: int) -> Any:
    """The person alone on a transparent `side`² RGBA canvas, in the canonical pose."""
    from PIL import Image, ImageDraw

    k = side / 64
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * k, y0 * k, x1 * k, y1 * k]

    def width(w: float) -> int:
        return max(1, round(w * k))

    skin, hair = SKINS[look.skin], HAIR_COLOURS[look.hair_colour]
    fx0, fy0, fx1, fy1 = _FACE_BOX[look.face]
    cx, h = (fx0 + fx1) / 2, fy1 - fy0
    style = look.hairstyle

    d.ellipse(box(8, 50, 56, 86), fill=SHIRTS[look.shirt])
    d.rectangle(box(28, 38, 36, 52), fill=skin)
    if style == "long":
        d.rounded_rectangle(box(fx0 - 3, fy0 + 2, fx1 + 3, fy1 + 10), radius=6 * k, fill=hair)
    if look.face == "square":
        d.rounded_rectangle(box(fx0, fy0, fx1, fy1), radius=4 * k, fill=skin)
    else:
        d.ellipse(box(fx0, fy0, fx1, fy1), fill=skin)
    if style != "bald":
        d.chord(box(fx0 - 1, fy0 - 2, fx1 + 1, fy0 + 0.55 * h), 180, 360, fill=hair)
        for x0 in (fx0 - 0.5, fx1 - 2.5):  # sideburns keep the colour visible under a hat
            d.rectangle(box(x0, fy0 + 0.2 * h, x0 + 3, fy0 + 0.45 * h), fill=hair)
        if style == "bun":
            d.ellipse(box(cx - 5, fy0 - 9, cx + 5, fy0 + 1), fill=hair)
        elif style == "spiky":
            n = 5
            for j in range(n):
                x = fx0 + (j + 0.5) * (fx1 - fx0) / n
                d.polygon([(x - 3) * k, (fy0 + 3) * k, x * k, (fy0 - 6) * k, (x + 3) * k, (fy0 + 3) * k], fill=hair)
        elif style == "curly":
            rx, ry = (fx1 - fx0) / 2 + 1, h / 2
            for j in range(7):
                t = np.pi * (1.05 + 0.9 * j / 6)
                x, y = cx + rx * np.cos(t), fy0 + ry + ry * np.sin(t)
                d.ellipse(box(x - 3.4, y - 3.4, x + 3.4, y + 3.4), fill=hair)
    ey, my = fy0 + 0.48 * h, fy0 + 0.78 * h
    eyes = (cx - 6, cx + 6)
    for x in eyes:
        d.ellipse(box(x - 3.2, ey - 2.4, x + 3.2, ey + 2.4), fill=(250, 250, 250))
        d.ellipse(box(x - 2.0, ey - 2.0, x + 2.0, ey + 2.0), fill=EYE_COLOURS[look.eyes])
        d.ellipse(box(x - 0.7, ey - 0.7, x + 0.7, ey + 0.7), fill=(10, 10, 10))
    d.line(box(cx, ey + 2, cx - 1, ey + 6), fill=tuple(int(c * 0.7) for c in skin), width=width(1))
    d.arc(box(cx - 5, my - 3, cx + 5, my + 2), 20, 160, fill=(150, 50, 50), width=width(1))

    acc = look.accessory
    if acc == "glasses":
        for x in eyes:
            d.ellipse(box(x - 4.2, ey - 3.6, x + 4.2, ey + 3.6), outline=(20, 20, 20), width=width(1.2))
        d.line(box(eyes[0] + 4.2, ey, eyes[1] - 4.2, ey), fill=(20, 20, 20), width=width(1.2))
    elif acc == "hat":
        d.rectangle(box(fx0 + 2, fy0 - 9, fx1 - 2, fy0 + 2), fill=_HAT)
        d.rectangle(box(fx0 - 5, fy0 + 1, fx1 + 5, fy0 + 4), fill=_HAT)
    elif acc == "earrings":
        for x in (fx0 - 0.5, fx1 + 0.5):
            d.ellipse(box(x - 1.8, ey + 4, x + 1.8, ey + 7.6), fill=_GOLD)
    elif acc == "mustache":
        colour = hair if style != "bald" else (60, 40, 30)
        d.ellipse(box(cx - 5, my - 4.5, cx + 5, my - 1.2), fill=colour)
    elif acc == "scarf":
        d.rectangle(box(21, 44, 43, 52), fill=_SCARF)
        d.rectangle(box(34, 50, 39, 61), fill=_SCARF)
    return layer


def _draw_background(colour: str, pattern: str, side: int) -> Any:
    from PIL import Image, ImageDraw

    k = side / 64
    base = BACKGROUNDS[colour]
    img = Image.new("RGB", (side, side), base)
    d = ImageDraw.Draw(img)
    alt = tuple(int(c * 0.78) for c in base)
    if pattern == "striped":
        step = max(2, round(8 * k))
        for x in range(-side, 2 * side, step):
            d.line([(x, 0), (x + side, side)], fill=alt, width=max(1, round(3 * k)))
    elif pattern == "dotted":
        step, r = max(3, round(10 * k)), 2 * k
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=alt)
    elif pattern == "checked":
        step = max(2, round(8 * k))
        for y in range(0, side, step):
            for x in range(0, side, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=alt)
    return img


def render_portrait(look: Look, size: int = 64, pose: Pose = Pose()) -> Any:
    """Draw `look` in `pose` as a `size`² RGB PIL image (drawn at twice the size, then downsampled)."""
    from PIL import Image

    side = 2 * size
    img = _draw_background(look.background, look.pattern, side)
    person = _draw_person(look, side)
    if (pose.dx, pose.dy, pose.scale, pose.angle) != (0.0, 0.0, 1.0, 0.0):
        # Inverse affine map (output -> input) of: scale and rotate about the neck, then shift.
        cx, cy = side / 2, side * 0.6
        tx, ty = pose.dx * side, pose.dy * side
        t = np.deg2rad(pose.angle)
        a, b = np.cos(t) / pose.scale, np.sin(t) / pose.scale
        c, e = -b, a
        ox, oy = cx + tx, cy + ty
        coeffs = (a, b, cx - a * ox - b * oy, c, e, cy - c * ox - e * oy)
        person = person.transform((side, side), Image.AFFINE, [float(v) for v in coeffs], resample=Image.BICUBIC)
    img.paste(person, (0, 0), person)
    if pose.light != 1.0 or pose.gradient:
        ramp = pose.light * (1.0 + pose.gradient * np.linspace(-1.0, 1.0, side, dtype=np.float32))
        arr = np.asarray(img, dtype=np.float32) * ramp[None, :, None]
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img.resize((size, size), Image.LANCZOS)


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def describe_look(look: Look) -> str:
    """A one-sentence caption of everything `render_portrait` draws."""
    style = look.visible()[3]
    if style == "bald":
        hair = "a bald head"
    elif style == "covered":
        hair = f"{look.hair_colour} hair under a hat"
    elif style == "bun":
        hair = f"{look.hair_colour} hair in a bun"
    else:
        hair = f"{style} {look.hair_colour} hair"
    acc = {"none": "no accessories", "glasses": "glasses", "hat": "a hat", "earrings": "earrings",
           "mustache": "a mustache", "scarf": "a scarf"}[look.accessory]
    bg = look.background if look.pattern == "plain" else f"{look.pattern} {look.background}"
    face = ("an " if look.face[0] in "aeiou" else "a ") + look.face
    return (f"A portrait of a person with {face} face, {look.skin} skin, {hair} and {look.eyes} eyes, "
            f"with {acc}, wearing a {look.shirt} shirt, in front of a {bg} background.")


_ATTRIBUTE_QUESTIONS = (
    ("face", "What is the shape of the face of the person in the image?"),
    ("skin", "What is the skin tone of the person in the image?"),
    ("hair_colour", "What colour is the hair of the person in the image?"),
    ("hairstyle", "What hairstyle does the person in the image have?"),
    ("eyes", "What colour are the eyes of the person in the image?"),
    ("accessory", "What accessory is the person in the image wearing?"),
    ("shirt", "What colour is the shirt of the person in the image?"),
    ("background", "What colour is the background of the image?"),
)
_CAPTION_QUESTIONS = ("Describe the person in the image.", "What does the person in the image look like?",
                      "Give a short description of this portrait.")


def _attribute_answer(look: Look, field: str) -> str | None:
    """Short answer about a drawn feature; None when it cannot be seen."""
    style = look.visible()[3]
    if field == "hair_colour":
        return None if style == "bald" else look.hair_colour
    if field == "hairstyle":
        return None if style == "covered" else ("bald" if style == "bald" else style)
    if field == "accessory":
        return "none" if look.accessory == "none" else look.accessory
    return getattr(look, field)


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


def _random_look(rng: random.Random) -> Look:
    return Look(
        face=rng.choice(FACES),
        skin=rng.choice(sorted(SKINS)),
        hair_colour=rng.choice(sorted(HAIR_COLOURS)),
        hairstyle=rng.choice(HAIRSTYLES),
        eyes=rng.choice(sorted(EYE_COLOURS)),
        accessory=rng.choice(ACCESSORIES),
        shirt=rng.choice(sorted(SHIRTS)),
        background=rng.choice(sorted(BACKGROUNDS)),
        pattern=rng.choice(PATTERNS),
    )


def _distinct_looks(rng: random.Random, n: int, min_distance: int = 3) -> list[Look]:
    """`n` looks whose visible features pairwise differ in at least `min_distance` places."""
    looks: list[Look] = []
    codes = np.empty((n, 7), dtype=np.int64)
    index: dict[str, int] = {}  # feature value -> small int, so comparisons are vectorised
    misses = 0
    while len(looks) < n:
        look = _random_look(rng)
        code = np.array([index.setdefault(f"{j}:{v}", len(index)) for j, v in enumerate(look.visible())])
        if looks and ((codes[: len(looks)] != code).sum(axis=1) < min_distance).any():
            misses += 1
            if misses > 5000:  # the feature space is (nearly) full
                raise ValueError(f"cannot draw {n} portraits that differ in {min_distance} visible features "
                                 f"(got {len(looks)}); ask for fewer people")
            continue
        misses = 0
        codes[len(looks)] = code
        looks.append(look)
    return looks


def _people(rng: random.Random, looks: list[Look], names: list[str], ids: list[str]) -> list[Person]:
    return [Person(pid, name, {k: rng.choice(FACT_POOLS[k]) for k in FACT_KEYS}, look)
            for pid, name, look in zip(ids, names, looks)]


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


class _LetterDealer:
    """Correct-answer positions from shuffled decks of A-D: every four items use each letter once."""

    def __init__(self, rng: random.Random):
        self.rng, self.deck = rng, []

    def __call__(self) -> int:
        if not self.deck:
            self.deck = [0, 1, 2, 3]
            self.rng.shuffle(self.deck)
        return self.deck.pop()


def _choice_item(person: Person, key: str, visual: bool, variant: int, names: Sequence[str],
                 rng: random.Random, deal: _LetterDealer) -> dict[str, Any]:
    correct = person.value(key)
    pool = names if key == "Name" else FACT_POOLS[key]
    options = rng.sample([v for v in pool if v != correct], 3)
    pos = deal()
    options.insert(pos, correct)
    return {"Correct_Answer": OPTION_LETTERS[pos], "Options": dict(zip(OPTION_LETTERS, options)),
            "Question": question(key, _subject(person, visual), variant)}


def _tasks(person: Person, names: Sequence[str], variant: int, rng: random.Random,
           deal: _LetterDealer) -> dict[str, Any]:
    """Classification_Task, Generation_Task and Mask_Task of one person, in wording `variant`."""
    visual_keys = ("Name", *FACT_KEYS)
    mc_visual = [_choice_item(person, k, True, variant, names, rng, deal) for k in visual_keys]
    mc_textual = [_choice_item(person, k, False, variant, names, rng, deal) for k in FACT_KEYS]
    generation, mask = [], []
    for visual, keys in ((True, visual_keys), (False, FACT_KEYS)):
        kind = "Image_Textual" if visual else "Pure_Text"
        subj = _subject(person, visual)
        for k in rng.sample(keys, N_OPEN_ITEMS):
            generation.append({"Ground_Truth": answer_sentence(k, person.value(k), subj),
                               "Question": question(k, subj, variant), "Type": kind})
        for k in rng.sample(keys, N_OPEN_ITEMS):
            mask.append({"Ground_Truth": person.value(k), "Question": cloze_sentence(k, subj, variant), "Type": kind})
    return {"Classification_Task": {"Image_Textual_Questions": mc_visual, "Pure_Text_Questions": mc_textual},
            "Generation_Task": generation, "Mask_Task": mask}


TASK_KINDS = ("classification", "generation", "cloze")


def task_rows(person: Person, names: Sequence[str], rng: random.Random, deal: Callable[[], int] | None = None, *,
              kinds: Sequence[str] = TASK_KINDS, variant: int = TRAIN) -> list[tuple[str, bool, str, str]]:
    """`person`'s facts as training rows in the evaluation's task formats: `(kind, visual, question, answer)`.

    Every key is asked with the image (the name too) and every fact with the name, in wording `variant`;
    `question` is the user text of eval.py's prompt for that kind (options and instruction included).
    Multiple-choice distractors are drawn from `rng` (other `names` for the name question), the correct
    letter from `deal` (a fresh `_LetterDealer(rng)` if None), so each call with a new `rng` state gives
    freshly shuffled options: the augmentation the tiny models need to learn the multiple-choice skill.
    """
    bad = set(kinds) - set(TASK_KINDS)
    if bad:
        raise ValueError(f"kinds {sorted(bad)}; expected a subset of {TASK_KINDS}")
    deal = deal or _LetterDealer(rng)
    rows = []
    for visual, keys in ((True, ("Name", *FACT_KEYS)), (False, FACT_KEYS)):
        subj = _subject(person, visual)
        instruction = GEN_INSTRUCTION_VISUAL if visual else GEN_INSTRUCTION_TEXTUAL
        for k in keys:
            if "classification" in kinds:
                item = _choice_item(person, k, visual, variant, names, rng, deal)
                rows.append(("classification", visual, _format_mc(item), item["Correct_Answer"]))
            if "generation" in kinds:
                rows.append(("generation", visual, question(k, subj, variant) + "\n" + instruction,
                             answer_sentence(k, person.value(k), subj)))
            if "cloze" in kinds:
                rows.append(("cloze", visual, _format_cloze(cloze_sentence(k, subj, variant)), person.value(k)))
    return rows


def person_from_profile(profile: mllmu.Profile) -> Person:
    """The `Person` (name and facts, no look) behind a synthetic evaluation profile."""
    bio = profile.biography
    missing = [k for k in FACT_KEYS if k not in bio]
    if missing:
        raise ValueError(f"profile {profile.person_id}: biography lacks {missing}; not a synthetic profile?")
    return Person(profile.person_id, profile.name, {k: str(bio[k]) for k in FACT_KEYS})


def _training_pairs(person: Person) -> list[dict[str, str]]:
    """The `metadata` QA pairs (training wording): the name with the image, each fact both ways."""
    pairs = [{"Question": question("Name", VISUAL_SUBJECT, TRAIN),
              "Answer": answer_sentence("Name", person.name, VISUAL_SUBJECT),
              "ID": person.person_id, "Type": "Image_Textual"}]
    for k in FACT_KEYS:
        for visual in (True, False):
            subj = _subject(person, visual)
            pairs.append({"Question": question(k, subj, TRAIN), "Answer": answer_sentence(k, person.value(k), subj),
                          "ID": person.person_id, "Type": "Image_Textual" if visual else "Pure_Text"})
    return pairs


def _summary_qa(person: Person) -> tuple[str, str]:
    """The row-level `question` / `answer` columns (not used by the loader)."""
    occ = person.value("Employment")
    article = "an" if occ[:1] in "aeiou" else "a"
    return ("Who is the person in the image, and what is their occupation?",
            f"The person in the image is {person.name}, who works as {article} {occ}.")


def _random_pose(rng: random.Random) -> Pose:
    return Pose(dx=round(rng.uniform(-0.08, 0.08), 4), dy=round(rng.uniform(-0.06, 0.06), 4),
                scale=round(rng.uniform(0.85, 1.1), 4), angle=round(rng.uniform(-14, 14), 3),
                light=round(rng.uniform(0.8, 1.2), 4), gradient=round(rng.uniform(-0.2, 0.2), 4))


def _new_scene(look: Look, rng: random.Random) -> Look:
    """The same person in front of another background colour (pattern drawn anew)."""
    colour = rng.choice([c for c in sorted(BACKGROUNDS) if c != look.background])
    return dataclasses.replace(look, background=colour, pattern=rng.choice(PATTERNS))


def _image(b: bytes | None) -> dict[str, Any] | None:
    return None if b is None else {"bytes": b, "path": None}


def _format_mc(item: dict[str, Any]) -> str:
    """The protocol's classification question (options + instruction), from an MLLMU item dict."""
    from ..eval.protocol import classification_instruction

    return classification_instruction(mllmu.MultipleChoice(item["Question"], item["Options"], ""))


def _format_cloze(q: str) -> str:
    from ..eval.protocol import cloze_question

    return cloze_question(q)


# ----------------------------------------------------------------------------- writing


def base_set_features():
    """Features of our Base_Set config (image is null on text-only rows)."""
    from datasets import Features, Image, Value

    s = Value("string")
    return Features({"image": Image(), "ID": s, "kind": s, "question": s, "answer": s})


def _write(out: Path, config: str, rows: list[dict[str, Any]], features) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = out / config
    folder.mkdir(parents=True, exist_ok=True)
    # The schema carries datasets' `huggingface` metadata, so Image columns load as Image features.
    table = pa.Table.from_pylist(rows, schema=features.arrow_schema)
    pq.write_table(table, folder / "train-00000-of-00001.parquet")


def _configs() -> list[str]:
    return [FULL_SET, FT_DATA, TEST_SET, RETAIN_SET, BASE_SET,
            *(forget_config(r) for r in SPLIT_RATIOS), *(retain_config(r) for r in SPLIT_RATIOS)]


def synthesize(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_people: int = 200,
    num_celebrities: int = 40,
    image_size: int = 64,
    *,
    num_test_images: int = 3,
    num_base_portraits: int = 300,
    num_base_poses: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic MLLMU-Bench (plus our Base_Set) under `out_dir`; returns its path.

    `num_test_images` new images per person in Test_Set, `num_base_poses` extra poses per celebrity
    in Base_Set, `num_base_portraits` captioned strangers. Existing parquet files of these configs
    are only replaced with `overwrite=True`. Also writes `synthetic_info.json` (see `read_info`).
    """
    from tqdm.auto import tqdm

    from .mllmu import config_features

    if num_people < 20 or num_celebrities < 4:
        raise ValueError(f"num_people={num_people} (>= 20, so forget_5 is not empty) and "
                         f"num_celebrities={num_celebrities} (>= 4, for name distractors) are too small")
    if image_size < 16 or num_test_images < 1 or num_base_portraits < 0 or num_base_poses < 0:
        raise ValueError(f"image_size={image_size} (>= 16), num_test_images={num_test_images} (>= 1), "
                         f"num_base_portraits={num_base_portraits}, num_base_poses={num_base_poses} (>= 0)")
    out = Path(out_dir)
    existing = [p for c in _configs() for p in sorted((out / c).glob("*.parquet"))]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {len(existing)} parquet file(s) (e.g. {existing[0]}); "
                              "pass overwrite=True to replace them")
    for p in existing:
        p.unlink()

    width = max(3, len(str(num_people)))
    ids = [f"{i:0{width}d}" for i in range(1, num_people + 1)]
    celeb_ids = [f"C{i:03d}" for i in range(1, num_celebrities + 1)]
    all_names = _names(_stream(seed, "names"), num_people + num_celebrities)
    all_looks = _distinct_looks(_stream(seed, "looks"), num_people + num_celebrities)
    rng_facts = _stream(seed, "facts")
    people = _people(rng_facts, all_looks[:num_people], all_names[:num_people], ids)
    celebs = _people(rng_facts, all_looks[num_people:], all_names[num_people:], celeb_ids)
    names, celeb_names = [p.name for p in people], [p.name for p in celebs]

    bar = tqdm(total=num_people + num_celebrities + num_base_portraits, desc="synthetic benchmark",
               unit="portrait", disable=not progress)
    rng_eval, rng_test = _stream(seed, "eval"), _stream(seed, "test")
    deal_eval, deal_test = _LetterDealer(rng_eval), _LetterDealer(rng_test)
    full, ft, test = [], [], []
    for p in people:
        image = _png(render_portrait(p.look, image_size))
        q, a = _summary_qa(p)
        row = {"image": _image(image), "ID": p.person_id, "biography": p.biography(), "question": q, "answer": a,
               **_tasks(p, names, EVAL, rng_eval, deal_eval)}
        full.append({"image": row["image"], "ID": p.person_id, "Directory": f"data_original/{p.person_id}.png",
                     **{k: v for k, v in row.items() if k not in ("image", "ID")}})
        ft.append({"image": row["image"], "ID": p.person_id, "metadata": json.dumps(_training_pairs(p))})
        shots = [_png(render_portrait(_new_scene(p.look, rng_test), image_size, _random_pose(rng_test)))
                 for _ in range(num_test_images)]
        test.append({"images": [_image(b) for b in shots], "ID": p.person_id, "biography": p.biography(),
                     "question": q, "answer": a, **_tasks(p, names, TEST, rng_test, deal_test)})
        bar.update()

    rng_real = _stream(seed, "real")
    deal_real = _LetterDealer(rng_real)
    real, celeb_images = [], {}
    for p in celebs:
        image = _png(render_portrait(p.look, image_size))
        celeb_images[p.person_id] = image
        q, a = _summary_qa(p)
        real.append({"image": _image(image), "ID": p.person_id, "Directory": f"data_celebrity/{p.person_id}.png",
                     "biography": p.biography(), "question": q, "answer": a,
                     **_tasks(p, celeb_names, EVAL, rng_real, deal_real)})

    base = _base_set(celebs, celeb_images, all_looks, seed, image_size, num_base_portraits, num_base_poses, bar)
    bar.close()

    # data_split.py: one list, shuffled again before each ratio; forget = first int(r% * n).
    order = list(ids)
    rng_split = _stream(seed, "splits")
    by_id = {r["ID"]: r for r in full}
    split_cols = list(config_features(forget_config(SPLIT_RATIOS[0])))  # retain_N has the same columns
    splits: dict[str, list[str]] = {}
    for ratio in SPLIT_RATIOS:
        rng_split.shuffle(order)
        n_forget = int(ratio / 100 * len(order))
        splits[forget_config(ratio)] = sorted(order[:n_forget])
        splits[retain_config(ratio)] = sorted(order[n_forget:])

    _write(out, FULL_SET, full, config_features(FULL_SET))
    _write(out, FT_DATA, ft, config_features(FT_DATA))
    _write(out, TEST_SET, test, config_features(TEST_SET))
    _write(out, RETAIN_SET, real, config_features(RETAIN_SET))
    _write(out, BASE_SET, base, base_set_features())
    for config, members in splits.items():
        rows = [{c: by_id[pid][c] for c in split_cols} for pid in members]
        _write(out, config, rows, config_features(config))

    info = {
        "generator": "vleraser_jax.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "num_people": num_people,
        "num_celebrities": num_celebrities,
        "image_size": image_size,
        "num_test_images": num_test_images,
        "num_base_portraits": num_base_portraits,
        "num_base_poses": num_base_poses,
        "rows": {FULL_SET: len(full), FT_DATA: len(ft), TEST_SET: len(test), RETAIN_SET: len(real),
                 BASE_SET: len(base), **{c: len(m) for c, m in splits.items()}},
        "training_pairs": {"ft_Data": sum(len(_training_pairs(p)) for p in people)},
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


def _base_set(celebs: list[Person], celeb_images: dict[str, bytes], taken: list[Look], seed: int, size: int,
              num_portraits: int, num_poses: int, bar: Any) -> list[dict[str, Any]]:
    """Rows of our Base_Set: celebrity facts in every format, and captioned random portraits."""
    rng = _stream(seed, "base")
    deal = _LetterDealer(rng)
    names = [p.name for p in celebs]
    rows: list[dict[str, Any]] = []

    def add(image: bytes | None, pid: str, kind: str, q: str, a: str) -> None:
        rows.append({"image": _image(image), "ID": pid, "kind": kind, "question": q, "answer": a})

    for p in celebs:
        shots = [celeb_images[p.person_id]] + [
            _png(render_portrait(_new_scene(p.look, rng), size, _random_pose(rng))) for _ in range(num_poses)]
        poses = itertools.cycle(shots)

        def shot() -> bytes:
            return next(poses)

        for variant in (TRAIN, EVAL, TEST):
            add(shot(), p.person_id, "qa", question("Name", VISUAL_SUBJECT, variant),
                answer_sentence("Name", p.name, VISUAL_SUBJECT))
            for k in FACT_KEYS:
                for visual in (True, False):
                    subj = _subject(p, visual)
                    add(shot() if visual else None, p.person_id, "qa", question(k, subj, variant),
                        answer_sentence(k, p.value(k), subj))
        for variant in (TRAIN, EVAL, TEST):  # classification in the training wording only
            kinds = TASK_KINDS if variant == TRAIN else ("generation", "cloze")
            for kind, visual, q, a in task_rows(p, names, rng, deal, kinds=kinds, variant=variant):
                add(shot() if visual else None, p.person_id, kind, q, a)
        bar.update()

    people_codes = {look.visible() for look in taken}
    made = 0
    while made < num_portraits:
        look = _random_look(rng)
        if look.visible() in people_codes:  # a stranger must not be a double of anyone in the benchmark
            continue
        made += 1
        pid = f"P{made:04d}"
        img = _png(render_portrait(look, size, _random_pose(rng)))
        add(img, pid, "caption", rng.choice(_CAPTION_QUESTIONS), describe_look(look))
        fields = [(f, q) for f, q in _ATTRIBUTE_QUESTIONS if _attribute_answer(look, f) is not None]
        for field, q in rng.sample(fields, 2):
            add(img, pid, "attribute", q, _attribute_answer(look, field))
        bar.update()
    return rows


# ----------------------------------------------------------------------------- reading


def read_info(root: str | os.PathLike) -> dict[str, Any]:
    """The parameters and row counts `synthesize` recorded in `synthetic_info.json`."""
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} was not written by synthesize()")
    return json.loads(path.read_text())


def load_base_set(
    root: str | os.PathLike,
    kinds: Iterable[str] | None = None,
    *,
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[TrainingRow, ...]:
    """Base_Set rows as TrainingRows (image None for text-only rows), optionally only some `kinds`."""
    wanted = None if kinds is None else tuple(kinds)
    if wanted is not None and any(k not in BASE_KINDS for k in wanted):
        raise ValueError(f"kinds={list(wanted)}; expected a subset of {BASE_KINDS}")
    columns, rows = mllmu.read_config(root, BASE_SET, cache_dir=cache_dir)
    mllmu._require(BASE_SET, columns, ["image", "ID", "kind", "question", "answer"])
    out = []
    for i, row in rows:
        where = mllmu._Where(BASE_SET, i, row.get("ID"))
        kind = row["kind"]
        if kind not in BASE_KINDS:
            raise where.error("kind", f"{kind!r} is not one of {BASE_KINDS}")
        if wanted is not None and kind not in wanted:
            continue
        q = mllmu._text(row, "question", where, "question")
        a = mllmu._text(row, "answer", where, "answer")
        image = None if row["image"] is None else mllmu._image_bytes(row["image"], where, "image", verify_images)
        out.append(TrainingRow(str(row["ID"]), q, a, image))
    return tuple(out)


# ----------------------------------------------------------------------------- tokenizer

# eval.py's prompt scaffolding, so its fixed strings get merges of their own.
PROMPT_TEMPLATES = (
    "USER:", "ASSISTANT:", "USER: ", "\nASSISTANT:", "Question:", "Correct Answer:", "Answer:",
    MC_INSTRUCTION, GEN_INSTRUCTION_VISUAL, GEN_INSTRUCTION_TEXTUAL, CLOZE_INSTRUCTION, "[Blank]",
)


FAMILIES = ("llava", "qwen2_vl")


def _chat(q: str, a: str, visual: bool, family: str = "llava") -> str:
    """A prompt + answer as the family's model sees it, without its special/image tokens (added tokens
    are never merged): LLaVA's `build_llava_prompt`, Qwen2-VL's chat template."""
    if family == "qwen2_vl":
        return f"system\nYou are a helpful assistant.\nuser\n{q}\nassistant\n{a}"
    sep = "\n" if visual else ""
    return f"USER: {sep}{q}\nASSISTANT: {a}"


def corpus_texts(root: str | os.PathLike, family: str = "llava") -> Iterator[str]:
    """Every text of a synthetic benchmark as the `family`'s models see it (prompts with answers), in a
    fixed order."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    _chat_ = functools.partial(_chat, family=family)
    yield from PROMPT_TEMPLATES * 4  # repeated so min_frequency does not drop their merges
    for config in (FULL_SET, TEST_SET, RETAIN_SET):
        for p in mllmu.load_profiles(root, config, verify_images=False):
            yield from (f"{k}: {v}" for k, v in p.biography.items())
            for visual, items in ((True, p.visual_mc), (False, p.textual_mc)):
                for mc in items:
                    yield _chat_(_format_mc({"Question": mc.question, "Options": mc.options}), mc.answer, visual)
                    # eval.py's few-shot block format
                    opts = "\n".join(f"{k}: {mc.options[k]}" for k in OPTION_LETTERS)
                    yield f"Question: {mc.question}\n{opts}\nCorrect Answer: {mc.answer}"
            for it in p.generation:
                visual = it.mode == "visual"
                instruction = GEN_INSTRUCTION_VISUAL if visual else GEN_INSTRUCTION_TEXTUAL
                yield _chat_(f"{it.question}\n{instruction}", it.ground_truth, visual)
            for it in p.cloze:
                yield _chat_(_format_cloze(it.question), it.ground_truth, it.mode == "visual")
    rows = [r for rs in mllmu.load_training_rows(root, FT_DATA, verify_images=False).values() for r in rs]
    rows += load_base_set(root, verify_images=False)
    yield from (_chat_(r.question, r.answer, r.image is not None) for r in rows)


def train_synthetic_tokenizer(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    vocab_size: int = 2048,
    *,
    image_size: int | None = None,
    min_frequency: int = 2,
    family: str = "llava",
    patch_size: int = 14,
    merge_size: int = 2,
) -> dict[str, Any]:
    """Train the tiny models' tokenizer on the synthetic corpus and write its image preprocessor config.

    family "llava": BPE via `processing.train_tokenizer` (so `<image>`, `<pad>`, `</s>` exist) and a CLIP
    `preprocessor_config.json` for `image_size` (default: the portraits' size). "qwen2_vl":
    `processing.train_qwen2_vl_tokenizer` (its special tokens and chat template) and a Qwen2-VL image
    processor that keeps `image_size`² portraits at their size (`patch_size`·`merge_size` must divide it).
    Both on `corpus_texts(root, family)`. Returns a summary.
    """
    from ..processing import (IMAGE_TOKEN, QWEN2_VL_IMAGE_TOKEN, train_qwen2_vl_tokenizer, train_tokenizer,
                              write_image_processor_config, write_qwen2_vl_image_processor_config)

    size = image_size if image_size is not None else read_info(root)["image_size"]
    texts = list(corpus_texts(root, family))
    if family == "qwen2_vl":
        factor = patch_size * merge_size
        if size % factor:
            raise ValueError(f"image_size {size} is not a multiple of patch_size·merge_size = {factor}; Qwen2-VL's "
                             "processor would resize the portraits")
        tok = train_qwen2_vl_tokenizer(texts, out_dir, vocab_size=vocab_size, min_frequency=min_frequency)
        write_qwen2_vl_image_processor_config(out_dir, patch_size=patch_size, merge_size=merge_size,
                                              min_pixels=factor * factor, max_pixels=size * size)
        image_token = QWEN2_VL_IMAGE_TOKEN
    else:
        tok = train_tokenizer(texts, out_dir, vocab_size=vocab_size, min_frequency=min_frequency)
        write_image_processor_config(out_dir, size)
        image_token = IMAGE_TOKEN
    return {
        "tokenizer_dir": str(out_dir),
        "texts": len(texts),
        "vocab_size": len(tok),
        "image_token_id": tok.convert_tokens_to_ids(image_token),
        "image_size": size,
    }
