"""Batch-first attention for ImageBind's vision and text trunks: the same weights and the same
math, without the layout copies.

ImageBind runs its trunks sequence-first (``b l d -> l b d`` before the blocks, back after) through
``nn.MultiheadAttention``, whose non-batch-first path reshapes q/k/v and the output between
layouts: copies that cost more device time than attention itself (``aten::copy_`` in
``benchmarks/embed_profile.py``). Here the two rearranges become
identities and each attention module computes q/k/v with its own ``in_proj`` weights straight in
``(batch, heads, tokens, head_dim)`` for ``scaled_dot_product_attention``. Trunks with learned
key/value biases (audio, depth, thermal, IMU) are left as they are; the embed stage uses neither.
The text trunk's mask is ImageBind's additive causal mask; it is recognised once, when the trunk is
rewritten, and attention then runs with ``is_causal=True``: the flash kernel skips the masked half
instead of reading a mask.

The text tower is also made length-aware (:class:`ShortTextPreprocessor`): a batch of token ids
may be cut to fewer than 77 positions. Attention is causal and the head reads the end-of-text
position, so the positions after a batch's longest text change no result; only the positional
embedding (and the mask) must be cut to the batch's width. Turn texts are ~15 tokens, so a
77-token batch is mostly padding. ``tests/test_embed.py`` checks the outputs equal the original
module's, full width and cut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PATCHED_MODALITIES = ("vision", "text")


class BatchFirstAttention(nn.Module):
    """``nn.MultiheadAttention(x, x, x, need_weights=False)`` on ``(batch, tokens, dim)`` inputs,
    sharing the wrapped module's parameters (a checkpoint loads into either). ``causal``: the trunk's
    only mask is the causal one, so the mask passed in is replaced by ``is_causal=True``."""

    def __init__(self, mha: nn.MultiheadAttention, causal: bool = False) -> None:
        super().__init__()
        if mha.bias_k is not None or not mha._qkv_same_embed_dim:
            raise ValueError("only self-attention without key/value biases can be made batch-first")
        self.mha = mha
        self.causal = causal

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.mha.num_heads
        qkv = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).view(b, n, 3, h, d // h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = attn_mask
            if mask is not None and mask.is_floating_point():
                mask = mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.mha.out_proj(out.transpose(1, 2).reshape(b, n, d))


def _only_mask_is_causal(model: nn.Module, modality: str) -> bool:
    """True when the modality's preprocessor hands its trunk exactly the causal mask (text)."""
    pre = model.modality_preprocessors[modality]
    mask = getattr(pre, "mask", None) if getattr(pre, "causal_masking", False) else None
    if mask is None:
        return False
    n = mask.shape[-1]
    causal = torch.full((n, n), float("-inf"), device=mask.device).triu_(1)
    return mask.shape == (n, n) and torch.equal(mask.float(), causal)


class ShortTextPreprocessor(nn.Module):
    """ImageBind's ``TextPreprocessor`` for token ids of any width up to its context length: the
    positional embedding and causal mask are cut to the input's width (the wrapped module's own
    parameters, so a checkpoint loads into either)."""

    def __init__(self, pre: nn.Module) -> None:
        super().__init__()
        if pre.num_cls_tokens or not pre.causal_masking or not pre.supply_seq_len_to_head:
            raise ValueError("only a causal text preprocessor without CLS tokens can take short inputs")
        self.pre = pre

    def forward(self, text: torch.Tensor) -> dict:
        width = text.shape[1]
        if width > self.pre.context_length:
            raise ValueError(f"{width} token positions: the model reads at most {self.pre.context_length}")
        tokens = self.pre.token_embedding(text) + self.pre.pos_embed[:, :width]
        return {"trunk": {"tokens": tokens, "attn_mask": self.pre.mask[:width, :width]},
                "head": {"seq_len": text.argmax(dim=-1)}}  # the end-of-text token is the highest id


def make_batch_first(model: nn.Module) -> nn.Module:
    """Rewrite the vision and text trunks of an ``ImageBindModel`` in place (and let the text
    tower take batches narrower than 77 tokens); returns it."""
    for modality in PATCHED_MODALITIES:
        causal = _only_mask_is_causal(model, modality)
        trunk = model.modality_trunks[modality]
        pre = trunk.pre_transformer_layer
        if isinstance(pre, nn.Sequential) and type(pre[-1]).__name__ == "EinOpsRearrange":
            pre[-1] = nn.Identity()
        if type(trunk.post_transformer_layer).__name__ == "EinOpsRearrange":
            trunk.post_transformer_layer = nn.Identity()
        for block in trunk.blocks:
            if isinstance(block.attn, nn.MultiheadAttention):
                block.attn = BatchFirstAttention(block.attn, causal=causal)
    text = model.modality_preprocessors["text"]
    if not isinstance(text, ShortTextPreprocessor):
        model.modality_preprocessors["text"] = ShortTextPreprocessor(text)
    return model
