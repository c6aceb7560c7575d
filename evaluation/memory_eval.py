"""The memory model under evaluation: its generated answers, and its option log-likelihoods.

The memory model (``training.memory_model``, loaded from its artifact folder with
``AutoModel.from_pretrained`` through ``load_memory_model``) answers from stored ImageBind vectors,
not from text, so it is not reached through a prompt: generation batches its samples through
``MemoryModel.generate``, and ranking scores each of the 100 options after the same prefix the
model was trained with, ``[soft prompt][question prompt]``, through :func:`option_logliks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from evaluation.ranking import option_logliks


def sample_keys(data) -> list[tuple[int, int]]:
    """(image_id, turn) of every sample of a ``MemoryData``, in its order."""
    dialog, turn = data.dialog.cpu().numpy(), data.turn.cpu().numpy()
    return [(int(data.image_ids[d]), int(t)) for d, t in zip(dialog, turn, strict=True)]


def memory_generate(model, data, *, indices: Sequence[int] | None = None, batch_size: int = 64,
                    max_new_tokens: int = 24, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers for the samples ``indices`` (default all) of ``data`` (a ``MemoryData`` on the
    model's device), in that order, ``batch_size`` at a time."""
    import torch

    order = torch.as_tensor(list(indices) if indices is not None else range(len(data)), dtype=torch.long)
    out: list[str] = []
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            out += model.generate(data.batch(idx), max_new_tokens=max_new_tokens)
            if progress is not None:
                progress(len(idx))
    return out


def memory_option_scores(model, data, options: Sequence[Sequence[str]], *, option_batch: int = 100,
                         progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, 100) summed log-likelihoods of each sample's options given its memory and question."""
    import torch

    width = max((len(o) for o in options), default=0)
    scores = np.full((len(data), width), -np.inf)
    embed = model.llm.get_input_embeddings()
    with torch.inference_mode():
        for i in range(len(data)):
            batch = data.batch(torch.tensor([i]))
            soft = model.soft_prompt(model.encode_memory(batch))
            prompt = batch.prompt_ids[:, : int(batch.prompt_len[0])]
            prefix = {"inputs_embeds": torch.cat([soft, embed(prompt)], dim=1)}
            scores[i, : len(options[i])] = option_logliks(model.llm, model.tokenizer, prefix, options[i],
                                                          option_batch)
            if progress is not None:
                progress(1)
    return scores
