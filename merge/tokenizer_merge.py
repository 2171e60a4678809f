"""The output tokenizer of a merge and the embedding and head rows that go with it, as mergekit
builds them (`mergekit/tokenizer/build.py` and `embed.py`, mergekit 0.1.5).

    tokenizer_source: union            # or: base, or one model's reference
    # or the longer form
    tokenizer:
      source: union
      tokens:
        <|im_start|>: {source: ./ft-a}                  # this model's row for the token
        <|im_end|>:   {source: ./ft-a, force: true}     # ... in every model, even those that have it
        <pad>:        {source: {kind: zero}}            # an all-zero row
        <x>:          {source: {kind: model_token, model: ./ft-a, token: "<y>"}}
      pad_to_multiple_of: 64

The output vocabulary is the base's tokenizer (`base`), a model's (`./ft-a`), or the base's plus
every token another model has (`union`: the base's ids first, then the new tokens in model order);
tokens listed under `tokens:` are added. Each model's embedding and head are then rebuilt row by
row in that vocabulary: a token the model has keeps its own row; a token it lacks takes the row
of the single model that has it, else the base's, else the mean over the models that have it, or
what `tokens:` says (`force` replaces even rows a model has). Rows added by `pad_to_multiple_of`
take the mean row. The merge method then merges the rebuilt rows, so models with different
vocabularies (sizes or ids) merge token by token instead of row number by row number.

One deliberate difference: mergekit orders the models of a union by a Python set (the order
changes between runs when three or more models add tokens); mergeline takes the base, then the
models in recipe order.

    python -m mergeline.merge.tokenizer_merge RECIPE.yaml     # what the remapping does, per model
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from mergeline.merge.checkpoint import Checkpoint
from mergeline.merge.recipe import ModelTokenEmbedding, TokenSpec, ZeroEmbedding, load_recipe, model_names
from mergeline.merge.resolve import resolve_model

log = logging.getLogger(__name__)

# Tensors indexed by token id along their first axis (mergekit's `vocabulary_axis: 0`).
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "model.embed_in.weight",
                 "gpt_neox.embed_in.weight", "embed_out.weight", "transformer.word_embeddings.weight")


# -- building the output tokenizer ----------------------------------------------------
@dataclass
class TokenizerInfo:
    """The output tokenizer; per model, output id -> the model's own id (-1: it lacks the token)."""

    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    permutations: dict[str, dict[int, int]]
    original_vocabs: dict[str, dict[str, int]]
    vocab_size: int  # rows of the rebuilt tensors (pad_to_multiple_of applied)


def _load_tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)


def _stripped_tokenizer(folder: Path, vocab_size: int | None):
    """The model's tokenizer without the tokens whose ids are >= its config's vocab_size
    (mergekit's get_stripped_tokenizer: those tokens have no embedding row)."""
    import tokenizers

    tok = _load_tokenizer(folder)
    vocab_size = vocab_size or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    if not tok.is_fast:
        raise ValueError(f"{folder}: the tokenizer has tokens past vocab_size {vocab_size} and no fast "
                         "tokenizer: it cannot take part in a tokenizer merge")
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ValueError(f"{folder}: tokenizer type {data['model']['type']!r}: only BPE tokenizers with tokens "
                         "past vocab_size can be merged (as in mergekit)")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        parts = m.split(" ") if isinstance(m, str) else m
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base_tok, toks: dict[str, Any], vocab_sizes: dict[str, int | None]):
    """mergekit's build_union_tokenizer: the base's tokenizer plus every other model's tokens."""
    import transformers

    out_vocab: dict[str, int] = {}
    out_added: dict[str, Any] = {}
    for ref, tok in toks.items():
        size = vocab_sizes.get(ref) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_text = {info.content for info in added.values()}
        for t, i in tok.get_vocab().items():
            if i >= size or t in added_text:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for i, info in added.items():
            if i < size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a copy, so the base's tokenizer is not changed
        base_tok.save_pretrained(d, legacy_format=False, safe_serialization=True)
        res = transformers.AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def build_tokenizer(source: str, base: str, models: list[str], folders: dict[str, Path],
                    vocab_sizes: dict[str, int | None], add_tokens: list[str] = (),
                    pad_to_multiple_of: int | None = None) -> TokenizerInfo:
    """The output tokenizer for `source` ('union', 'base' or a model reference) and, for every
    model (references, base included), where each output token's row lies in it."""
    toks = {base: _stripped_tokenizer(folders[base], vocab_sizes.get(base))}
    for ref in models:
        if ref in toks:
            continue
        try:
            toks[ref] = _load_tokenizer(folders[ref])
        except Exception as e:  # mergekit: a model without a tokenizer is taken to share the base's
            log.warning("model %r: no tokenizer could be loaded (%s); taken to be the base's", ref, e)
    if source == "union":
        out = _union(toks[base], toks, vocab_sizes)
    elif source == "base":
        out = toks[base]
    else:
        out = _load_tokenizer(folders[source])
    have = set(out.get_vocab())
    for t in add_tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab_out = out.get_vocab()
    perms: dict[str, dict[int, int]] = {}
    for ref in [base, *[m for m in models if m != base]]:
        own = (toks[ref] if ref in toks else toks[base]).get_vocab()
        size = vocab_sizes.get(ref) or len(own)
        p = {}
        for t, new_id in vocab_out.items():
            old = own.get(t, -1)
            if old >= size:
                log.warning("model %r: token %r has id %d past vocab_size %d (padding?)", ref, t, old, size)
                continue
            p[new_id] = old
        perms[ref] = p
    n = len(vocab_out)
    if pad_to_multiple_of and n % pad_to_multiple_of:
        n = (n // pad_to_multiple_of + 1) * pad_to_multiple_of
    return TokenizerInfo(out, perms, {ref: t.get_vocab() for ref, t in toks.items()}, n)


# -- rebuilding the rows ----------------------------------------------------------------
def _source_ids(info: TokenizerInfo, models: list[str]) -> dict[str, torch.Tensor]:
    """Per model, the model's own id of every output id (-1: it lacks the token)."""
    n = len(info.tokenizer.get_vocab())
    return {m: torch.tensor([info.permutations[m].get(i, -1) for i in range(n)], dtype=torch.long) for m in models}


def _assign_sources(info: TokenizerInfo, models: list[str], base: str | None,
                    configs: dict[str, TokenSpec],
                    ids: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, TokenSpec], set[str]]:
    """mergekit's assign_embedding_sources: a source for every token some model lacks (tokens
    every model has need none: their rows are the models' own)."""
    ids = ids if ids is not None else _source_ids(info, models)
    present = torch.stack([ids[m] >= 0 for m in models])  # models x output ids
    count = present.sum(dim=0)
    lacking = set((count < len(models)).nonzero().flatten().tolist())
    configs = dict(configs)
    average = set()
    for token, tid in info.tokenizer.get_vocab().items():
        if token in configs or tid not in lacking:
            continue
        has = present[:, tid].tolist()
        if sum(has) == 1:
            configs[token] = TokenSpec(source=models[has.index(True)])
        elif sum(has) == 0:
            configs[token] = TokenSpec(source=ZeroEmbedding(kind="zero"))
            log.warning("token %r is in no model: its row is zero", token)
        elif base in models and has[models.index(base)]:
            configs[token] = TokenSpec(source=base)
        else:
            average.add(token)
    return configs, average


def _default_row(info: TokenizerInfo, tensors: dict[str, torch.Tensor], token: str, tid: int,
                 spec: TokenSpec) -> torch.Tensor:
    src = spec.source
    if isinstance(src, ZeroEmbedding):
        t = next(iter(tensors.values()))
        return t.new_zeros(t.shape[1:])
    model = src.model if isinstance(src, ModelTokenEmbedding) else src
    if model not in tensors:
        raise ValueError(f"token {token!r} takes its row from model {model!r}, which is not merged into this tensor")
    if isinstance(src, ModelTokenEmbedding):
        sid = src.token_id
        if sid is None:
            if src.token not in info.original_vocabs.get(model, {}):
                raise ValueError(f"token {token!r}: source token {src.token!r} is not in model {model!r}")
            sid = info.original_vocabs[model][src.token]
        if not 0 <= sid < tensors[model].shape[0]:
            raise ValueError(f"token {token!r}: source token id {sid} is out of range for model {model!r}")
        return tensors[model][sid]
    sid = info.permutations[model].get(tid, -1)
    if sid < 0:
        raise ValueError(f"token {token!r} takes its row from model {model!r}, which lacks it")
    return tensors[model][sid]


def remap_rows(info: TokenizerInfo, tensors: dict[str, torch.Tensor], base: str | None,
               configs: dict[str, TokenSpec]) -> dict[str, torch.Tensor]:
    """Each model's tensor (token rows first) rebuilt in the output vocabulary (mergekit's
    PermutedVocabulary, vectorised: the same rows)."""
    models = list(tensors)
    if any(t.shape[1:] != tensors[models[0]].shape[1:] for t in tensors.values()):
        raise ValueError(f"embedding widths differ: {[list(t.shape) for t in tensors.values()]}")
    vocab = info.tokenizer.get_vocab()
    n = len(vocab)
    if vocab and max(vocab.values()) >= n:
        raise ValueError(f"the output tokenizer's ids are not 0..{n - 1} (largest {max(vocab.values())})")
    row_shape = tensors[models[0]].shape[1:]
    dtype = tensors[models[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[models[0]].device
    ids = _source_ids(info, models)
    configs, average = _assign_sources(info, models, base, configs, ids)
    forced = torch.zeros(n, dtype=torch.bool)
    for t, spec in configs.items():
        if spec.force and t in vocab:
            forced[vocab[t]] = True
    lacking = forced.clone()
    for m in models:
        lacking |= ids[m] < 0
    defaults = {}  # output id -> the row a model that lacks the token (or must not use its own) gets
    id_token = {tid: t for t, tid in vocab.items()}
    for tid in lacking.nonzero().flatten().tolist():
        token = id_token[tid]
        if token in average:
            row = torch.zeros(row_shape, dtype=dtype, device=device)
            for m in models:  # in model order, as mergekit sums them
                if ids[m][tid] >= 0:
                    row = row + tensors[m][ids[m][tid]]
            defaults[tid] = row / int(sum(int(ids[m][tid] >= 0) for m in models))
        elif token in configs:
            defaults[tid] = _default_row(info, tensors, token, tid, configs[token])
    out = {}
    for m in models:
        new = torch.empty((info.vocab_size, *row_shape), dtype=dtype, device=device)  # every row set below
        own = (ids[m] >= 0) & ~forced
        keep = own.nonzero().flatten()
        new[keep.to(device)] = tensors[m][ids[m][keep].to(device)].to(dtype)
        missing = 0
        for tid in (~own).nonzero().flatten().tolist():
            if tid in defaults:
                new[tid] = defaults[tid]
            else:
                new[tid] = 0
                missing += 1
        if missing:
            log.error("model %r: no row for %d tokens: left zero", m, missing)
        if info.vocab_size > n:  # padding rows: the mean row (Hewitt, vocabulary expansion)
            new[n:] = new[:n].mean(dim=0)
        out[m] = new
    return out


class RowRemapper:
    """One vocabulary tensor of one merge job: reads every input's tensor once, rebuilds them all
    together (a missing token's row may come from another model) and hands them out one by one,
    as the executor reads its inputs in turn."""

    def __init__(self, info: TokenizerInfo, inputs: list[tuple[object, str, str]], base: str | None,
                 configs: dict[str, TokenSpec]):
        self.info, self.inputs, self.base, self.configs = info, inputs, base, configs  # (reader, name, ref)
        self._ready: dict[int, torch.Tensor] = {}

    def load(self, i: int) -> torch.Tensor:
        if i not in self._ready:
            tensors = {ref: reader.read(name) for reader, name, ref in self.inputs}
            rows = remap_rows(self.info, tensors, self.base, self.configs)
            self._ready = {k: rows[ref] for k, (_, _, ref) in enumerate(self.inputs)}
        return self._ready.pop(i)


# -- what the compatibility gate reports ----------------------------------------------
class ModelRemap(BaseModel):
    model: str  # the reference as the recipe writes it
    name: str  # its short display name (merge.recipe.model_names)
    vocab_size: int  # the model's own rows (config.json)
    kept: int  # output tokens that keep this model's own row
    moved: int  # of those, rows whose id changes
    filled: int  # output tokens this model lacks: their row comes from elsewhere
    filled_from: dict[str, int]  # source ('model ref', 'zero', 'mean') -> tokens


class RemappingSummary(BaseModel):
    """What a tokenizer merge does to every model's vocabulary, for the compatibility report."""

    source: str
    vocab_size: int  # rows of the output embedding
    added_tokens: int  # output tokens that are not in the base's vocabulary
    models: list[ModelRemap]

    def text(self) -> str:
        names = {m.model: m.name for m in self.models}
        parts = [f"{m.name}: {m.filled} filled"
                 + (f" ({', '.join(f'{v} from {names.get(k, k)}' for k, v in m.filled_from.items())})" if m.filled else "")
                 + f", {m.moved} moved" for m in self.models]
        return (f"tokenizer {self.source}: {self.vocab_size} rows, {self.added_tokens} tokens beyond the base; "
                + "; ".join(parts))


def recipe_tokenizer(recipe) -> tuple[str, dict[str, TokenSpec], int | None] | None:
    """(source, tokens, pad_to_multiple_of) of a recipe, or None when it sets no tokenizer."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer.source, dict(recipe.tokenizer.tokens or {}), recipe.tokenizer.pad_to_multiple_of
    if recipe.tokenizer_source is not None:
        return recipe.tokenizer_source, {}, None
    return None


def tokenizer_for(recipe, folders: dict[str, Path], configs: dict[str, dict]) -> TokenizerInfo | None:
    """The recipe's output tokenizer, from its models' folders and config.json contents."""
    spec = recipe_tokenizer(recipe)
    if spec is None:
        return None
    source, tokens, pad = spec
    refs = list(folders)
    base = recipe.base_model if recipe.base_model in folders else refs[0]
    sizes = {ref: _vocab_size(cfg) for ref, cfg in configs.items()}
    return build_tokenizer(source, base, refs, folders, sizes, list(tokens), pad)


def check_token_sources(info: TokenizerInfo, tokens: dict[str, TokenSpec], models: list[str]) -> None:
    """Every `tokens:` entry names a merged model and, for `model_token`, a token or id that model
    has; ValueError naming the token otherwise (before any tensor is read)."""
    for token, spec in tokens.items():
        src = spec.source
        if src is None or isinstance(src, ZeroEmbedding):
            continue
        model = src.model if isinstance(src, ModelTokenEmbedding) else src
        if model not in models:
            raise ValueError(f"tokens[{token!r}].source: {model!r} is not one of the recipe's models")
        if isinstance(src, ModelTokenEmbedding):
            own = info.original_vocabs.get(model, {})
            if src.token is not None and src.token not in own:
                raise ValueError(f"tokens[{token!r}].source: token {src.token!r} is not in model {model!r}")
            # the model's own ids (its vocabulary, not the output's: `permutations` is keyed by output id)
            if src.token_id is not None and not 0 <= src.token_id < max(len(own), len(info.permutations[model])):
                raise ValueError(f"tokens[{token!r}].source: token_id {src.token_id} is out of range for {model!r}")


def _vocab_size(config: dict) -> int | None:
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return v if isinstance(v, int) else None


def describe_remapping(recipe) -> RemappingSummary | None:
    """What the recipe's tokenizer merge does, from the models' tokenizer files and configs alone
    (no tensor read); None when the recipe sets no tokenizer, or when transformers cannot load the
    tokenizers (the merge then copies the tokenizer source's files, or refuses a union). For the
    compatibility gate: a union of different vocabularies is a remapping to report, not a
    tokenizer mismatch."""
    spec = recipe_tokenizer(recipe)
    if spec is None:
        return None
    folders, configs = {}, {}
    for ref in referenced_models(recipe):
        ckpt = Checkpoint(resolve_model(ref, recipe.source_dir))
        folders[ref], configs[ref] = ckpt.folder, ckpt.config
    try:
        info = tokenizer_for(recipe, folders, configs)
    except Exception as e:  # transformers cannot load a tokenizer: the merge itself says why (merge/plan.py)
        log.warning("tokenizer remapping not described: %s: %s", type(e).__name__, (str(e).splitlines() or [""])[0])
        return None
    base = recipe.base_model if recipe.base_model in folders else next(iter(folders))
    models = list(folders)
    assigned, average = _assign_sources(info, models, base, spec[1])
    vocab = info.tokenizer.get_vocab()
    base_vocab = info.original_vocabs.get(base, {})
    names = model_names(recipe)
    rows = []
    for ref in models:
        p = info.permutations[ref]
        kept = [(t, i) for t, i in vocab.items() if p.get(i, -1) >= 0 and not (t in assigned and assigned[t].force)]
        filled: dict[str, int] = {}
        for t, i in vocab.items():
            if p.get(i, -1) >= 0 and not (t in assigned and assigned[t].force):
                continue
            src = "mean" if t in average else _source_name(assigned.get(t))
            filled[src] = filled.get(src, 0) + 1
        rows.append(ModelRemap(model=ref, name=names.get(ref, ref), vocab_size=_vocab_size(configs[ref]) or len(p), kept=len(kept),
                               moved=sum(1 for _, i in kept if p[i] != i), filled=sum(filled.values()),
                               filled_from=filled))
    return RemappingSummary(source=spec[0], vocab_size=info.vocab_size,
                            added_tokens=sum(1 for t in vocab if t not in base_vocab), models=rows)


def _source_name(spec: TokenSpec | None) -> str:
    if spec is None or spec.source is None:
        return "none"
    if isinstance(spec.source, ZeroEmbedding):
        return "zero"
    if isinstance(spec.source, ModelTokenEmbedding):
        return spec.source.model
    return spec.source


def referenced_models(recipe) -> list[str]:
    """Every model the recipe names, base first, then in recipe order (each once)."""
    refs = [recipe.base_model] if recipe.base_model else []
    if recipe.slices:
        refs += [s.model for sl in recipe.slices for s in sl.sources]
    refs += [m.model for m in recipe.models or []]
    return list(dict.fromkeys(refs))


if __name__ == "__main__":
    summary = describe_remapping(load_recipe(sys.argv[1]))
    print(summary.text() if summary else "the recipe sets no tokenizer: no remapping")
