"""The embed stage on the demo data with the tiny real ImageBind: preprocessing pinned against
ImageBind's own transforms, checkpoint errors, the flow (write, re-run, resume, model change,
quarantine), the vector index and ``mmem query``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image
from prefect import flow
from typer.testing import CliRunner

from embed.model import load_embedder
from embed.preprocess import load_pixels, normalise_pixels, tokenize
from embed.weights import CheckpointError, build_random, model_fingerprint
from schemas.embed import EmbedConfig, normalise_text, text_hash, turn_text
from storage.lance import connect, merge, open_table, read


def roots(demo_dir: Path) -> dict[str, Path]:
    return {"train": demo_dir / "images" / "train2014", "val": demo_dir / "images" / "val2014"}


def config(root: Path, demo_dir: Path, **kw) -> EmbedConfig:
    """Images are found under the root ingest stored with each row unless ``image_roots`` says otherwise."""
    values = {"data_root": root, "tiny": True, "device": "cpu", "shard_rows": 16, "decode_workers": 1,
              "index_min_rows": 20}
    return EmbedConfig(**{**values, **kw})


def some_images(demo_dir: Path, tmp_path: Path) -> list[Path]:
    """Three demo JPEGs plus the odd cases: greyscale, RGBA PNG, palette, smaller than 224, tall."""
    jpgs = sorted((demo_dir / "images" / "train2014").glob("*.jpg"))[:3]
    rng = np.random.default_rng(0)
    odd = {
        "grey.png": Image.fromarray(rng.integers(0, 255, (300, 500), dtype=np.uint8), "L"),
        "rgba.png": Image.fromarray(rng.integers(0, 255, (250, 260, 4), dtype=np.uint8), "RGBA"),
        "palette.png": Image.fromarray(rng.integers(0, 255, (400, 300, 3), dtype=np.uint8)).convert("P"),
        "small.jpg": Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)),
        "tall.jpg": Image.fromarray(rng.integers(0, 255, (900, 231, 3), dtype=np.uint8)),
    }
    for name, im in odd.items():
        im.save(tmp_path / name)
    return jpgs + [tmp_path / n for n in odd]


# --- preprocessing and the model -------------------------------------------------------------


def test_preprocessing_is_imagebinds(demo_dir, tmp_path):
    from embed.compat import import_imagebind

    ib = import_imagebind()
    paths = some_images(demo_dir, tmp_path)
    theirs = ib.data.load_and_transform_vision_data([str(p) for p in paths], "cpu")
    ours = normalise_pixels(torch.from_numpy(np.stack([load_pixels(p) for p in paths])))
    assert ours.shape == theirs.shape == (len(paths), 3, 224, 224)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    # the last is longer than 77 tokens: truncated, end token kept
    texts = ["Q: is it red? A: yes", "a drawing of a white circle on a gray background", "",
             "Ünïcödé &amp; html", " ".join(["word"] * 200)]
    assert np.array_equal(tokenize(texts), ib.data.load_and_transform_text(texts, "cpu").numpy())


def test_tiny_model_is_imagebind_shrunk_deterministic_and_normalised(demo_dir, tmp_path):
    from imagebind.models.imagebind_model import ImageBindModel

    a, b = load_embedder(tiny=True), load_embedder(tiny=True)
    assert isinstance(a.model, ImageBindModel)
    assert set(a.model.modality_trunks) == {"vision", "text", "audio", "depth", "thermal", "imu"}
    assert sum(p.numel() for p in a.model.parameters()) < 5_000_000  # every tower shrunk, not only two
    assert a.fingerprint == b.fingerprint == model_fingerprint(tiny=True)
    assert load_embedder(tiny=True, seed=1).fingerprint != a.fingerprint

    texts = ["Q: is it red? A: yes", "Q: is it blue? A: no"]
    images = [Image.open(p) for p in some_images(demo_dir, tmp_path)]
    for out in (a.embed_texts(texts), a.embed_images(images)):
        assert out.dtype == np.float32 and out.shape[1] == 1024
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a.embed_texts(texts), b.embed_texts(texts))
    assert not np.allclose(a.embed_texts(texts)[0], a.embed_texts(texts)[1])
    assert a.embed_texts([]).shape == (0, 1024)


@torch.inference_mode()
def test_batch_first_attention_computes_what_imagebinds_own_does(demo_dir, tmp_path):
    from embed.attention import BatchFirstAttention, make_batch_first

    original = build_random("imagebind_tiny", seed=3)
    patched = make_batch_first(build_random("imagebind_tiny", seed=3))
    for modality in ("vision", "text"):
        assert all(isinstance(b.attn, BatchFirstAttention) for b in patched.modality_trunks[modality].blocks)
    # audio has key/value biases: left as it is
    assert not isinstance(patched.modality_trunks["audio"].blocks[0].attn, BatchFirstAttention)
    assert [patched.modality_trunks[m].blocks[0].attn.causal for m in ("vision", "text")] == [False, True]
    pixels = np.stack([load_pixels(p) for p in some_images(demo_dir, tmp_path)])
    tokens = tokenize(["Q: is it red? A: yes", "Q: how many? A: three dogs"])
    inputs = {"vision": normalise_pixels(torch.from_numpy(pixels)), "text": torch.from_numpy(tokens).long()}
    for modality, x in inputs.items():
        want, got = original.eval()({modality: x})[modality], patched.eval()({modality: x})[modality]
        assert not torch.allclose(want[0], want[1])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_length_bucketed_texts_equal_the_77_token_path():
    """Texts run shortest first, each batch cut to its longest text (a multiple of 8 positions): every
    vector equals ImageBind's own 77-token forward (fp32), whatever the lengths and the input order."""
    from embed.model import StreamStats
    from embed.preprocess import token_batches, token_widths
    from ingest.demo_data import make_scene, photo_dialog

    texts = [normalise_text(turn_text(q, a))
             for i in range(40) for q, a in photo_dialog(make_scene(0, "train", i), 0)]
    texts += ["", "a", "Q: ünïcödé café? A: ✓ sí",
              "Q: " + "a very long question about the scene " * 12 + "A: yes"]
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.permutation(len(texts))]
    tokens = tokenize(texts)
    widths = token_widths(tokens)
    assert widths.max() == 77 and np.median(widths) < 24  # one text cut at the context length; most short

    original = build_random("imagebind_tiny", seed=0).eval()
    want = original({"text": torch.from_numpy(tokens).long()})["text"]
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
    embedder = load_embedder(tiny=True, seed=0, batch_size=16)
    stats = StreamStats()
    got = embedder.embed_tokens(tokens, stats)
    cosine = (got * want).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    assert stats.samples == len(texts) == sum(stats.widths.values())
    assert all(w % 8 == 0 or w == 77 for w in stats.widths) and min(stats.widths) <= 24
    ran = sum(w * n for w, n in stats.widths.items())
    assert ran < 0.4 * 77 * len(texts)  # most of the 77-token padding is never run
    np.testing.assert_allclose(embedder.embed_texts(texts[:5]), got[:5], atol=1e-5)  # the query path too

    # unsorted input: still exact widths
    for batch in token_batches([tokens[:50], tokens[50:]], budget=16 * 77):
        assert batch.shape[1] >= token_widths(batch).max() and batch.size <= 16 * 77
    with pytest.raises(ValueError, match="at most 77"):
        embedder.model({"text": torch.zeros((1, 80), dtype=torch.long)})


def test_checkpoint_missing_or_mismatching_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_embedder(tmp_path / "imagebind_huge.pth")
    with pytest.raises(ValueError, match="checkpoint"):
        load_embedder()  # Huge without weights

    tiny = build_random("imagebind_tiny", seed=0).state_dict()
    torch.save(tiny, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="does not match imagebind_huge"):
        load_embedder(tmp_path / "tiny.pth")
    # the real loading path (weights_only, strict) on a file of the right architecture
    loaded = load_embedder(tmp_path / "tiny.pth", tiny=True)
    assert loaded.fingerprint == load_embedder(tiny=True).fingerprint
    np.testing.assert_array_equal(loaded.embed_texts(["a cat"]),
                                  load_embedder(tiny=True).embed_texts(["a cat"]))

    broken = dict(tiny)
    broken.pop("modality_heads.text.proj.1.weight")
    broken["modality_heads.vision.2.weight"] = torch.zeros(7, 7)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"1 missing .*1 with another shape"):
        load_embedder(tmp_path / "broken.pth", tiny=True)

    torch.save({"weights": tiny, "optimizer": object}, tmp_path / "pickled.pth")  # not weights-only loadable
    with pytest.raises(CheckpointError, match="weights-only"):
        load_embedder(tmp_path / "pickled.pth", tiny=True)


# --- the flow --------------------------------------------------------------------------------


def versions(root: Path) -> dict[str, int]:
    db = connect(root / "lance")
    return {n: open_table(db, n).version for n in ("image_embeddings", "text_embeddings", "quarantine")}


def test_flow_embeds_every_image_and_distinct_text_once_and_reruns_nothing(data_root, demo_dir):
    from flows.embed import embed_flow

    cfg = config(data_root, demo_dir, decode_workers=2)  # the decoding process pool too
    out = embed_flow(cfg)
    db = connect(cfg.lance_uri)
    images, turns, dialogs = read(db, "images"), read(db, "turns"), read(db, "dialogs")
    img, txt = read(db, "image_embeddings"), read(db, "text_embeddings")

    assert sorted(img.column("image_id").to_pylist()) == sorted(images.column("image_id").to_pylist())
    wanted = set(turns.column("text_hash").to_pylist()) | set(dialogs.column("caption_hash").to_pylist())
    assert len(wanted) < len(turns) + len(dialogs)  # the demo repeats texts: deduplication matters
    assert txt.num_rows == len(set(txt.column("text_hash").to_pylist())) == len(wanted)
    assert set(txt.column("text_hash").to_pylist()) == wanted
    assert out.images == images.num_rows and out.texts == len(wanted)
    assert out.shards_computed == out.shards > 2 and out.quarantined == 0
    assert sum(out.text_widths.values()) == len(wanted) and max(out.text_widths) < 77  # narrow batches

    embedder = load_embedder(tiny=True)
    for tbl in (img, txt):
        vec = np.stack(tbl.column("vector").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
        assert set(tbl.column("model").to_pylist()) == {embedder.fingerprint}
    # a stored vector is what the embedder gives for that turn's text / that image file
    first = turns.slice(0, 1).to_pylist()[0]
    row = txt.filter(pc.equal(txt.column("text_hash"), first["text_hash"])).to_pylist()[0]
    assert row["text"] == normalise_text(turn_text(first["question"], first["answer"]))
    assert text_hash(row["text"]) == first["text_hash"]
    np.testing.assert_allclose(row["vector"], embedder.embed_texts([row["text"]])[0], atol=1e-5)
    pic = images.slice(0, 1).to_pylist()[0]
    stored = img.filter(pc.equal(img.column("image_id"), pic["image_id"])).column("vector")[0].as_py()
    with Image.open(roots(demo_dir)[pic["split"]] / pic["path"]) as im:
        np.testing.assert_allclose(stored, embedder.embed_images([im])[0], atol=1e-5)
    assert out.index == {"image_embeddings": "created", "text_embeddings": "created"}
    # the texts end first (spread through the first half of the images) and their table is indexed
    # while the last images run: the run's text version carries the index, built before the tail
    assert out.stream_done_seconds["text"] < out.stream_done_seconds["image"]
    text_tbl = connect(cfg.lance_uri).open_table("text_embeddings")
    text_ds = text_tbl.to_lance()
    assert text_ds.checkout_version(out.versions["text_embeddings"]).describe_indices()
    tagged = [t["version"] for name, t in text_tbl.tags.list().items() if name.startswith("embed-")]
    assert len(tagged) == 1 and text_ds.checkout_version(tagged[0]).describe_indices()

    before = versions(data_root)
    again = embed_flow(cfg)
    assert again.shards_up_to_date == again.shards
    assert again.shards_computed == again.shards_cached == 0
    assert versions(data_root) == before  # nothing appended, nothing rewritten


def test_late_index_builds_every_index_after_the_run_version(data_root, demo_dir):
    """``early_index=False``: no table is indexed while shards run, so the version the run tags holds
    no index; the index comes with the flow's last step, and is there at the end."""
    from flows.embed import embed_flow

    out = embed_flow(config(data_root, demo_dir, early_index=False))
    assert out.index == {"image_embeddings": "created", "text_embeddings": "created"}
    tbl = connect(data_root / "lance").open_table("text_embeddings")
    tagged = [t["version"] for name, t in tbl.tags.list().items() if name.startswith("embed-")]
    assert len(tagged) == 1
    ds = tbl.to_lance()
    assert not ds.checkout_version(tagged[0]).describe_indices()  # the run's rows, not yet indexed
    assert ds.checkout_version(out.versions["text_embeddings"]).describe_indices()
    assert out.versions["text_embeddings"] > tagged[0]


def test_killed_run_resumes_from_cached_shards_and_model_change_recomputes(data_root, demo_dir):
    from embed.plan import ModelArgs, image_items, plan_shards
    from flows.embed import embed_flow
    from tasks.embed import embed_shard_task, results_storage

    cfg = config(data_root, demo_dir, shard_rows=8)

    @flow
    def killed_after_three_shards(cfg: EmbedConfig) -> None:
        """What a run leaves when it dies after three shards finished and before anything merged."""
        model = ModelArgs.from_config(cfg)
        items = image_items(connect(cfg.lance_uri), cfg)
        shards = plan_shards("image", items, cfg.shard_rows, model.fingerprint)
        task = embed_shard_task.with_options(result_storage=results_storage(cfg))
        for s in shards[:3]:
            task(s, model, str(cfg.rows_dir), 1)

    killed_after_three_shards(cfg)
    # a cached result whose rows file changed since (or is gone) is computed again, not merged
    rows_files = sorted(cfg.rows_dir.glob("*.arrow"))
    assert len(rows_files) == 3
    data = bytearray(rows_files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    rows_files[0].write_bytes(bytes(data))
    rows_files[1].unlink()
    out = embed_flow(cfg)
    assert out.shards_cached == 1 and out.shards_computed == out.shards - 1
    assert out.image_embeddings_inserted == read(connect(cfg.lance_uri), "images").num_rows

    # another model: every shard again, rows replaced
    changed = embed_flow(cfg.model_copy(update={"seed": 1}))
    assert changed.shards_computed == changed.shards and changed.shards_cached == 0
    assert changed.image_embeddings_updated == out.image_embeddings_inserted
    assert changed.text_embeddings_updated == out.text_embeddings_inserted
    img = read(connect(cfg.lance_uri), "image_embeddings")
    assert set(img.column("model").to_pylist()) == {model_fingerprint(tiny=True, seed=1)}
    assert img.num_rows == out.image_embeddings_inserted


def test_images_that_fail_to_decode_are_quarantined(data_root, demo_dir, tmp_path):
    from flows.embed import embed_flow

    folders = {split: tmp_path / split for split in ("train", "val")}
    for split, src in roots(demo_dir).items():
        shutil.copytree(src, folders[split])
    jpgs = sorted(folders["train"].glob("*.jpg"))
    jpgs[0].write_bytes(jpgs[0].read_bytes()[:200])  # truncated
    jpgs[1].unlink()
    cfg = config(data_root, demo_dir, image_roots=folders)
    out = embed_flow(cfg)
    assert out.quarantined == 2
    assert out.quarantined_image_unreadable == 1 and out.quarantined_image_missing == 1

    db = connect(cfg.lance_uri)
    q = read(db, "quarantine", where="stage = 'embed'")
    images = read(db, "images")
    bad = images.filter(pc.is_in(images.column("path"), pa.array([jpgs[0].name, jpgs[1].name])))
    bad = bad.column("image_id")
    assert sorted(q.column("key").to_pylist()) == sorted(str(i) for i in bad.to_pylist())
    assert sorted(q.column("reason").to_pylist()) == ["image_missing", "image_unreadable"]
    embedded = set(read(db, "image_embeddings").column("image_id").to_pylist())
    assert embedded == set(images.column("image_id").to_pylist()) - set(bad.to_pylist())

    embed_flow(cfg)  # re-run: the same two rejections, not two more rows
    assert read(db, "quarantine", where="stage = 'embed'").num_rows == 2


def test_query_finds_the_image_and_the_turn_with_context(data_root, demo_dir, monkeypatch):
    from cli.main import app
    from embed.query import query
    from flows.embed import embed_flow

    cfg = config(data_root, demo_dir)
    embed_flow(cfg)
    db = connect(cfg.lance_uri)
    turn = read(db, "turns").slice(3, 1).to_pylist()[0]
    text = turn_text(turn["question"], turn["answer"])
    hits = query(cfg, text=text, k=3)
    top = hits["texts"][0]
    assert top["text_hash"] == turn["text_hash"] and top["distance"] < 1e-4
    assert top["turn_count"] >= 1 and len(hits["images"]) == 3 and len(hits["texts"]) == 3
    assert all(t["question"] == turn["question"] and t["caption"] for t in top["turns"])

    pic = read(db, "images").slice(5, 1).to_pylist()[0]
    caption = read(db, "dialogs", where=f"image_id = {pic['image_id']}").column("caption")[0].as_py()
    path = roots(demo_dir)[pic["split"]] / pic["path"]
    monkeypatch.setenv("MMEM_EMBED_IMAGE_ROOTS", "{}")
    res = CliRunner().invoke(app, ["--data-root", str(data_root), "query", "--image", str(path), "-k", "2",
                                   "--tiny", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    found = json.loads(res.output)["images"][0]
    assert found["image_id"] == pic["image_id"] and found["distance"] < 1e-4
    assert found["caption"] == caption and [t["turn"] for t in found["turns"]] == list(range(1, 11))

    with pytest.raises(LookupError, match="no vectors made by"):
        query(cfg.model_copy(update={"seed": 1}), text="x")
    res = CliRunner().invoke(app, ["--data-root", str(data_root), "embed",
                                   "--checkpoint", str(data_root / "no.pth")])
    assert res.exit_code == 1 and "never downloaded" in res.output


# --- the vector index ------------------------------------------------------------------------


# accelerator: the partitions trained by torch k-means (a GPU on the embed device; the CPU here)
@pytest.mark.parametrize("accelerator", [None, "cpu"])
def test_vector_index_is_built_when_large_enough_and_finds_neighbours(tmp_path, accelerator):
    from storage.index import ensure_vector_index, partitions_for, search

    db = connect(tmp_path / "lance")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 1024))
    vec = (centres[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 1024))).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)

    def rows(lo, hi):
        return pa.table({"image_id": np.arange(lo, hi), "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(vec[lo:hi].ravel()), 1024), "model": ["m"] * (hi - lo), "preprocess": ["p"] * (hi - lo),
            "image_sha256": ["s"] * (hi - lo)})

    merge(db, "image_embeddings", rows(0, 500))
    assert ensure_vector_index(db, "image_embeddings", min_rows=1000,
                               accelerator=accelerator).action == "none"
    merge(db, "image_embeddings", rows(500, 2800))
    assert ensure_vector_index(db, "image_embeddings", min_rows=1000,
                               accelerator=accelerator).action == "created"

    def partitions():
        stats = open_table(db, "image_embeddings").to_lance().stats.index_stats("vector_idx")
        return [i["num_partitions"] for i in stats["indices"]]

    trained = partitions()
    merge(db, "image_embeddings", rows(2800, 3000))
    assert ensure_vector_index(db, "image_embeddings", min_rows=1000,
                               accelerator=accelerator).action == "updated"
    # new rows join the trained partitions (lance's default optimize re-partitions: 52 -> 1 here)
    assert partitions() == trained and trained == [partitions_for(2800)]

    recall = []
    for i in rng.integers(0, 3000, 20):
        got = search(db, "image_embeddings", vec[i], 10)
        exact = search(db, "image_embeddings", vec[i], 10, exact=True)
        assert got.column("image_id")[0].as_py() == i and got.column("_distance")[0].as_py() < 1e-3
        found, truth = set(got.column("image_id").to_pylist()), set(exact.column("image_id").to_pylist())
        recall.append(len(found & truth) / 10)
    assert np.mean(recall) >= 0.8


def test_text_shards_run_within_the_first_half_of_the_image_shards():
    from embed.plan import interleave

    order = interleave([f"i{n}" for n in range(10)], [f"t{n}" for n in range(30)])
    assert [x for x in order if x[0] == "i"] == [f"i{n}" for n in range(10)]  # each list in order
    assert [x for x in order if x[0] == "t"] == [f"t{n}" for n in range(30)]
    assert order.index("t29") < order.index("i5") and order.index("t0") < order.index("i1")
    assert interleave([], ["t0"]) == ["t0"] and interleave(["i0"], []) == ["i0"]
