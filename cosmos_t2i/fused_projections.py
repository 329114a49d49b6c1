"""One matmul for an attention layer's Q, K and V projections (self-attention) or K and V (cross-attention).

diffusers' CosmosAttnProcessor2_0 projects the same input three times with 2048x2048 weights (2B). One product with
the weights stacked ([Wq; Wk; Wv], 6144 rows) runs closer to the GPU's matmul peak, and its backward gives the
input's gradient as one product instead of three summed in bf16. The parameters stay as they are (`to_q.weight`
...): the stacking happens inside each call, where the compiler folds it into the bf16 cast the weights get anyway,
so checkpoints, EMA, FSDP and DDP see the same model. Same math up to rounding; BENCHMARKS.md has the gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0


def _stacked_projection(x: torch.Tensor, layers: list[torch.nn.Linear], chunks: int) -> tuple[torch.Tensor, ...]:
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).chunk(chunks, dim=-1)


class FusedProjectionsCosmosAttnProcessor:
    """CosmosAttnProcessor2_0 (diffusers 0.42) with its projections stacked; every other step is the stock one.

    The stock processor's "repeat_interleave for GQA" is left out: Cosmos-Predict2's Q, K and V have the same head
    size, where it copies K and V unchanged (`fuse_attention_projections` checks the sizes).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            query, key, value = _stacked_projection(hidden_states, [attn.to_q, attn.to_k, attn.to_v], 3)
        else:
            query = attn.to_q(hidden_states)
            key, value = _stacked_projection(encoder_hidden_states, [attn.to_k, attn.to_v], 2)

        query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)

        hidden_states = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def fuse_attention_projections(transformer) -> int:
    """Give every stock Cosmos attention layer of plain Linear projections the stacked processor; returns how many.

    Layers whose projections are wrapped (a PEFT LoRA, fp8's Float8Linear) keep the stock processor: their weights
    are not the whole projection. Call it before compiling.
    """
    fused = 0
    for module in transformer.modules():
        if type(getattr(module, "processor", None)) is not CosmosAttnProcessor2_0:
            continue
        projections = [module.to_q, module.to_k, module.to_v]
        if any(type(p) is not torch.nn.Linear for p in projections):
            continue
        if len({p.out_features for p in projections}) != 1 or len({p.bias is None for p in projections}) != 1:
            continue  # grouped-query heads or mixed biases: the stock processor's way
        module.set_processor(FusedProjectionsCosmosAttnProcessor())
        fused += 1
    return fused
