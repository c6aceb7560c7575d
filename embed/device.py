"""The one device picker of the project: every stage that runs a model (embed, training, evaluation)
turns its ``device`` option into a ``torch.device`` here, so "auto" and a missing GPU mean the same
thing everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``device`` as a ``torch.device``.

    ``None`` or ``"auto"``: CUDA when torch sees a GPU, else the CPU. Any other name (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``) or a ``torch.device`` is taken as given, except that asking for CUDA
    on a machine where torch sees none raises ``RuntimeError`` at once, rather than failing later
    inside a model. Callers that want a string use ``str(resolve_device(...))``."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = torch.device(device)
    if out.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} was asked for but torch sees no CUDA device")
    return out
