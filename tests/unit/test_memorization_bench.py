"""bench.memorization's own logic: the training set plan and the AUC, on inputs counted by hand."""

import pytest

from bench.memorization import plan_captions, roc_auc


def test_plan_gives_memorised_captions_one_repeated_image_and_others_distinct_images():
    captions = plan_captions(memorised=2, repeats=3, others=2, per_other=4)
    assert [c.memorised for c in captions] == [True, True, False, False]
    assert [c.images for c in captions] == [(0, 0, 0), (1, 1, 1), (2, 3, 4, 5), (6, 7, 8, 9)]
    assert len({c.text for c in captions}) == 4 and all(c.text for c in captions)
    # no image is shared between captions
    owners = {i: c.text for c in captions for i in c.images}
    assert sum(len(set(c.images)) for c in captions) == len(owners) == 10


def test_plan_captions_are_distinct_for_the_default_sizes():
    captions = plan_captions(memorised=16, repeats=1, others=16, per_other=1)
    assert len({c.text for c in captions}) == 32


def test_auc_counts_ordered_pairs_and_half_ties():
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    # pairs (p, n): (2,1) win, (2,3) loss, (3,1) win, (3,3) tie -> (2 + 0.5) / 4
    assert roc_auc([2, 3], [1, 3]) == pytest.approx(0.625)
    with pytest.raises(ValueError):
        roc_auc([], [1.0])
