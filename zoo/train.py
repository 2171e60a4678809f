"""Train the zoo's tiny GPT-2 models on the CPU, deterministically.

Pretraining fits every weight on generic text, which also states each skill's knowledge in
the base's own wording ("7 plus 8 is 15", "c a t backwards is t a c", "zorbel is from quimsa";
data.py). A fine-tune teaches a new prompt notation for a skill the base already has
("7 + 8 =", "c a t reversed :", "zorbel lives in") by training the whole token embedding
(`wte`, tied with the output head) while three quarters of each batch replay the base's text,
scored against the base's own predictions (KL, `replay_kl`): the model is held where the base
was on everything but the new notation.

Why that regime (shared/notes/merging.md; TIES: Yadav et al., 2023, arXiv:2306.01708): real
LLM fine-tunes are small edits of a capable base, dense-ish (most weights move a little),
overlapping between fine-tunes and partly disagreeing in sign, with each skill carried by the
largest deltas. Training the tied embedding gives exactly that: every row gets a gradient
through the output head, so every row moves a little and the three task vectors overlap on the
same matrix (cosines well above 0, sign conflicts on shared coordinates), while the rows of
each notation's tokens move most. Full fine-tunes of every block at this size interfere
through the shared activations and lose their skills in every merge; fine-tunes of disjoint
rows (the zoo's earlier regime) never interfere, so a merge shows nothing. build.py measures
the regime and fails if it is not there.

    python -c "from mergeline.zoo.train import tiny_config; print(tiny_config(512))"
"""
from __future__ import annotations

import hashlib
import random
import re
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict

THREADS = 1  # fixed: the reduction order of CPU kernels depends on the thread count; one
# thread, because these models are too small to gain from two and a second thread that waits
# for a busy core (a shared CI machine) made a step 10-100x slower (measured)


class TrainSpec(BaseModel):
    """One training run. `trainable` is a regex over parameter names (None: all)."""

    model_config = ConfigDict(extra="forbid")
    steps: int
    lr: float
    batch_size: int = 32
    replay: float = 0.0  # fraction of each batch drawn from the generic text
    # With an `anchor` model given to train(): the replayed text is scored against the anchor's
    # own next-token distribution (KL), not the text. Replay then only holds the model where
    # the anchor was, instead of also pulling every fine-tune the same way (continued
    # pretraining), a shared drift that would hide the fine-tunes' disagreements.
    replay_kl: bool = False
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
          progress=None, anchor=None) -> dict:
    """Train in place. `task`/`generic` are encoded examples; each batch takes
    `replay * batch_size` generic examples and the rest from `task` (all generic when
    `task` is empty). With `spec.replay_kl`, the generic examples' loss is the KL divergence
    from `anchor`'s predictions (a frozen model, usually the base).
    Returns {"loss": last loss, "trainable": parameter count}."""
    if spec.replay_kl and anchor is None:
        raise ValueError("replay_kl needs an anchor model")
    rng = random.Random(f"train-{seed}")
    names = set(trainable_names(model, spec.trainable))
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    n_replay = spec.batch_size if not task else round(spec.replay * spec.batch_size)
    hooks = []
    if spec.task_rows_only and task:
        emb = model.get_input_embeddings().weight
        keep = torch.zeros(emb.shape[0], 1)
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
            if spec.replay_kl and task and n_replay:
                loss = _anchored_loss(model, anchor, examples, n_replay, spec.batch_size, pad_id)
            else:
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


def _anchored_loss(model, anchor, examples, n_replay: int, batch_size: int, pad_id: int):
    """(1 - r) * next-token loss on the task examples + r * KL(anchor || model) on the replayed
    ones (every real token position), r = n_replay / batch_size."""
    ids, attention, labels = batch(examples[n_replay:], pad_id)
    task_loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    ids, attention, _ = batch(examples[:n_replay], pad_id)
    with torch.no_grad():
        target = torch.log_softmax(anchor(input_ids=ids, attention_mask=attention).logits, -1)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits, -1)
    kl = (target.exp() * (target - logp)).sum(-1)
    kl = (kl * attention).sum() / attention.sum()
    r = n_replay / batch_size
    return (1 - r) * task_loss + r * kl
