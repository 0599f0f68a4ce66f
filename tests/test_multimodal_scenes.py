"""synth-scenes: the pixels show what the captions and answers say; digits: scikit-learn's scans."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from tessera.cli.main import main
from tessera.multimodal.scenes import BACKGROUND, COLOURS, SHAPES

NUMBER = {"zero": 0, "one": 1, "two": 2}


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def where(a, b):
    """Where shape a is relative to b, from their centres: the axis on which they are further apart."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    assert main(["data", "synth-scenes", "--out", str(root), "--n", "60", "--size", "40", "--seed", "4"]) == 0
    return root


def test_the_pixels_show_each_shape_in_its_colour_and_nothing_else(scenes):
    for spec in rows(scenes / "scenes.jsonl"):
        pixels = np.asarray(Image.open(scenes / "images" / spec["image"]).convert("RGB"))
        assert pixels.shape == (40, 40, 3)
        covered = np.zeros((40, 40), bool)
        for s in spec["shapes"]:
            box = (slice(s["y"] - s["r"], s["y"] + s["r"] + 1), slice(s["x"] - s["r"], s["x"] + s["r"] + 1))
            assert tuple(pixels[s["y"], s["x"]]) == COLOURS[s["colour"]]
            inked = (pixels[box] == COLOURS[s["colour"]]).all(-1)
            assert inked.mean() >= 0.45, spec  # about half its box or more (a triangle is half)
            # the corners of the box tell the kinds apart: a square fills all four, a circle none,
            # a triangle pointing up the two at its base
            corners = (inked[0, 0], inked[0, -1], inked[-1, 0], inked[-1, -1])
            expected = {"square": (True,) * 4, "circle": (False,) * 4, "triangle": (False, False, True, True)}
            assert corners == expected[s["kind"]], spec
            covered[box] = True
        assert (pixels[~covered] == BACKGROUND).all()  # nothing drawn outside the shapes' boxes
        if len(spec["shapes"]) == 2:
            a, b = spec["shapes"]
            assert not (abs(a["x"] - b["x"]) <= a["r"] + b["r"] and abs(a["y"] - b["y"]) <= a["r"] + b["r"])


def test_captions_and_answers_follow_from_the_scene(scenes):
    specs = {r["image"]: r["shapes"] for r in rows(scenes / "scenes.jsonl")}
    relations, in_captions, answers = set(), set(), set()
    for row in rows(scenes / "captions.jsonl"):
        shapes = specs[row["image"]]
        words = [f"a {s['colour']} {s['kind']}" for s in shapes]
        expected = words[0] if len(shapes) == 1 else f"{words[0]} {where(*shapes)} {words[1]}"
        assert row["caption"] == expected
        if len(shapes) == 1:  # hard negatives: one detail wrong
            assert sorted(row["negatives"]) == sorted(f"a {c} {shapes[0]['kind']}" for c in COLOURS
                                                      if c != shapes[0]["colour"])
        else:
            a, b = shapes
            assert row["negatives"][0] == f"{words[0]} {where(b, a)} {words[1]}"  # the relation flipped
            m = re.fullmatch(rf"a (\w+) {a['kind']} {where(a, b)} a (\w+) {b['kind']}", row["negatives"][1])
            swapped = (b["colour"], a["colour"]) if a["colour"] != b["colour"] else (a["colour"], m[2])
            assert m and (m[1], m[2]) == swapped != (a["colour"], b["colour"])  # colours swapped or changed
        if len(shapes) == 2:
            in_captions.add(where(*shapes))
        # named in a fixed order of kinds, so the image alone determines its caption
        assert [s["kind"] for s in shapes] == sorted((s["kind"] for s in shapes), key=SHAPES.index)
    for row in rows(scenes / "vqa.jsonl"):
        shapes, q, a = specs[row["image"]], row["question"], row["answer"]
        answers.add(a)
        if m := re.fullmatch(r"what colour is the (\w+)\?", q):
            assert a == next(s["colour"] for s in shapes if s["kind"] == m[1])
        elif m := re.fullmatch(r"what shape is the (\w+) object\?", q):
            owners = [s["kind"] for s in shapes if s["colour"] == m[1]]
            assert owners == [a]
        elif q == "how many shapes are there?":
            assert NUMBER[a] == len(shapes)
        elif m := re.fullmatch(r"how many (\w+) shapes are there\?", q):
            assert NUMBER[a] == sum(s["colour"] == m[1] for s in shapes)
        elif m := re.fullmatch(r"is there a (\w+)\?", q):
            assert a == ("yes" if any(s["kind"] == m[1] for s in shapes) else "no")
        elif m := re.fullmatch(r"where is the (\w+) relative to the (\w+)\?", q):
            first, second = (next(s for s in shapes if s["kind"] == k) for k in (m[1], m[2]))
            assert a == where(first, second)
            relations.add(a)
        else:
            raise AssertionError(f"a question outside the grammar: {q!r}")
    assert relations == in_captions == {"above", "below", "left of", "right of"}
    asked = {}  # a two-shape scene's relation is asked both ways round
    for row in rows(scenes / "vqa.jsonl"):
        if row["question"].startswith("where"):
            asked.setdefault(row["image"], []).append(row["question"])
    assert {image: len(q) for image, q in asked.items()} == {i: 2 for i, s in specs.items() if len(s) == 2}
    assert {"yes", "no", "zero", "one", "two"} <= answers


def test_same_seed_same_scenes_another_seed_held_out(scenes, tmp_path):
    main(["data", "synth-scenes", "--out", str(tmp_path / "same"), "--n", "60", "--size", "40", "--seed", "4"])
    main(["data", "synth-scenes", "--out", str(tmp_path / "other"), "--n", "60", "--size", "40", "--seed", "5"])
    for f in ("captions.jsonl", "vqa.jsonl", "images/000007.png"):
        assert (tmp_path / "same" / f).read_bytes() == (scenes / f).read_bytes()
    assert rows(tmp_path / "other" / "scenes.jsonl") != rows(scenes / "scenes.jsonl")


def test_digits_are_sklearns_scans_with_their_labels(tmp_path):
    from sklearn.datasets import load_digits

    assert main(["data", "digits", "--out", str(tmp_path), "--size", "16"]) == 0
    digits = load_digits()
    captions, vqa = rows(tmp_path / "captions.jsonl"), rows(tmp_path / "vqa.jsonl")
    assert len(captions) == len(vqa) == len(digits.target) == 1797
    for i in (0, 1, 500, 1796):
        assert captions[i]["caption"] == f"a handwritten digit {digits.target[i]}"
        assert vqa[i] == {"image": f"{i:06d}.png", "question": "what digit is this?", "answer": str(digits.target[i])}
        pixels = np.asarray(Image.open(tmp_path / "images" / captions[i]["image"]), dtype=np.float64)
        ink = 255.0 - pixels[::2, ::2]  # 2x2 blocks of one grey level
        np.testing.assert_allclose(ink * 16.0 / 255.0, digits.images[i], atol=0.5 * 16 / 255)
        assert (pixels[::2, ::2] == pixels[1::2, 1::2]).all()
