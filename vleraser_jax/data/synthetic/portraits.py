"""Portraits: a person's look (the visible features that identify them), drawn procedurally with PIL, and
poses / scenes for new images of the same person."""

from __future__ import annotations

import dataclasses
import io
import random
from typing import Any

import numpy as np


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


def _random_pose(rng: random.Random) -> Pose:
    return Pose(dx=round(rng.uniform(-0.08, 0.08), 4), dy=round(rng.uniform(-0.06, 0.06), 4),
                scale=round(rng.uniform(0.85, 1.1), 4), angle=round(rng.uniform(-14, 14), 3),
                light=round(rng.uniform(0.8, 1.2), 4), gradient=round(rng.uniform(-0.2, 0.2), 4))


def _new_scene(look: Look, rng: random.Random) -> Look:
    """The same person in front of another background colour (pattern drawn anew)."""
    colour = rng.choice([c for c in sorted(BACKGROUNDS) if c != look.background])
    return dataclasses.replace(look, background=colour, pattern=rng.choice(PATTERNS))
