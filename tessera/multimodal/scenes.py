"""`tessera data synth-scenes`: procedural images of coloured shapes with exact captions and
question/answer pairs, so that every captioning, VQA and retrieval metric has a checkable right
answer. No image data set can be downloaded; this one is made here, the same for the same seed
(a held-out set is another seed).

A scene holds one or two shapes of different kinds (circle, square, triangle) in four colours on
a white background; two shapes sit one above the other or side by side, without overlapping.
The grammar is fixed and the vocabulary small, and the image determines its caption: two shapes
are named in the fixed order circle, square, triangle, whatever their places.
  caption   "a red circle" | "a red circle above a blue square" (above, below, left of, right of)
  questions "what colour is the circle?" -> "red"; "what shape is the red object?" -> "circle"
            (asked when one shape has that colour); "how many shapes are there?" -> "two";
            "how many red shapes are there?" -> "zero" | "one" | "two"; "is there a square?" ->
            "yes" | "no"; "where is the circle relative to the square?" -> "above" (and the square
            relative to the circle: "below")
  negatives (hard negatives for CLIP, in captions.jsonl) "a red circle below a blue square", "a blue
            circle above a red square"
The shapes are drawn with numpy (no anti-aliasing), so every pixel of a shape has its colour.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tessera.core.data import DataError
from tessera.core.storage import write_text_atomic

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
NUMBERS = ("zero", "one", "two")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: int  # centre, pixels from the left
    y: int  # centre, pixels from the top
    r: int  # half its width


def relation(a: Shape, b: Shape) -> str:
    """Where `a` lies relative to `b`: scenes are laid out so that one axis separates them."""
    if abs(a.y - b.y) > abs(a.x - b.x):
        return "above" if a.y < b.y else "below"
    return "left of" if a.x < b.x else "right of"


def scene(rng: random.Random, size: int) -> list[Shape]:
    """One or two shapes of different kinds (in the order of SHAPES), in halves of the canvas that
    do not overlap."""
    kinds = sorted(rng.sample(SHAPES, rng.choice((1, 2))), key=SHAPES.index)
    colours = [rng.choice(list(COLOURS)) for _ in kinds]
    radii = [rng.randint(max(2, size // 5), max(2, size // 4 - 1)) for _ in kinds]  # 6-7 px at 32: as big as two halves hold
    if len(kinds) == 1:
        r = radii[0]
        return [Shape(kinds[0], colours[0], rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r), r)]
    half, jitter = size // 2, size // 16
    low = rng.choice((0, 1))  # which shape lies in the first half along the axis: every relation appears
    along = [rng.randint(r, half - 1 - r) if i == low else rng.randint(half + r, size - 1 - r)
             for i, r in enumerate(radii)]
    centre = rng.randint(max(radii) + jitter, size - 1 - max(radii) - jitter)
    across = [centre + rng.randint(-jitter, jitter) for _ in radii]
    vertical = rng.random() < 0.5
    return [Shape(k, c, *((x, y) if vertical else (y, x)), r)
            for k, c, x, y, r in zip(kinds, colours, across, along, radii)]


def mask(shape: Shape, size: int) -> np.ndarray:
    """The (size, size) boolean mask of the shape's pixels."""
    y, x = np.mgrid[0:size, 0:size]
    dx, dy = x - shape.x, y - shape.y
    if shape.kind == "circle":
        return dx * dx + dy * dy <= shape.r * shape.r
    if shape.kind == "square":
        return (np.abs(dx) <= shape.r) & (np.abs(dy) <= shape.r)
    # a triangle pointing up: apex at (x, y - r), base on y + r, width 2r at the base
    return (dy >= -shape.r) & (dy <= shape.r) & (2 * np.abs(dx) <= dy + shape.r)


def render(shapes: list[Shape], size: int) -> np.ndarray:
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for s in shapes:
        image[mask(s, size)] = COLOURS[s.colour]
    return image


def caption(shapes: list[Shape]) -> str:
    first = f"a {shapes[0].colour} {shapes[0].kind}"
    if len(shapes) == 1:
        return first
    return f"{first} {relation(shapes[0], shapes[1])} a {shapes[1].colour} {shapes[1].kind}"


FLIPPED = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def negatives(shapes: list[Shape]) -> list[str]:
    """Captions one detail away from the scene's, the hardest first (hard negatives for CLIP): two
    shapes with the relation flipped, then with the colours swapped (or, when they share one, the
    second shape's colour changed); one shape in each other colour."""
    a = shapes[0]
    if len(shapes) == 1:
        return [f"a {c} {a.kind}" for c in COLOURS if c != a.colour]
    b = shapes[1]
    rel = relation(a, b)
    if a.colour != b.colour:
        first, second = b.colour, a.colour
    else:
        first, second = a.colour, next(c for c in COLOURS if c != b.colour)
    return [f"a {a.colour} {a.kind} {FLIPPED[rel]} a {b.colour} {b.kind}", f"a {first} {a.kind} {rel} a {second} {b.kind}"]


def questions(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    """(question, its one right answer) pairs about the scene."""
    qa = [(f"what colour is the {s.kind}?", s.colour) for s in shapes]
    for colour in {s.colour for s in shapes}:
        owners = [s for s in shapes if s.colour == colour]
        if len(owners) == 1:
            qa.append((f"what shape is the {colour} object?", owners[0].kind))
    qa.append(("how many shapes are there?", NUMBERS[len(shapes)]))
    colour = rng.choice(list(COLOURS))
    qa.append((f"how many {colour} shapes are there?", NUMBERS[sum(s.colour == colour for s in shapes)]))
    kind = rng.choice(SHAPES)
    qa.append((f"is there a {kind}?", "yes" if any(s.kind == kind for s in shapes) else "no"))
    if len(shapes) == 2:  # both ways round: one relation read from either shape
        a, b = shapes
        qa += [(f"where is the {a.kind} relative to the {b.kind}?", relation(a, b)),
               (f"where is the {b.kind} relative to the {a.kind}?", relation(b, a))]
    return qa


def synth_scenes(out: str | Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """Write `n` scenes: `images/NNNNNN.png`, `captions.jsonl`, `vqa.jsonl` (rows naming the image
    relative to `images/`) and `scenes.jsonl` (each scene's shapes, for checking answers)."""
    from PIL import Image

    if n <= 0:
        raise DataError(f"--n={n} must be positive")
    if size < 16:
        raise DataError(f"--size={size} must be at least 16 pixels")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"synth-scenes/{seed}")
    captions, vqa, specs = [], [], []
    for i in range(n):
        shapes = scene(rng, size)
        name = f"{i:06d}.png"
        Image.fromarray(render(shapes, size)).save(out / "images" / name, format="PNG")
        captions.append({"image": name, "caption": caption(shapes), "negatives": negatives(shapes)})
        vqa += [{"image": name, "question": q, "answer": a} for q, a in questions(shapes, rng)]
        specs.append({"image": name, "shapes": [asdict(s) for s in shapes]})
    for file, rows in (("captions.jsonl", captions), ("vqa.jsonl", vqa), ("scenes.jsonl", specs)):
        write_text_atomic(out / file, "".join(json.dumps(r) + "\n" for r in rows))
    return out
