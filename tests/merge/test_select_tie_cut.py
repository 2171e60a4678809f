"""The trim's tie cut found through per-chunk histograms, far past the first chunk.

Deltas of a few bf16 steps tie at the threshold in their thousands; ``topk`` then locates the
chunk holding the cut from ``deltas_with_histograms``'s per-chunk rows. The bench model cuts
its embedding around position 27M; this test puts the cut in the fourth chunk and beyond.

    python -m pytest tests/merge/test_select_tie_cut.py -q
"""
import pytest
import torch

from mergeline.merge.methods.select import HIST_CHUNK, deltas_with_histograms, topk


def reference_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest |delta|, ties by lowest index: a stable sort, slow but obviously right."""
    order = torch.sort(delta.float().abs(), descending=True, stable=True).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


# (density, chunk the cut falls in): measured for this data, so each case checks what it claims
@pytest.mark.parametrize("density, cut_chunk", [(0.2, 3), (0.55, 4), (0.3, 0), (0.9, 1)])
def test_tie_cut_beyond_the_first_chunks_matches_a_stable_sort(density, cut_chunk):
    g = torch.Generator().manual_seed(3)
    n = 5 * HIST_CHUNK + 1234
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    # Deltas of 0, 1, 2 or 3 bf16-sized steps: huge tie groups at every magnitude.
    steps = torch.randint(-3, 4, (n,), generator=g).to(torch.bfloat16) * 2.0**-7
    model = (base.float() + steps.float()).to(torch.bfloat16)
    (delta,), (hist,) = deltas_with_histograms(base, [model])
    k = int(density * n)
    sel = topk(delta, k, hist)
    assert sel.cut // HIST_CHUNK == cut_chunk
    got = sel.mask(delta.float().abs())
    assert int(got.sum()) == k
    assert torch.equal(got, reference_mask(delta, k))
