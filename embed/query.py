"""Search: the images and texts nearest to a text or an image, with their dialog context, compared
only with vectors made by the model the config names."""

from __future__ import annotations

from pathlib import Path

from embed.plan import OUTPUT, ModelArgs
from schemas.embed import EmbedConfig, normalise_text
from storage.lance import connect, read, sql_literal, table_exists


def query(config: EmbedConfig, *, text: str | None = None, image: Path | None = None, k: int = 10,
          turns_per_hit: int = 3) -> dict:
    """The ``k`` images and ``k`` texts nearest to a text or an image, with their dialog context.

    The query is embedded by the model the config names, and compared only with vectors that
    model made (a clear error if the tables hold none).
    """
    from PIL import Image

    from storage.index import image_context, search, text_context

    if (text is None) == (image is None):
        raise ValueError("give exactly one of a text or an image")
    db = connect(config.lance_uri)
    embedder = ModelArgs.from_config(config).load()
    if text is not None:
        vector = embedder.embed_texts([normalise_text(text)])[0]
    else:
        with Image.open(image) as im:
            vector = embedder.embed_images([im])[0]
    where = f"model = {sql_literal(embedder.fingerprint)}"
    for name in OUTPUT.values():
        if not table_exists(db, name) or read(db, name, columns=["model"], where=where).num_rows == 0:
            raise LookupError(f"{name} holds no vectors made by {embedder.fingerprint}: run `mmem embed` "
                              "with the same --checkpoint/--tiny first")
    images = search(db, OUTPUT["image"], vector, k, where=where, columns=["image_id"])
    texts = search(db, OUTPUT["text"], vector, k, where=where, columns=["text_hash", "text"])
    return {
        "model": embedder.fingerprint,
        "query": {"text": text} if text is not None else {"image": str(image)},
        "images": image_context(db, images),
        "texts": text_context(db, texts, turns_per_hit),
    }
