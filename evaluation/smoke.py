"""The smoke test: seconds per model, between the merge and the full evaluation.

A merge can be garbage without any input being wrong: a scrambled or runaway tensor, a
task-arithmetic lambda far too large, an interference that wrecks the base's language. Minutes
of lm-eval would show it; a few forward passes show it in seconds. The checks, each recorded
with its numbers (pass, fail, or skipped with the reason):

- `finite_logits`: every logit of the forward passes over the held-out text is finite;
- `perplexity`: the model's perplexity on a small held-out general text, over the worst
  (highest) perplexity of its references (the base and the fine-tunes), at most
  `max_perplexity_ratio`: a merge may be somewhat worse than its parents at plain text, never
  much worse than all of them;
- `eos`: every greedy continuation of the prompts ends with the tokenizer's EOS within
  `max_new_tokens` new tokens (a model that never stops is broken for generation tasks);
- `repetition`: in every continuation, the share of n-grams that repeat an earlier one is at
  most `max_repeated_ngram_share` (degenerate loops such as "the the the ...");
- `chat_template`: the tokenizer's chat template renders a one-turn conversation, when it has one.

Thresholds are the gate policy's `smoke:` section (`SmokeRule`); the text and the prompts come
from the pipeline. Pure transformers + torch: no Prefect, no MLflow.

    smoke_test(model_dir, {"base": BASE, "addition": FT}, text, prompts, SmokeRule()) -> SmokeResult
    python -m mergeline.evaluation.smoke MODEL_DIR --ref base=BASE --text held_out.txt --prompt "the cat"
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from mergeline.merge.resolve import split_adapter

CHECKS = ("finite_logits", "perplexity", "eos", "repetition", "chat_template")


class SmokeRule(BaseModel):
    """The gate policy's `smoke:` section. `smoke: null` or `enabled: false` skips the stage."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_perplexity_ratio: float = Field(1.5, gt=0, description="model ppl / worst reference ppl")
    max_new_tokens: int = Field(64, ge=1, description="EOS must come within this many new tokens")
    max_repeated_ngram_share: float = Field(0.5, ge=0, le=1)
    ngram: int = Field(3, ge=1, description="n of the n-grams counted by the repetition check")
    require_eos: bool = True


class SmokeCheck(BaseModel):
    name: str
    status: Literal["pass", "fail", "skipped"]
    value: Optional[float] = None
    threshold: Optional[float] = None
    message: str = ""


class Continuation(BaseModel):
    prompt: str
    text: str
    new_tokens: int
    max_new_tokens: int
    ended_with_eos: bool
    repeated_ngram_share: float


class SmokeResult(BaseModel):
    model: str
    passed: bool
    checks: list[SmokeCheck]
    perplexity: Optional[float] = None
    reference_perplexity: dict[str, float] = Field(default_factory=dict)
    continuations: list[Continuation] = Field(default_factory=list)
    seconds: float

    def failed(self) -> list[SmokeCheck]:
        return [c for c in self.checks if c.status == "fail"]

    def reasons(self) -> list[str]:
        return [f"smoke.{c.name}: {c.message}" for c in self.failed()]

    def metrics(self) -> dict[str, float]:
        """Numbers for a tracker: each check's value and pass flag, perplexities, seconds."""
        out: dict[str, float] = {"passed": float(self.passed), "seconds": self.seconds}
        for c in self.checks:
            if c.status != "skipped":
                out[f"{c.name}.pass"] = float(c.status == "pass")
                if c.value is not None and math.isfinite(c.value):
                    out[f"{c.name}.value"] = c.value
        if self.perplexity is not None and math.isfinite(self.perplexity):
            out["perplexity"] = self.perplexity
        out.update({f"reference_perplexity.{k}": v for k, v in self.reference_perplexity.items()
                    if math.isfinite(v)})
        return out


# ---------------------------------------------------------------- loading


def load(model_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a local folder, offline; `BASE+ADAPTER` is a LoRA adapter merged
    into its base by peft, as lm-eval's `peft=` argument does."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load would drown the pipeline's log
    base, adapter = split_adapter(str(model_dir))
    # float32 on the CPU: half-precision perplexities there are slow and noisy.
    dtype = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    has_tok = adapter is not None and any((Path(adapter) / f).is_file()
                                          for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(adapter if has_tok else base, local_files_only=True)
    return model.to(device).eval(), tok


def context_length(model) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return 2048


# ---------------------------------------------------------------- measurements


def perplexity(model, tok, text: str, batch_size: int = 16) -> tuple[float, int, int]:
    """(perplexity, non-finite logits, tokens scored) over `text`, one document per non-empty
    line, each cut into windows of the model's context; every token after a window's first is
    scored. Identical for every model, so perplexities of a merge and its parents compare."""
    import torch

    ctx = context_length(model)
    windows = []
    for line in text.splitlines():
        if line.strip():
            ids = tok(line + "\n")["input_ids"]
            windows += [ids[i:i + ctx] for i in range(0, len(ids), ctx) if len(ids[i:i + ctx]) > 1]
    if not windows:
        raise ValueError("smoke text has no line of two tokens or more")
    nll, scored, nonfinite = 0.0, 0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            width = max(map(len, chunk))
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, w in enumerate(chunk):
                ids[j, :len(w)] = torch.tensor(w)
                mask[j, :len(w)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            keep = mask.bool()
            nonfinite += int((~torch.isfinite(logits[keep])).sum())
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:]
            token_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            scored_mask = mask[:, 1:].bool()
            nll += float(token_nll[scored_mask].sum())
            scored += int(scored_mask.sum())
    return math.exp(nll / scored) if math.isfinite(nll) else math.inf, nonfinite, scored


def repeated_ngram_share(tokens: list[int], n: int) -> float:
    """Share of the n-grams of `tokens` that repeat an earlier one: 0 for no repeat, near 1 for
    a loop ("a b a b a b ..."). Fewer than two n-grams: 0."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def continue_prompt(model, tok, prompt: str, rule: SmokeRule) -> Continuation:
    """Greedy continuation of `prompt`, at most `rule.max_new_tokens` new tokens (fewer when
    the model's context ends first), stopped at EOS."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
    bound = min(rule.max_new_tokens, context_length(model) - ids.shape[1])
    if bound < 1:
        raise ValueError(f"smoke prompt {prompt!r} fills the model's context ({context_length(model)} tokens)")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    # An explicit config: the folder's own generation_config (sampling, penalties) must not apply.
    config = GenerationConfig(max_new_tokens=bound, do_sample=False, num_beams=1,
                              eos_token_id=eos, pad_token_id=pad if pad is not None else 0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[0, ids.shape[1]:].tolist()
    ended = eos is not None and eos in new
    body = new[:new.index(eos)] if ended else new
    return Continuation(prompt=prompt, text=tok.decode(body), new_tokens=len(body) + int(ended),
                        max_new_tokens=bound, ended_with_eos=ended,
                        repeated_ngram_share=repeated_ngram_share(body, rule.ngram))


def render_chat(tok, content: str) -> str | None:
    """The chat template applied to one user turn; None when the tokenizer has no template."""
    if not getattr(tok, "chat_template", None):
        return None
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)


# ---------------------------------------------------------------- the test


def smoke_test(model_dir: str | Path, reference_dirs: dict[str, str | Path], text: str | None,
               prompts: list[str], rule: SmokeRule | None = None, device: str = "cpu") -> SmokeResult:
    """Run every check on `model_dir`; `reference_dirs` (the base and the fine-tunes, by name)
    set the perplexity bar. Without text the perplexity check is skipped (finite logits are
    then checked on the prompts); without prompts the EOS and repetition checks are skipped;
    each skip is recorded with its reason, never hidden."""
    rule = rule or SmokeRule()
    t0 = time.perf_counter()
    model, tok = load(model_dir, device)
    probe = text if text and text.strip() else "\n".join(prompts) or "hello"
    ppl, nonfinite, scored = perplexity(model, tok, probe)
    checks = [SmokeCheck(name="finite_logits", status="pass" if nonfinite == 0 else "fail",
                         value=float(nonfinite), threshold=0.0,
                         message=f"{nonfinite} non-finite logits over {scored} scored tokens")]
    refs: dict[str, float] = {}
    if text and text.strip():
        refs = {name: reference_perplexity(ref, text, device) for name, ref in reference_dirs.items()}
        checks.append(_perplexity_check(ppl, refs, rule))
    else:
        ppl = None
        checks.append(SmokeCheck(name="perplexity", status="skipped", message="no smoke text given"))
    conts = [continue_prompt(model, tok, p, rule) for p in prompts]
    checks += _generation_checks(conts, tok, rule)
    checks.append(_chat_check(tok, prompts[0] if prompts else "hello"))
    return SmokeResult(model=str(model_dir), passed=not any(c.status == "fail" for c in checks),
                       checks=checks, perplexity=ppl, reference_perplexity=refs, continuations=conts,
                       seconds=round(time.perf_counter() - t0, 3))


_REFERENCE_PPL: dict[tuple[str, str, str], float] = {}


def reference_perplexity(model_dir: str | Path, text: str, device: str = "cpu") -> float:
    """perplexity() of a reference model, remembered per process by the folder's content hash:
    every candidate of a pipeline run compares with the same base and fine-tunes."""
    from mergeline.merge.hashing import content_hash, text_hash

    key = (content_hash(model_dir), text_hash(text), device)
    if key not in _REFERENCE_PPL:
        _REFERENCE_PPL[key] = perplexity(*load(model_dir, device), text)[0]
    return _REFERENCE_PPL[key]


def _perplexity_check(ppl: float, refs: dict[str, float], rule: SmokeRule) -> SmokeCheck:
    if not refs:
        return SmokeCheck(name="perplexity", status="skipped", value=ppl, message="no reference models given")
    worst_name = max(refs, key=lambda k: refs[k])
    ratio = ppl / refs[worst_name] if math.isfinite(ppl) else math.inf
    ok = math.isfinite(ratio) and ratio <= rule.max_perplexity_ratio
    return SmokeCheck(name="perplexity", status="pass" if ok else "fail", value=ratio,
                      threshold=rule.max_perplexity_ratio,
                      message=f"perplexity {ppl:.3g} is {ratio:.3g}x the worst reference "
                              f"({worst_name}: {refs[worst_name]:.3g}); at most {rule.max_perplexity_ratio:g}x allowed")


def _generation_checks(conts: list[Continuation], tok, rule: SmokeRule) -> list[SmokeCheck]:
    if not conts:
        return [SmokeCheck(name=n, status="skipped", message="no smoke prompts given") for n in ("eos", "repetition")]
    if not rule.require_eos:
        eos = SmokeCheck(name="eos", status="skipped", message="require_eos is false")
    elif tok.eos_token_id is None:
        eos = SmokeCheck(name="eos", status="fail", message="the tokenizer has no eos token")
    else:
        open_ = [c for c in conts if not c.ended_with_eos]
        eos = SmokeCheck(name="eos", status="fail" if open_ else "pass",
                         value=float(len(open_)), threshold=0.0,
                         message=(f"{len(open_)} of {len(conts)} continuations did not end with EOS within "
                                  f"{open_[0].max_new_tokens} new tokens, e.g. {open_[0].prompt!r} -> {open_[0].text[:80]!r}"
                                  if open_ else f"all {len(conts)} continuations end with EOS"))
    worst = max(conts, key=lambda c: c.repeated_ngram_share)
    ok = worst.repeated_ngram_share <= rule.max_repeated_ngram_share
    rep = SmokeCheck(name="repetition", status="pass" if ok else "fail", value=worst.repeated_ngram_share,
                     threshold=rule.max_repeated_ngram_share,
                     message=f"largest repeated {rule.ngram}-gram share {worst.repeated_ngram_share:.2f} "
                             f"(at most {rule.max_repeated_ngram_share:g}), on {worst.prompt!r} -> {worst.text[:80]!r}")
    return [eos, rep]


def _chat_check(tok, content: str) -> SmokeCheck:
    try:
        rendered = render_chat(tok, content)
    except Exception as e:  # a broken template: jinja errors of every kind
        return SmokeCheck(name="chat_template", status="fail", message=f"the chat template does not render: {e}")
    if rendered is None:
        return SmokeCheck(name="chat_template", status="skipped", message="the tokenizer has no chat template")
    ok = bool(rendered.strip())
    return SmokeCheck(name="chat_template", status="pass" if ok else "fail",
                      message=f"renders {len(rendered)} characters" if ok else "renders an empty string")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="smoke-test a model folder (exit 0 pass, 1 fail)")
    ap.add_argument("model")
    ap.add_argument("--ref", action="append", default=[], help="NAME=FOLDER of a reference model")
    ap.add_argument("--text", help="file of held-out general text, one document per line")
    ap.add_argument("--prompt", action="append", default=[])
    args = ap.parse_args(argv)
    text = Path(args.text).read_text() if args.text else None
    result = smoke_test(args.model, dict(r.split("=", 1) for r in args.ref), text, args.prompt)
    for c in result.checks:
        print(f"{c.status:<8} {c.name:<14} {c.message}")
    print(f"{'PASS' if result.passed else 'FAIL'} in {result.seconds:.2f} s")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
