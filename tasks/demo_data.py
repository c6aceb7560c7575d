"""The demo dataset: procedural scenes with VisDial v1.0 dialogs that are true about them.

Everything is a pure function of ``(seed, index)``, so a dialog does not depend on how many
others are generated, on their order, or on how many processes draw the images. The same code
writes a 20-dialog test fixture and a VisDial-train-sized benchmark set (82,783 images).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from schemas.ingest import NUM_OPTIONS, NUM_TURNS

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "light blue": (170, 200, 230), "beige": (225, 210, 180), "dark green": (30, 80, 50)}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
SPLIT_FOLDERS = {"train": "train2014", "val": "val2014", "test": "test2014"}
SPLIT_ID_BASE = {"train": 1_000_000, "val": 5_000_000, "test": 9_000_000}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    big: bool
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    image_id: int
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]


def image_id_for(split: str, index: int) -> int:
    return SPLIT_ID_BASE[split] + index


def image_name(split: str, image_id: int) -> str:
    return f"COCO_{SPLIT_FOLDERS[split]}_{image_id:012d}.jpg"


def make_scene(seed: int, split: str, index: int) -> Scene:
    rng = np.random.default_rng([seed, list(SPLIT_ID_BASE).index(split), index])
    width, height = (int(rng.integers(560, 721)), int(rng.integers(400, 521)))
    if rng.random() < 0.2:
        width, height = height, width
    n = int(rng.integers(1, 6))
    cells = rng.choice(9, size=n, replace=False)
    shapes = tuple(
        Shape(
            kind=SHAPES[int(rng.integers(len(SHAPES)))],
            color=list(COLORS)[int(rng.integers(len(COLORS)))],
            big=bool(rng.random() < 0.5),
            row=int(c) // 3,
            col=int(c) % 3,
        )
        for c in cells
    )
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(image_id_for(split, index), width, height, background, shapes)


def draw(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    cw, ch = scene.width / 3, scene.height / 3
    for s in scene.shapes:
        cx, cy = (s.col + 0.5) * cw, (s.row + 0.5) * ch
        r = min(cw, ch) * (0.42 if s.big else 0.2)
        fill = COLORS[s.color]
        if s.kind == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.kind == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def _where(s: Shape) -> str:
    if s.row == 1 and s.col == 1:
        return "in the middle"
    if s.row == 1:
        return f"on the {COLS[s.col]}"
    if s.col == 1:
        return f"at the {ROWS[s.row]}"
    return f"at the {ROWS[s.row]} {COLS[s.col]}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    groups: dict[tuple[str, str], int] = {}
    for s in scene.shapes:
        groups[(s.color, s.kind)] = groups.get((s.color, s.kind), 0) + 1
    parts = [f"{NUMBERS[n] if n > 1 else _article(c)} {c} {_plural(k, n)}" for (c, k), n in groups.items()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"a drawing of {listed} on a {scene.background} background"


def question_pool(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every (question, answer) that is true about the scene, VisDial style (lower case, no '?')."""
    qa: list[tuple[str, str]] = []
    n = len(scene.shapes)
    qa.append(("how many shapes are there", f"{NUMBERS[n]}" if rng.random() < 0.5 else f"there are {n}" if n > 1 else "just one"))
    qa.append(("what color is the background", scene.background if rng.random() < 0.5 else f"it is {scene.background}"))
    qa.append(("is this a photo", "no, it looks like a drawing"))
    qa.append(("are there any people", "no"))
    qa.append(("any animals", "no, just shapes"))
    for kind in SHAPES:
        k = sum(s.kind == kind for s in scene.shapes)
        q = f"are there any {kind}s"
        qa.append((q, f"yes, {NUMBERS[k]}" if k else "no"))
        qa.append((f"how many {kind}s are there", NUMBERS[k]))
    for color in COLORS:
        k = sum(s.color == color for s in scene.shapes)
        qa.append((f"is there anything {color}", f"yes, {NUMBERS[k]} {color} {_plural('shape', k)}" if k else "no"))
    for s in scene.shapes:
        same = [t for t in scene.shapes if t.kind == s.kind]
        if len(same) == 1:
            qa.append((f"what color is the {s.kind}", s.color if rng.random() < 0.5 else f"it is {s.color}"))
            qa.append((f"where is the {s.kind}", _where(s)))
            qa.append((f"is the {s.kind} big", "yes, it is large" if s.big else "no, it is small"))
        same_c = [t for t in scene.shapes if t.kind == s.kind and t.color == s.color]
        if len(same_c) == 1:
            qa.append((f"where is the {s.color} {s.kind}", _where(s)))
        qa.append((f"what shape is {_where(s)}", f"{_article(s.color)} {s.color} {s.kind}"))
    return qa


def dialog_for(scene: Scene, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng([seed, scene.image_id, 7])
    pool = question_pool(scene, rng)
    uniq = list(dict.fromkeys(pool))  # keep first answer per question, stable order
    seen: dict[str, str] = {}
    for q, a in uniq:
        seen.setdefault(q, a)
    items = list(seen.items())
    order = rng.permutation(len(items))[:NUM_TURNS]
    while len(order) < NUM_TURNS:  # tiny scenes: repeat questions (VisDial has repeats too)
        order = np.concatenate([order, rng.permutation(len(items))])[:NUM_TURNS]
    return [items[int(i)] for i in order]


class _Vocab:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.items)
            self.items.append(s)
        return i


def _draw_and_save(args: tuple[int, str, int, str]) -> None:
    seed, split, index, folder = args
    scene = make_scene(seed, split, index)
    draw(scene).save(os.path.join(folder, image_name(split, scene.image_id)), "JPEG", quality=85)


def _chunks(seed: int, split: str, n: int, folder: str) -> Iterator[tuple[int, str, int, str]]:
    for i in range(n):
        yield (seed, split, i, folder)


def write_split(out: Path, split: str, n: int, seed: int, workers: int = 1, progress: bool = False) -> dict[str, Path]:
    """Write images, ``visdial_1.0_<split>.json`` and a COCO captions file for ``n`` dialogs."""
    folder = out / "images" / SPLIT_FOLDERS[split]
    folder.mkdir(parents=True, exist_ok=True)
    questions, answers = _Vocab(), _Vocab()
    scenes = [make_scene(seed, split, i) for i in range(n)]
    dialogs = [(s, dialog_for(s, seed)) for s in scenes]
    for _, turns in dialogs:
        for q, a in turns:
            questions(q)
            answers(a)
    n_ans = len(answers.items)
    visdial = out / f"visdial_1.0_{split}.json"
    with visdial.open("w", encoding="utf-8") as fh:
        fh.write(f'{{"version": "1.0", "split": "{split}", "data": {{"questions": ')
        fh.write(json.dumps(questions.items))
        fh.write(', "answers": ')
        fh.write(json.dumps(answers.items))
        fh.write(', "dialogs": [')
        for di, (scene, turns) in enumerate(dialogs):
            rng = np.random.default_rng([seed, scene.image_id, 11])
            rounds = []
            for q, a in turns:
                gt = answers.index[a]
                others = rng.choice(n_ans - 1, size=NUM_OPTIONS - 1, replace=n_ans - 1 < NUM_OPTIONS - 1)
                others = others + (others >= gt)  # never the ground truth itself
                gt_index = int(rng.integers(NUM_OPTIONS))
                opts = np.insert(others, gt_index, gt)
                rounds.append(
                    f'{{"question": {questions.index[q]}, "answer": {gt}, "gt_index": {gt_index}, '
                    f'"answer_options": [{",".join(map(str, opts.tolist()))}]}}'
                )
            fh.write(("," if di else "") + json.dumps({"image_id": scene.image_id, "caption": caption(scene)})[:-1])
            fh.write(', "dialog": [' + ",".join(rounds) + "]}")
        fh.write("]}}")
    coco = out / f"captions_{SPLIT_FOLDERS[split]}.json"
    coco.write_text(
        json.dumps(
            {
                "info": {"description": "multimodal-memory demo scenes", "version": "1.0"},
                "licenses": [],
                "images": [
                    {"id": s.image_id, "file_name": image_name(split, s.image_id), "width": s.width, "height": s.height}
                    for s in scenes
                ],
                "annotations": [
                    {"id": i + 1, "image_id": s.image_id, "caption": caption(s)} for i, s in enumerate(scenes)
                ],
            }
        )
    )
    jobs = _chunks(seed, split, n, str(folder))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            it = pool.map(_draw_and_save, jobs, chunksize=256)
            _consume(it, n, progress, f"images {split}")
    else:
        _consume(map(_draw_and_save, jobs), n, progress, f"images {split}")
    return {"visdial": visdial, "images": folder, "coco": coco}


def _consume(it: Iterator[None], n: int, progress: bool, desc: str) -> None:
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=n, desc=desc, unit="img")
    for _ in it:
        pass


def write_demo(out: Path, dialogs: int, seed: int = 0, val_dialogs: int | None = None, workers: int = 1,
               progress: bool = False) -> dict[str, dict[str, Path]]:
    """The demo dataset: ``dialogs`` train dialogs and ``val_dialogs`` (default a fifth) val ones."""
    val_n = max(1, dialogs // 5) if val_dialogs is None else val_dialogs
    result = {"train": write_split(out, "train", dialogs, seed, workers, progress)}
    if val_n:
        result["val"] = write_split(out, "val", val_n, seed, workers, progress)
    return result
