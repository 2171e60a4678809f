"""Negative specimens: models that must NOT be merged with the zoo, for the compatibility gate.

- different_base: same architecture and shapes, but fine-tuned from a base pretrained from
  another initialisation (its "task vector" against our base is noise of the base's size);
- different_tokenizer: our addition fine-tune with every non-special token id renumbered, the
  embedding rows permuted to match: it works with its own tokenizer, every shape matches, yet
  merging it row-by-row mixes different tokens;
- different_arch: a narrower and shallower GPT-2 (different shapes).

    python -c "from mergeline.zoo.specimens import permute_model; help(permute_model)"
"""
from __future__ import annotations

import torch

from .tokenizer import permutation, permuted


def permute_model(model, tokenizer, seed: int):
    """Return (model, tokenizer) with token ids renumbered; `model` is changed in place."""
    vocab = model.config.vocab_size
    if len(tokenizer) != vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, model vocab_size is {vocab}")
    # The trainer puts special tokens first; they keep their ids so eos/pad stay valid.
    n_special = max(tokenizer.all_special_ids) + 1
    perm = permutation(vocab, n_special, seed)
    index = torch.empty(vocab, dtype=torch.long)
    index[torch.tensor(perm)] = torch.arange(vocab)  # new row j holds old row index[j]
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight.copy_(emb.weight[index])
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
            head.weight.copy_(head.weight[index])
    return model, permuted(tokenizer, perm)
