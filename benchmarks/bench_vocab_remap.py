"""Speed of rebuilding embedding rows for a tokenizer merge (merge/tokenizer_merge.py), against
mergekit 0.1.5's own code for the same rows (`PermutedVocabulary.execute`, one Python step per
token), on the same synthetic vocabulary. Both must give the same tensors (checked).

Setup: a Llama-3-sized vocabulary (128,256 tokens) of width --width, two models; the second added
--added tokens the first lacks (their rows come from the second), union vocabulary.

    python benchmarks/bench_vocab_remap.py                 # width 512
    python benchmarks/bench_vocab_remap.py --width 4096    # a 8B model's embedding (2 GB per model, fp32)

Timings on a shared 2-core machine are noisy: the best of --repeat runs is printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mergeline.merge.tokenizer_merge import TokenizerInfo, remap_rows  # noqa: E402


class _Vocab:
    """The one method both implementations ask of a tokenizer."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--added", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    n = args.vocab + args.added
    vocab = _Vocab({f"tok{i}": i for i in range(n)})
    perms = {"a": {i: (i if i < args.vocab else -1) for i in range(n)}, "b": {i: i for i in range(n)}}
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(args.vocab, args.width, generator=g), "b": torch.randn(n, args.width, generator=g)}

    ours_s, ours = _best(lambda: remap_rows(TokenizerInfo(vocab, perms, {}, n), tensors, "a", {}), args.repeat)
    print(f"mergeline remap_rows:          {ours_s:7.2f} s  ({n} tokens x {args.width}, 2 models)")
    try:
        from mergekit.common import ModelReference
        from mergekit.tokenizer.build import TokenizerInfo as MkInfo
        from mergekit.tokenizer.embed import PermutedVocabulary
    except ImportError:
        print("mergekit not installed (the test extra): no comparison")
        return
    a, b = ModelReference.parse("a"), ModelReference.parse("b")
    info = MkInfo.model_construct(tokenizer=vocab, permutations={a: perms["a"], b: perms["b"]}, original_vocabs={})
    task = PermutedVocabulary.model_construct(tokens=None, pad_to_multiple_of=None, base_model=a, vocabulary_axis=0)
    theirs_s, theirs = _best(lambda: task.execute(tokenizer_info=info, tensors={a: tensors["a"], b: tensors["b"]}),
                             args.repeat)
    print(f"mergekit PermutedVocabulary:   {theirs_s:7.2f} s")
    same = all(torch.equal(ours[k], theirs[r]) for k, r in (("a", a), ("b", b)))
    print(f"same tensors: {same}; speed-up {theirs_s / ours_s:.1f}x")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
