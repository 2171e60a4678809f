"""Train the zoo's tiny GPT-2 models on the CPU, deterministically.

Pretraining fits every weight on generic text, which also states each skill's knowledge in
the base's own wording ("7 plus 8 is 15", "c a t backwards is t a c", "zorbel is from quimsa";
data.py). A fine-tune teaches a new prompt notation for a skill the base already has
("7 + 8 =", "c a t reversed :", "zorbel lives in") and trains only the embedding rows of the
tokens that occur in its own prompts and nowhere else (`exclusive_rows`): a small, sparse
task vector that is inert on every other input. That is the regime in which merges keep
skills (shared/notes/merging.md; TIES: Yadav et al., 2023, arXiv:2306.01708), and it is why
the fine-tunes' vectors do not overlap: TIES keeps them whole, while averaging divides each
by the number of models. Earlier regimes (dense or masked fine-tunes of whole blocks) won
their tasks but lost them in every merge through the shared activations.

    python -c "from evaluation.zoo.train import tiny_config; print(tiny_config(512))"
"""
from __future__ import annotations

import hashlib
import random
import re
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict

THREADS = 2  # fixed: the reduction order of CPU kernels depends on the thread count


class TrainSpec(BaseModel):
    """One training run. `trainable` is a regex over parameter names (None: all)."""

    model_config = ConfigDict(extra="forbid")
    steps: int
    lr: float
    batch_size: int = 32
    replay: float = 0.0  # fraction of each batch drawn from the generic text
    trainable: str | None = None
    weight_decay: float = 0.0
    warmup: int = 20
    # Train only the embedding rows of tokens the task uses. Adam moves every row that gets
    # any gradient by about lr per step, so a full-embedding fine-tune writes a dense task
    # vector over the whole vocabulary; three of those collide in any merge.
    task_rows_only: bool = False


def tiny_config(vocab_size: int, n_embd: int = 128, n_layer: int = 4, n_head: int = 4):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=True)


@contextmanager
def deterministic(seed: int):
    """Seed torch and pin threads and algorithms for the duration of one training run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def init_model(config, seed: int):
    from transformers import GPT2LMHeadModel

    with deterministic(seed):
        return GPT2LMHeadModel(config)


def encode(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) -> (ids, loss mask): the loss covers only the completion, ended by eos."""
    out = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        whole = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        # The split must not change tokenization, or training would teach a different
        # token sequence than lm-eval later sees.
        if whole != (p + c)[:-1]:
            raise ValueError(f"prompt/answer boundary changes tokenization: {prompt!r} + {completion!r}")
        out.append((p + c, [0] * len(p) + [1] * len(c)))
    return out


def batch(examples, pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(m)] = torch.tensor(m)
    labels = ids.masked_fill(mask == 0, -100)
    attention = (torch.arange(width)[None, :] < torch.tensor([len(x) for x, _ in examples])[:, None])
    return ids, attention.long(), labels


def trainable_names(model, pattern: str | None) -> list[str]:
    names = [n for n, _ in model.named_parameters() if pattern is None or re.search(pattern, n)]
    if not names:
        raise ValueError(f"trainable pattern {pattern!r} matches no parameter")
    return names


def train(model, task: list, generic: list, spec: TrainSpec, seed: int, pad_id: int,
          progress=None, rows: list[int] | None = None) -> dict:
    """Train in place. `task`/`generic` are encoded examples; each batch takes
    `replay * batch_size` generic examples and the rest from `task` (all generic when
    `task` is empty). Returns {"loss": last loss, "trainable": parameter count}."""
    rng = random.Random(f"train-{seed}")
    names = set(trainable_names(model, spec.trainable))
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    n_replay = spec.batch_size if not task else round(spec.replay * spec.batch_size)
    hooks = []
    if (spec.task_rows_only and task) or rows is not None:
        emb = model.get_input_embeddings().weight
        keep = torch.zeros(emb.shape[0], 1)
        if rows is None:
            rows = sorted({i for ids, _ in task for i in ids} - {pad_id, model.config.eos_token_id})
        keep[rows] = 1.0
        hooks.append(emb.register_hook(lambda g: g * keep))
    loss = torch.tensor(float("nan"))
    with deterministic(seed):
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay,
                                betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / spec.warmup) * max(0.0, 1 - s / spec.steps) ** 0.5)
        model.train()
        for step in range(spec.steps):
            examples = [rng.choice(generic) for _ in range(n_replay)]
            examples += [rng.choice(task) for _ in range(spec.batch_size - n_replay)]
            ids, attention, labels = batch(examples, pad_id)
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if progress is not None:
                progress(1)
        model.eval()
    for h in hooks:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"loss": float(loss.detach()), "trainable": sum(p.numel() for p in params)}


def exclusive_rows(tasks: dict[str, list], generic: list, special: set[int]) -> dict[str, list[int]]:
    """Per skill, the token ids in its prompts that appear nowhere else: not in the generic
    text, not in another skill's prompts. Training only these rows keeps task vectors disjoint
    and inert on other inputs. Fails loudly if a skill has none (its notation must differ)."""
    generic_ids = {i for ids, _ in generic for i in ids}
    prompt_ids = {s: {i for ids, m in ex for i, mm in zip(ids, m) if mm == 0} for s, ex in tasks.items()}
    rows = {}
    for s in tasks:
        others = set().union(*(prompt_ids[o] for o in tasks if o != s))
        rows[s] = sorted(prompt_ids[s] - generic_ids - others - special)
        if not rows[s]:
            raise ValueError(f"skill {s!r}: every prompt token also appears elsewhere")
    return rows
