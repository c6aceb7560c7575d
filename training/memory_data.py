"""The memory model's data: stored ImageBind vectors (Lance tables) -> tensors on the device.

A sample is (dialog, turn t): the dialog's image vector, its caption and turn vectors (the memory
positions before t) and turn t's question and answer as token ids. All samples of a split live
as device tensors, so a batch is a gather (no decoding, no workers); training never reads images.
A dialog missing any vector it needs is rejected whole, with a reason for the quarantine table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from schemas.embed import EMBED_DIM
from schemas.ingest import NUM_TURNS
from schemas.quarantine import Reason, Rejection

NUM_POSITIONS = NUM_TURNS + 1  # position 0 = the image (with its caption), 1..10 = the turns
MEMORY_INPUTS = ("turns", "dialogs", "image_embeddings", "text_embeddings")
INPUTS_HINT = "run `mmem ingest` and `mmem embed` first"


@dataclass
class MemoryBatch:
    """Tensors of one batch, on the model's device."""

    image: torch.Tensor  # (B, 1024)
    texts: torch.Tensor  # (B, 11, 1024): caption, turns 1..10
    memory_mask: torch.Tensor  # (B, 11) bool: positions < t
    prompt_ids: torch.Tensor  # (B, Lp) right-padded
    prompt_len: torch.Tensor  # (B,)
    answer_ids: torch.Tensor  # (B, La) right-padded, ends with eos
    answer_len: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, 1024): turn t's own embedding (retrieval target)
    group: torch.Tensor  # (B,) dialog index: same dialog = positive pair



@dataclass
class MemoryData:
    """All samples of one split as device tensors; a batch is a gather (no decoding, no workers)."""

    image_ids: np.ndarray  # (D,) dialog order
    image: torch.Tensor  # (D, 1024)
    texts: torch.Tensor  # (D, 11, 1024)
    dialog: torch.Tensor  # (N,) index into the dialog arrays
    turn: torch.Tensor  # (N,) 1..10
    prompt_ids: torch.Tensor  # (N, Lp)
    prompt_len: torch.Tensor
    answer_ids: torch.Tensor  # (N, La)
    answer_len: torch.Tensor
    answers: list[str]  # reference answers, for evaluation

    def __len__(self) -> int:
        return int(self.dialog.shape[0])

    def batch(self, idx: torch.Tensor) -> MemoryBatch:
        idx = idx.to(self.dialog.device)
        d, t = self.dialog[idx], self.turn[idx]
        pos = torch.arange(NUM_POSITIONS, device=idx.device)[None]
        lp, la = self.prompt_len[idx], self.answer_len[idx]
        return MemoryBatch(
            image=self.image[d], texts=self.texts[d], memory_mask=pos < t[:, None],
            prompt_ids=self.prompt_ids[idx, : int(lp.max())], prompt_len=lp,
            answer_ids=self.answer_ids[idx, : int(la.max())], answer_len=la,
            target=self.texts[d, t], group=d,
        )

    def to(self, device: torch.device) -> MemoryData:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return MemoryData(**moved)


@dataclass
class LoadedTurns:
    """What :func:`read_memory_inputs` found: the rows and the Lance versions they were read at."""

    turns: Any  # pyarrow.Table
    captions: dict[int, str]  # image_id -> caption_hash
    image_vectors: dict[int, np.ndarray]
    text_vectors: dict[str, np.ndarray]
    versions: dict[str, int]


def read_memory_inputs(lance_uri: str, splits: list[str], pins: dict[str, int | str]) -> LoadedTurns:
    """Turns of ``splits`` plus the embedding vectors they need, at pinned (or latest) versions."""
    import pyarrow.compute as pc

    from storage.lance import connect, read, resolve_versions, sql_in

    db = connect(lance_uri)
    versions = resolve_versions(db, MEMORY_INPUTS, pins, hint=INPUTS_HINT)
    turns = read(db, "turns", version=versions["turns"], where=sql_in("split", splits),
                 columns=["image_id", "turn", "split", "question", "answer", "text_hash"])
    turns = turns.sort_by([("image_id", "ascending"), ("turn", "ascending")])
    dialogs = read(db, "dialogs", version=versions["dialogs"], columns=["image_id", "caption_hash"])
    captions = dict(zip(dialogs.column("image_id").to_pylist(), dialogs.column("caption_hash").to_pylist(),
                        strict=True))
    ids = pc.unique(turns.column("image_id"))
    img = read(db, "image_embeddings", version=versions["image_embeddings"], columns=["image_id", "vector"])
    img = img.filter(pc.is_in(img.column("image_id"), value_set=ids))
    hashes = pa_unique_strings(
        turns.column("text_hash").to_pylist() + [captions.get(i) for i in ids.to_pylist()]
    )
    txt = read(db, "text_embeddings", version=versions["text_embeddings"], columns=["text_hash", "vector"])
    txt = txt.filter(pc.is_in(txt.column("text_hash"), value_set=hashes))
    return LoadedTurns(turns, captions, _vectors(img, "image_id"), _vectors(txt, "text_hash"), versions)


def pa_unique_strings(values: list[str | None]):
    import pyarrow as pa

    return pa.array(sorted({v for v in values if v is not None}), pa.string())


def _vectors(table: Any, key: str) -> dict:
    if len(table) == 0:
        return {}
    flat = table.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
    mat = flat.reshape(len(table), EMBED_DIM).astype(np.float32, copy=False)
    return dict(zip(table.column(key).to_pylist(), mat, strict=True))


def build_memory_data(
    loaded: LoadedTurns, split: str, tokenizer: Any, arch: Any, *, limit_dialogs: int | None = None,
    limit_samples: int | None = None, progress: Any = None,
) -> tuple[MemoryData, list[Rejection]]:
    """Samples (one per turn) of ``split``; a dialog missing any vector it needs is rejected whole."""
    t = loaded.turns.filter(loaded.turns.column("split").to_numpy(zero_copy_only=False) == split)
    image_ids = np.asarray(t.column("image_id").to_numpy())
    turn_no = np.asarray(t.column("turn").to_numpy()).astype(np.int64)
    hashes = t.column("text_hash").to_pylist()
    questions, answers = t.column("question").to_pylist(), t.column("answer").to_pylist()
    rejections: list[Rejection] = []
    dialog_rows: dict[int, list[int]] = {}
    for row, iid in enumerate(image_ids.tolist()):
        dialog_rows.setdefault(iid, []).append(row)
    kept: list[int] = []
    for iid, rows in dialog_rows.items():
        missing = []
        if iid not in loaded.image_vectors:
            missing.append("image")
        missing += [f"turn {turn_no[r]}" for r in rows if hashes[r] not in loaded.text_vectors]
        if missing:
            rejections.append(Rejection(str(iid), Reason.EMBEDDING_MISSING,
                                        {"image_id": iid, "split": split, "missing": missing},
                                        f"no stored embedding for {', '.join(missing)}"))
        else:
            kept.append(iid)
        if limit_dialogs is not None and len(kept) >= limit_dialogs:
            break
    zero = np.zeros(EMBED_DIM, np.float32)
    image = (
        np.stack([loaded.image_vectors[i] for i in kept]) if kept else np.zeros((0, EMBED_DIM), np.float32)
    )
    texts = np.zeros((len(kept), NUM_POSITIONS, EMBED_DIM), np.float32)
    sample_rows, sample_dialog = [], []
    for d, iid in enumerate(kept):
        texts[d, 0] = loaded.text_vectors.get(loaded.captions.get(iid), zero)
        for r in dialog_rows[iid]:
            texts[d, turn_no[r]] = loaded.text_vectors[hashes[r]]
            sample_rows.append(r)
            sample_dialog.append(d)
    if limit_samples is not None:
        sample_rows, sample_dialog = sample_rows[:limit_samples], sample_dialog[:limit_samples]
    prompts = [arch.prompt_template.format(question=questions[r]) for r in sample_rows]
    refs = [answers[r] for r in sample_rows]
    p_ids, p_len = tokenize(tokenizer, prompts, arch.max_prompt_tokens, special=True, progress=progress)
    a_ids, a_len = tokenize(tokenizer, [" " + a for a in refs], arch.max_answer_tokens, special=False,
                            eos=tokenizer.eos_token_id, progress=progress)
    data = MemoryData(
        image_ids=np.asarray(kept, dtype=np.int64),
        image=torch.from_numpy(image),
        texts=torch.from_numpy(texts),
        dialog=torch.tensor(sample_dialog, dtype=torch.long),
        turn=torch.from_numpy(turn_no[sample_rows]),
        prompt_ids=p_ids,
        prompt_len=p_len,
        answer_ids=a_ids,
        answer_len=a_len,
        answers=refs,
    )
    return data, rejections


def tokenize(tokenizer: Any, texts: list[str], max_len: int, *, special: bool, eos: int | None = None,
             progress: Any = None, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded id matrix and lengths; with ``eos``, every row ends with it (kept under truncation)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    room = max_len - (1 if eos is not None else 0)
    ids = torch.full((len(texts), max_len), pad, dtype=torch.long)
    lens = torch.zeros(len(texts), dtype=torch.long)
    for start in range(0, len(texts), chunk):
        enc = tokenizer(texts[start:start + chunk], add_special_tokens=special)["input_ids"]
        for i, row in enumerate(enc, start):
            row = row[:room] + ([eos] if eos is not None else [])
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            lens[i] = len(row)
        if progress is not None:
            progress(len(enc))
    return ids, lens
