"""The demo dataset: procedural scenes with VisDial v1.0 dialogs that are true about them.

Everything is a pure function of ``(seed, index)``, so a dialog does not depend on how many
others are generated, on their order, or on how many processes draw the images. The same code
writes a 20-dialog test fixture and a VisDial-train-sized benchmark set (82,783 images).

``photos=True`` gives the real data's cost shape instead of the demo's truth about its images
(DESIGN.md, "Cost shape"): flat-colour scenes decode many times faster than photos and a few
hundred question templates collapse to few distinct texts, so a benchmark on them flatters the
embed stage. Photo-like JPEGs have a 1/f spectrum (natural images' statistics), smooth shapes,
fine texture and sensor noise, COCO sizes and file sizes; dialogs are drawn from word lists with
the real set's diversity (most turns a text of their own), not from the picture.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from schemas.ingest import NUM_OPTIONS, NUM_TURNS

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "light blue": (170, 200, 230), "beige": (225, 210, 180),
               "dark green": (30, 80, 50)}
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
    qa.append(("how many shapes are there",
               f"{NUMBERS[n]}" if rng.random() < 0.5 else f"there are {n}" if n > 1 else "just one"))
    qa.append(("what color is the background",
               scene.background if rng.random() < 0.5 else f"it is {scene.background}"))
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
        qa.append((f"is there anything {color}",
                   f"yes, {NUMBERS[k]} {color} {_plural('shape', k)}" if k else "no"))
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


# --- photo-like data (``photos=True``): the real set's cost, not its meaning --------------------

NOISE_BANK = 1024  # side of the per-process sensor-noise bank that images take random windows of
# Baseline-vs-progressive: photos carry more entropy per pixel than a procedural image of the same
# size; progressive scans bring the generated files' decode cost per image to a COCO photo's.
PHOTO_JPEG = {"quality": 92, "subsampling": 2, "progressive": True}
# COCO's own photos are baseline JPEGs, which nvJPEG's hardware engines decode (progressive ones they
# refuse); ``baseline_jpeg=True`` writes them so, for measuring that path (PIL decodes them ~2.6x faster)


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Luminance grain (shared by the channels) plus per-channel sensor noise, drawn once per process."""
    rng = np.random.default_rng(20261207)
    side = (NOISE_BANK, NOISE_BANK)
    grain = rng.standard_normal((*side, 1), dtype=np.float32) * 11
    return grain + rng.standard_normal((*side, 3), dtype=np.float32) * 5


# luminance + two opponent colour axes, then scaled: a natural image's colours vary mostly in brightness
_COLOUR_MIX = (np.array([[1, 0.25, 0.1], [1, -0.15, 0.2], [1, 0.05, -0.3]], np.float32)
               * np.float32([38, 14, 14]))


def draw_photo(scene: Scene, seed: int) -> Image.Image:
    """A photo-like image of the scene's size: 1/f colour field + smooth shapes (at half size,
    upsampled: soft edges) + grain and sensor noise at full size. A function of ``(seed, image_id)``."""
    rng = np.random.default_rng([seed, scene.image_id, 5])
    w, h = scene.width, scene.height
    sw, sh = w // 2, h // 2
    f = np.hypot(np.fft.fftfreq(sh)[:, None], np.fft.rfftfreq(sw)[None, :])
    f[0, 0] = 1.0
    spectrum = np.exp(2j * np.pi * rng.random((3, sh, sw // 2 + 1))) / f  # amplitude 1/f, random phase
    field = np.fft.irfft2(spectrum, s=(sh, sw)).astype(np.float32)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-6
    low = np.einsum("ck,kyx->yxc", _COLOUR_MIX, field) + rng.uniform(70, 180, 3).astype(np.float32)
    img = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-sw // 4, sw)), int(rng.integers(-sh // 4, sh))
        box = [x0, y0, x0 + int(rng.integers(15, sw // 2)), y0 + int(rng.integers(15, sh // 2))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    a = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)
    oy, ox = int(rng.integers(0, NOISE_BANK - h + 1)), int(rng.integers(0, NOISE_BANK - w + 1))
    a = a + _noise_bank()[oy : oy + h, ox : ox + w]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Word lists for VisDial-like turns. Questions average ~5 words and answers ~3, as in VisDial.
NOUNS = _words("""
man woman boy girl child person people dog cat horse cow sheep bird elephant giraffe zebra bear car bus
truck train bike motorcycle plane boat kite umbrella bench table chair couch bed tv laptop phone book
clock vase bowl cup bottle plate pizza sandwich cake banana apple orange broccoli carrot donut sign
light pole fence tree grass road street sidewalk building window door wall floor ceiling sky cloud water
ocean beach sand snow mountain hill field river lake bridge tower roof shirt hat jacket helmet glasses
shoes bag backpack ball racket bat glove skateboard surfboard skis frisbee toilet sink mirror towel
counter oven fridge stove kitchen room picture lamp curtain rug pillow blanket shelf box basket flower
plant tent flag wheel seat desk keyboard mouse screen remote cord fork knife spoon napkin tray menu
bread meat cheese egg salad rice soup pot pan cone tire track platform station crowd player team goal
net court""")
ADJECTIVES = _words("""
big small large tiny tall short old young new clean dirty wet dry open closed empty full bright dark
sunny cloudy shiny wooden metal plastic striped spotted busy quiet modern fancy plain round square long
thick thin soft heavy light happy smiling standing sitting walking running parked moving broken visible""")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "gray", "orange", "pink", "purple",
           "silver", "tan", "beige", "navy", "dark blue", "light green", "gold")
PLACES = ("on the left", "on the right", "in the background", "in the middle", "near the front", "behind it",
          "next to the table", "at the top", "at the bottom", "in the corner", "by the window", "outside")
VERBS = ("holding", "wearing", "eating", "riding", "carrying", "watching", "playing", "using", "pushing",
         "pulling", "reading", "throwing", "catching", "drinking", "cutting", "touching", "sitting on",
         "standing by", "looking at", "walking toward")
COUNTS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "a few", "several", "many", "lots",
          "about 5", "maybe 3", "more than 10", "just 1", "only 2", "zero", "one", "two", "three", "four",
          "five")
Q_TEMPLATES = (
    "is the {n} {a}", "what color is the {n}", "how many {n}s are there", "is there a {n} {p}",
    "is the {n} {v} a {n2}", "what is the {n} {v}", "can you see any {n}s", "is the {n} {c}",
    "does the {n} look {a}", "are there any {n}s {p}", "what color is the {n2} {p}",
    "is the {n} near the {n2}",
    "what kind of {n} is it", "is anyone {v} a {n}", "is the {n} in the {n2}", "how big is the {n}",
    "do you see a {n2}", "is it a {a} {n}", "what is on the {n}", "is there more than one {n}",
)
A_TEMPLATES = (
    "yes", "no", "yes it is", "no it isn't", "i think so", "not that i can see", "{c}", "it is {c}",
    "{k}", "i see {k}", "yes {k}", "{c} and {c2}", "yes it's {a}", "no it's {a}", "looks {a} to me",
    "it's a {n}", "a {a} {n}", "yes {p}", "no {p}", "maybe a {n}", "i can't tell", "can't see it",
    "yes, {v} a {n}", "{a} and {a2}", "there is a {n} {p}", "the {n} is {c}",
)
COMMON_QA = (("is it sunny", "yes"), ("is it sunny", "no"), ("is this in color", "yes"), ("any people", "no"),
             ("is it daytime", "yes"), ("is it indoors", "no"), ("is it outside", "yes"),
             ("any animals", "no"), ("can you see the sky", "yes"), ("can you see the sky", "no"),
             ("is it a close up", "no"), ("is this a photo", "yes"), ("any other people", "no"),
             ("is it raining", "no"))


def _fill(template: str, rng: np.random.Generator) -> str:
    def pick(words: tuple[str, ...]) -> str:
        return words[int(rng.integers(len(words)))]

    return template.format(n=pick(NOUNS), n2=pick(NOUNS), a=pick(ADJECTIVES), a2=pick(ADJECTIVES),
                           c=pick(COLOURS), c2=pick(COLOURS), p=pick(PLACES), v=pick(VERBS), k=pick(COUNTS))


def photo_dialog(scene: Scene, seed: int) -> list[tuple[str, str]]:
    """Ten VisDial-like turns from the word lists; a quarter are the common yes/no exchanges
    (real dialogs repeat those), the rest almost all distinct texts."""
    rng = np.random.default_rng([seed, scene.image_id, 13])
    turns = []
    for _ in range(NUM_TURNS):
        if rng.random() < 0.25:
            turns.append(COMMON_QA[int(rng.integers(len(COMMON_QA)))])
        else:
            turns.append((_fill(Q_TEMPLATES[int(rng.integers(len(Q_TEMPLATES)))], rng),
                          _fill(A_TEMPLATES[int(rng.integers(len(A_TEMPLATES)))], rng)))
    return turns


def photo_caption(scene: Scene, seed: int) -> str:
    rng = np.random.default_rng([seed, scene.image_id, 17])
    return _fill("a {a} {n} {v} a {n2} {p}", rng)


def _draw_and_save(args: tuple[int, str, int, str, bool, bool]) -> None:
    seed, split, index, folder, photos, baseline = args
    scene = make_scene(seed, split, index)
    path = os.path.join(folder, image_name(split, scene.image_id))
    if photos:
        draw_photo(scene, seed).save(path, "JPEG", **(PHOTO_JPEG | {"progressive": not baseline}))
    else:
        draw(scene).save(path, "JPEG", quality=85)


def _chunks(seed: int, split: str, n: int, folder: str, photos: bool,
            baseline: bool) -> Iterator[tuple[int, str, int, str, bool, bool]]:
    for i in range(n):
        yield (seed, split, i, folder, photos, baseline)


def write_split(out: Path, split: str, n: int, seed: int, workers: int = 1, progress: bool = False,
                photos: bool = False, baseline_jpeg: bool = False) -> dict[str, Path]:
    """Write images, ``visdial_1.0_<split>.json`` and a COCO captions file for ``n`` dialogs
    (``photos``: photo-like images and diverse dialogs, the real data's cost shape; progressive
    JPEGs unless ``baseline_jpeg``)."""
    folder = out / "images" / SPLIT_FOLDERS[split]
    folder.mkdir(parents=True, exist_ok=True)
    questions, answers = _Vocab(), _Vocab()
    scenes = [make_scene(seed, split, i) for i in range(n)]
    dialogs = [(s, photo_dialog(s, seed) if photos else dialog_for(s, seed)) for s in scenes]
    captions = [photo_caption(s, seed) if photos else caption(s) for s in scenes]
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
            head = json.dumps({"image_id": scene.image_id, "caption": captions[di]})[:-1]  # without its "}"
            fh.write(("," if di else "") + head)
            fh.write(', "dialog": [' + ",".join(rounds) + "]}")
        fh.write("]}}")
    coco = out / f"captions_{SPLIT_FOLDERS[split]}.json"
    coco.write_text(
        json.dumps(
            {
                "info": {"description": "multimodal-memory demo " + ("photos" if photos else "scenes"),
                         "version": "1.0"},
                "licenses": [],
                "images": [
                    {"id": s.image_id, "file_name": image_name(split, s.image_id), "width": s.width,
                     "height": s.height}
                    for s in scenes
                ],
                "annotations": [
                    {"id": i + 1, "image_id": s.image_id, "caption": captions[i]}
                    for i, s in enumerate(scenes)
                ],
            }
        )
    )
    jobs = _chunks(seed, split, n, str(folder), photos, baseline_jpeg)
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
               progress: bool = False, photos: bool = False) -> dict[str, dict[str, Path]]:
    """The demo dataset: ``dialogs`` train dialogs and ``val_dialogs`` (default a fifth) val ones."""
    val_n = max(1, dialogs // 5) if val_dialogs is None else val_dialogs
    result = {"train": write_split(out, "train", dialogs, seed, workers, progress, photos)}
    if val_n:
        result["val"] = write_split(out, "val", val_n, seed, workers, progress, photos)
    return result
