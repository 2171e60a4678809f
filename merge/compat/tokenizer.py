"""Tokenizer check: do the models map the same strings to the same ids?

Two tokenizers with the same size but permuted ids give identically shaped embeddings, so the
tensor check passes, yet a merge averages the row of "cat" with the row of "dog": gibberish.
So each component is compared by hash, from the files alone (no tokenizer library needed):

- vocab: token -> id (tokenizer.json model, or vocab.json; sentencepiece `tokenizer.model`
  by file hash). On a difference, how many ids differ, with examples.
- merges (BPE), normalization (normalizer, pre-tokenizer, model options, post-processor,
  decoder), special tokens and their ids, added tokens: each a failure when it differs.
- chat template: a warning (generation format, not ids).
A model without any tokenizer file warns; an unreadable file is an error naming it.

    python -c "from mergeline.merge.compat.tokenizer import read_tokenizer; print(read_tokenizer('MODEL_DIR'))"
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergeline.merge.checkpoint import CheckpointError, model_file
from mergeline.merge.model_folder import read_json_object, read_text

from .report import Check

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
                 "additional_special_tokens")
EXAMPLES = 5


@dataclass
class TokenizerInfo:
    files: list[str]
    vocab: dict[str, int] | None  # token -> id, added tokens included; None for sentencepiece-only
    hashes: dict[str, str]  # component -> hash ("" when absent)
    special: dict[str, Any] = field(default_factory=dict)  # role -> [content, id]
    parts: dict[str, Any] = field(default_factory=dict)  # normalization components, for naming what differs
    chat_template: str | None = None


def _hash(obj: Any) -> str:
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def _json(path: Path) -> dict:
    return _as_tokenizer_file(read_json_object, path)


def _text(path: Path) -> str:
    return _as_tokenizer_file(read_text, path)


def _as_tokenizer_file(read, path: Path):
    """model_folder's reader, its one-line error saying it is a tokenizer file that is unreadable."""
    try:
        return read(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: unreadable tokenizer file ({str(e).removeprefix(f'{path}: ')})") from None


def _token_id(value: Any, path: Path, at: str) -> int:
    """A token id as written in a tokenizer file: an int (or its decimal string, as JSON keys are)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    raise CheckpointError(f"{path}: unreadable tokenizer file ({at}: id {str(value)[:40]!r} is not a token id)")


def _added_entry(tok: Any, path: Path, at: str) -> dict:
    """One added token ({content, special}) from tokenizer.json or tokenizer_config.json."""
    if not isinstance(tok, dict) or not isinstance(tok.get("content"), str):
        raise CheckpointError(f"{path}: unreadable tokenizer file ({at}: expected an object with a string 'content')")
    return {"content": tok["content"], "special": bool(tok.get("special", False))}


def _content(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def read_tokenizer(folder: str | Path) -> TokenizerInfo | None:
    """The comparable facts of a folder's tokenizer, or None if it has no tokenizer files."""
    folder = Path(folder)
    # model_file: a tokenizer file linked to a file outside the folder is refused by name
    files = [f for f in TOKENIZER_FILES if model_file(folder, f, "tokenizer file") is not None]
    if not files:
        return None
    try:
        return _read_tokenizer(folder, files)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder}: unreadable tokenizer files ({', '.join(files)}: "
                              f"{e.__class__.__name__}: {str(e)[:200]})") from None


def _read_tokenizer(folder: Path, files: list[str]) -> TokenizerInfo:
    vocab, merges, parts, added = None, None, {}, {}
    sp_hash = ""
    if "tokenizer.json" in files:
        tj = _json(folder / "tokenizer.json")
        model = tj.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{folder / 'tokenizer.json'}: unreadable tokenizer file (no 'model' section)")
        raw = model.get("vocab")
        if isinstance(raw, dict):
            vocab = dict(raw)
        elif isinstance(raw, list):  # Unigram: [[piece, score], ...], id = position; scores matter too
            vocab = {p[0]: i for i, p in enumerate(raw)}
            parts["unigram_scores"] = [p[1] for p in raw]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        parts.update({k: tj.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")})
        parts["model_options"] = {k: v for k, v in model.items() if k not in ("vocab", "merges")}
        tj_path = folder / "tokenizer.json"
        added_tokens = tj.get("added_tokens") or []
        if not isinstance(added_tokens, list):
            raise CheckpointError(f"{tj_path}: unreadable tokenizer file ('added_tokens' must be a list)")
        for i, tok in enumerate(added_tokens):
            entry = _added_entry(tok, tj_path, f"added_tokens[{i}]")
            added[_token_id(tok.get("id"), tj_path, f"added_tokens[{i}]")] = entry
    elif "vocab.json" in files:
        vocab = _json(folder / "vocab.json")
        if "merges.txt" in files:
            lines = _text(folder / "merges.txt").splitlines()
            merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    if "tokenizer.model" in files:
        sp_hash = _hash((folder / "tokenizer.model").read_bytes())
    config = _json(folder / "tokenizer_config.json") if "tokenizer_config.json" in files else {}
    cfg_path = folder / "tokenizer_config.json"
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{cfg_path}: unreadable tokenizer file ('added_tokens_decoder' must be an object)")
    for i, tok in decoder.items():
        added.setdefault(_token_id(i, cfg_path, f"added_tokens_decoder[{i[:40]!r}]"),
                         _added_entry(tok, cfg_path, f"added_tokens_decoder[{i[:40]!r}]"))
    if "added_tokens.json" in files:
        at_path = folder / "added_tokens.json"
        for content, i in _json(at_path).items():
            added.setdefault(_token_id(i, at_path, repr(content[:40])), {"content": content, "special": False})
    if vocab is not None:
        vocab = {**vocab, **{a["content"]: i for i, a in added.items()}}
    special_map = _json(folder / "special_tokens_map.json") if "special_tokens_map.json" in files else {}
    ids = vocab or {}
    special = {}
    for role in SPECIAL_ROLES:
        value = config.get(role, special_map.get(role))
        if value is None:
            continue
        if isinstance(value, list):
            special[role] = [[_content(v), ids.get(_content(v))] for v in value]
        else:
            special[role] = [_content(value), ids.get(_content(value))]
    chat = config.get("chat_template")
    if "chat_template.jinja" in files:
        chat = _text(folder / "chat_template.jinja")
    elif "chat_template.json" in files:
        chat = _json(folder / "chat_template.json").get("chat_template")
    hashes = {
        "vocab": _hash(vocab) if vocab is not None else sp_hash,
        "merges": _hash(merges) if merges else "",
        "normalization": _hash(parts) if parts else "",
        "special_tokens": _hash(special),
        "added_tokens": _hash(sorted(added.items())),
        "chat_template": _hash(chat) if chat else "",
    }
    if vocab is None and sp_hash:
        hashes["sentencepiece"] = sp_hash
    return TokenizerInfo(files, vocab, hashes, special, parts, chat)


def check_tokenizers(tokenizers: dict[str, TokenizerInfo | None], base: str) -> list[Check]:
    """`tokenizers` maps model name -> its TokenizerInfo (None: no tokenizer files)."""
    absent = sorted(n for n, t in tokenizers.items() if t is None)
    if absent:
        present = Check("tokenizer.present", "warn",
                        f"no tokenizer files in {', '.join(absent)}: vocabularies cannot be compared",
                        {"absent": absent})
    else:
        present = Check("tokenizer.present", "pass", "every model has a tokenizer",
                        {n: t.files for n, t in tokenizers.items()})
    ref = tokenizers[base]
    others = {n: t for n, t in tokenizers.items() if n != base and t is not None}
    if ref is None or not others:
        reason = "the base has no tokenizer" if ref is None else "no model has a tokenizer to compare"
        skipped = [Check(f"tokenizer.{c}", "skip", f"skipped: {reason}") for c in
                   ("vocab", "merges", "normalization", "special_tokens", "added_tokens", "chat_template")]
        return [present, *skipped]
    return [present, _vocab(ref, others), _simple("merges", ref, others, "BPE merges differ"),
            _normalization(ref, others), _special(ref, others),
            _simple("added_tokens", ref, others, "added tokens differ"), _chat(ref, others)]


def _vocab(ref: TokenizerInfo, others: dict[str, TokenizerInfo]) -> Check:
    details, parts = {}, []
    for name, tok in others.items():
        if tok.hashes["vocab"] == ref.hashes["vocab"]:
            continue
        if ref.vocab is None or tok.vocab is None:
            details[name] = {"reason": "sentencepiece model file differs or formats differ",
                             "base_hash": ref.hashes["vocab"], "model_hash": tok.hashes["vocab"]}
            parts.append(f"{name}: tokenizer model file differs")
            continue
        differ = sorted(t for t in set(ref.vocab) | set(tok.vocab) if ref.vocab.get(t) != tok.vocab.get(t))
        examples = [[t, ref.vocab.get(t), tok.vocab.get(t)] for t in differ[:EXAMPLES]]
        details[name] = {"base_size": len(ref.vocab), "model_size": len(tok.vocab), "ids_differ": len(differ),
                         "examples": examples}
        ex = ", ".join(f"{t!r}: {a}->{b}" for t, a, b in examples[:3])
        parts.append(f"{name}: {len(differ)} tokens map to different ids (sizes {len(ref.vocab)} vs "
                     f"{len(tok.vocab)}; e.g. {ex})")
    if not details:
        size = len(ref.vocab) if ref.vocab is not None else "sentencepiece"
        return Check("tokenizer.vocab", "pass", f"identical vocabularies ({size} tokens)")
    return Check("tokenizer.vocab", "fail", "vocabulary differs from the base: " + "; ".join(parts), details)


def _simple(component: str, ref: TokenizerInfo, others: dict[str, TokenizerInfo], what: str) -> Check:
    bad = {n: {"base_hash": ref.hashes[component], "model_hash": t.hashes[component]}
           for n, t in others.items() if t.hashes[component] != ref.hashes[component]}
    if bad:
        return Check(f"tokenizer.{component}", "fail", f"{what} from the base in {', '.join(bad)}", bad)
    return Check(f"tokenizer.{component}", "pass", f"{component.replace('_', ' ')} identical")


def _normalization(ref: TokenizerInfo, others: dict[str, TokenizerInfo]) -> Check:
    bad = {}
    for name, tok in others.items():
        if tok.hashes["normalization"] != ref.hashes["normalization"]:
            keys = set(ref.parts) | set(tok.parts)
            bad[name] = sorted(k for k in keys if ref.parts.get(k) != tok.parts.get(k))
    if bad:
        parts = "; ".join(f"{n}: {', '.join(k)}" for n, k in bad.items())
        return Check("tokenizer.normalization", "fail", f"tokenization pipeline differs from the base ({parts})",
                     {"differing_components": bad})
    return Check("tokenizer.normalization", "pass", "normalizer, pre-tokenizer and post-processor identical")


def _special(ref: TokenizerInfo, others: dict[str, TokenizerInfo]) -> Check:
    bad = {}
    for name, tok in others.items():
        roles = set(ref.special) | set(tok.special)
        diff = {r: {"base": ref.special.get(r), "model": tok.special.get(r)}
                for r in sorted(roles) if ref.special.get(r) != tok.special.get(r)}
        if diff:
            bad[name] = diff
    if bad:
        parts = "; ".join(f"{n}: " + ", ".join(f"{r} {d['base']} vs {d['model']}" for r, d in diff.items())
                          for n, diff in bad.items())
        return Check("tokenizer.special_tokens", "fail", f"special tokens differ ({parts})", bad)
    return Check("tokenizer.special_tokens", "pass", "special tokens and their ids identical",
                 {"base": ref.special})


def _chat(ref: TokenizerInfo, others: dict[str, TokenizerInfo]) -> Check:
    bad = [n for n, t in others.items() if t.hashes["chat_template"] != ref.hashes["chat_template"]]
    if bad:
        return Check("tokenizer.chat_template", "warn", f"chat template differs from the base in {', '.join(bad)}",
                     {n: {"base_hash": ref.hashes["chat_template"], "model_hash": others[n].hashes["chat_template"]}
                      for n in bad})
    return Check("tokenizer.chat_template", "pass",
                 "chat template identical" if ref.chat_template else "no chat template in any model")
