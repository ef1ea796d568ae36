"""The champion rule compares like with like (`mg_ray.registry.champion_decision`)."""

from __future__ import annotations

import pytest

from mg_ray.registry import champion_decision, same_data

CHAMPION = {
    "dataset_fingerprint": "aaaa1111",
    "val_split": "val",
    "val_top1": "0.70",
    "test_top1": "0.99",
}


def never():
    raise AssertionError("the champion was re-evaluated although both were scored on the same data")


def test_on_the_same_data_the_recorded_scores_decide_and_test_is_never_used():
    candidate = {"dataset_fingerprint": "aaaa1111", "val_split": "val", "test_top1": "0.10"}
    takes, why = champion_decision(CHAMPION, candidate, 0.75, "val_top1", "max", never)
    assert takes and "same data" in why and "0.7500 vs champion's 0.7000" in why
    takes, _ = champion_decision(CHAMPION, candidate, 0.65, "val_top1", "max", never)
    assert not takes
    takes, _ = champion_decision(CHAMPION, candidate, 0.65, "val_top1", "min", never)  # a loss, say
    assert takes


@pytest.mark.parametrize(
    "candidate",
    [
        {"dataset_fingerprint": "bbbb2222", "val_split": "val"},  # another dataset
        {"dataset_fingerprint": "aaaa1111", "val_split": "test"},  # another split of the same one
        {"dataset_fingerprint": "unknown", "val_split": "val"},  # unknown data is never the same
    ],
)
def test_on_other_data_a_better_score_takes_champion_only_against_the_champions_re_evaluation(
    candidate,
):
    assert not same_data(CHAMPION, candidate)
    # 0.80 beats the champion's recorded 0.70, but on this data the champion scores 0.85: it stays
    takes, why = champion_decision(CHAMPION, candidate, 0.80, "val_top1", "max", lambda: 0.85)
    assert not takes and "re-evaluated" in why and "0.8000 vs champion's 0.8500" in why
    takes, _ = champion_decision(CHAMPION, candidate, 0.80, "val_top1", "max", lambda: 0.60)
    assert takes


def test_a_champion_that_cannot_be_evaluated_on_the_candidates_data_stays():
    def cannot():
        raise ValueError("the model has 32 classes, the dataset 10")

    takes, why = champion_decision(
        CHAMPION,
        {"dataset_fingerprint": "bbbb2222", "val_split": "val"},
        0.99,
        "val_top1",
        "max",
        cannot,
    )
    assert not takes and "could not be evaluated" in why and "32 classes" in why
