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


@pytest.mark.slow  # ~20 s on an idle 2-core machine: two trainings, saves and samplings at toy size
def test_a_tiny_run_trains_saves_samples_and_reproduces_its_figures(tmp_path):
    """The whole bench at toy size, twice with one seed: the same scores, AUCs and cliques (not timings)."""
    from bench.memorization import main

    argv = ["--memorised", "2", "--repeats", "2", "--others", "2", "--per-other", "2", "--size", "16"]
    argv += ["--steps", "3", "--vae-steps", "2", "--batch", "4", "--per-prompt", "2", "--sample-steps", "2"]
    runs = [main([*argv, "--out", str(tmp_path / name)]) for name in ("a", "b")]
    assert (tmp_path / "a" / "model" / "model_index.json").exists()  # a diffusers folder
    for run in runs:
        for key in ("vae_seconds", "unet_seconds"):
            run["training"].pop(key)
        run.pop("sampling_seconds")
        run.pop("machine")
    assert runs[0] == runs[1]
    assert [p["memorised"] for p in runs[0]["prompts"]] == [True, True, False, False]
    assert all(p["score"] > 0 for p in runs[0]["prompts"]) and 0 <= runs[0]["auc_first_step"] <= 1
