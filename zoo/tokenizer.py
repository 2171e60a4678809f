"""The zoo's tokenizer: a byte-level BPE (as GPT-2's) trained offline on the zoo's own text.

Byte-level means every string lm-eval sends is encodable (unknown characters fall back to
bytes). Digits are split one per token so "15" and "1"+"5" never disagree between a prompt
and its answer. `permuted` builds the different-token-ids specimen.

    python -c "from mergeline.zoo.tokenizer import train_tokenizer; print(train_tokenizer(['hi'], 300))"
"""
from __future__ import annotations

import json
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS, PAD = "<|endoftext|>", "<pad>"


def train_tokenizer(lines: list[str], vocab_size: int):
    """Train byte-level BPE on `lines`; returns a `PreTrainedTokenizerFast` with eos/pad set."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   bos_token=EOS, unk_token=None, model_max_length=64)


def permutation(vocab_size: int, n_special: int, seed: int) -> list[int]:
    """perm[old_id] = new_id: shuffles every non-special id, keeps special tokens in place
    (so eos/pad stay where the model config says they are)."""
    rng = random.Random(f"permute-{seed}")
    rest = list(range(n_special, vocab_size))
    shuffled = rest[:]
    rng.shuffle(shuffled)
    return list(range(n_special)) + shuffled


def permuted(hf_tokenizer, perm: list[int]):
    """The same tokenizer with token ids renumbered by `perm` (same vocabulary size)."""
    spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    spec["model"]["vocab"] = {t: perm[i] for t, i in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens", []):
        added["id"] = perm[added["id"]]
    return wrap(Tokenizer.from_str(json.dumps(spec)))
