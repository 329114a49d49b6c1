"""T5 caption embeddings exactly as NVIDIA's Cosmos-Predict2 computes them.

Tokenize padded to 512 with truncation (a longer caption loses its end, as in NVIDIA's encoder), run the encoder
with the attention mask, zero every position at or past the real length (which counts `</s>`), keep the first
`length` rows. Training zero-pads back to [512, D].
"""

from __future__ import annotations

import torch

from . import memory, models

MAX_LENGTH = 512
# A prompt and its negative at once. t5-11b's activations are ~0.5 GiB per 512-token prompt: 8 at once peaked at
# 13.0 GiB on an H200 (9.1 of it weights), past a 12 GiB card; two at a time peaked at 10.3 GiB (BENCHMARKS.md,
# "Low memory"). The time this costs was not measured apart.
PROMPTS_PER_BATCH = 2


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], max_length: int = MAX_LENGTH) -> list[torch.Tensor]:
    """One [n_i, D] tensor per caption (n_i = its token count with `</s>`), in the encoder's dtype, on its device."""
    device = text_encoder.device
    tokens = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    input_ids = tokens.input_ids.to(device)
    attention_mask = tokens.attention_mask.to(device)
    hidden = text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    lengths = attention_mask.sum(dim=1).tolist()
    return [hidden[i, :n] for i, n in enumerate(lengths)]


def tokens_past_max_length(tokenizer, captions: list[str], max_length: int = MAX_LENGTH) -> list[int]:
    """How many tokens of each caption `encode_captions` cuts off (0 if it fits): its token count with `</s>`,
    untruncated, minus `max_length` (truncation keeps the first max_length - 1 tokens and appends `</s>`)."""
    # verbose=False: the tokenizer's own warning about long sequences would name neither caption nor count.
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False).input_ids]
    return [max(0, n - max_length) for n in lengths]


def pad_embedding(embedding: torch.Tensor, max_length: int = MAX_LENGTH) -> torch.Tensor:
    """[n, D] -> [max_length, D], zeros past n: what the transformer sees during NVIDIA's training."""
    n, dim = embedding.shape
    if n > max_length:
        raise ValueError(f"T5 embedding has {n} tokens, more than max_length={max_length}.")
    padded = embedding.new_zeros(max_length, dim)
    padded[:n] = embedding
    return padded


def encode_prompts(model, prompts: list[str], device, dtype) -> torch.Tensor:
    """[P, 512, D] padded T5 embeddings of `prompts` (a `--model` record), on the CPU; the encoder is gone when this
    returns, so whatever runs next (training, the transformer of sampling) has the GPU without T5's 9 GiB."""
    tokenizer, text_encoder = models.load_text_encoder(model, device, dtype)
    padded = []
    for start in range(0, len(prompts), PROMPTS_PER_BATCH):
        embeddings = encode_captions(tokenizer, text_encoder, prompts[start:start + PROMPTS_PER_BATCH])
        padded += [pad_embedding(e).cpu() for e in embeddings]
    del text_encoder
    memory.free_memory(device)
    return torch.stack(padded)
