import pytest
import torch

from compress.errors import CompressError
from compress.sparsity.masks import check_mask, nm_mask, parse_pattern, pruned_per_row, unstructured_mask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_prunes_exactly_n_of_every_m_and_the_lowest(n, m):
    scores = torch.rand(7, 4 * m)
    keep = nm_mask(scores, n, m)
    groups, kept = scores.view(-1, m), keep.view(-1, m)
    assert bool((kept.sum(dim=1) == m - n).all())
    # every pruned score is below every kept score of its group
    highest_pruned = torch.where(kept, -torch.inf, groups).amax(dim=1)
    lowest_kept = torch.where(kept, groups, torch.inf).amin(dim=1)
    assert bool((highest_pruned <= lowest_kept).all())
    check_mask(keep, f"{n}:{m}", None, "l")


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77])
@pytest.mark.parametrize("per_row", [True, False])
def test_unstructured_mask_is_exact_per_layer(ratio, per_row):
    scores = torch.rand(7, 13)  # 91 weights: no ratio here divides evenly
    keep = unstructured_mask(scores, ratio, per_row)
    assert 91 - int(keep.sum()) == round(ratio * 91)
    if per_row:  # every row prunes its share, to within one
        pruned = 13 - keep.sum(dim=1)
        assert int(pruned.max() - pruned.min()) <= 1
        assert torch.equal(pruned, pruned_per_row(ratio, 7, 13))
    elif ratio > 0:  # the lowest scores of the whole layer
        assert float(scores[~keep].max()) < float(scores[keep].min())
    check_mask(keep, "unstructured", ratio, "l")


def test_check_mask_names_the_layer_and_the_mismatch():
    keep = torch.ones(4, 8, dtype=torch.bool)
    keep[:, ::2] = False
    keep[0, 1] = False  # one group of row 0 keeps 1 instead of 2
    with pytest.raises(CompressError, match=r"q_proj: 1 groups of 4 do not keep exactly 2 weights \(2:4\)"):
        check_mask(keep, "2:4", None, "q_proj")
    with pytest.raises(CompressError, match=r"q_proj: pruned 17 weights, expected 16"):
        check_mask(keep, "unstructured", 0.5, "q_proj")


@pytest.mark.parametrize("bad", ["2:2", "0:4", "5:4", "a:b", "2:4:8", "2-4", "1:128"])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(ValueError, match="pattern must be 'unstructured' or 'N:M'"):
        parse_pattern(bad)
