"""Tests of the split helpers: determinism, stratification, duplicate safety, held-out sources, balancing."""

from __future__ import annotations

from collections import Counter

import pytest

from scripts.data_splits import (
    SPLIT_ROLE_EVAL_ONLY,
    SPLIT_ROLE_KEY,
    balanced_subsample,
    benign_with_lookalikes,
    calibration_split,
    dedupe_records,
    exclude_eval_only,
    is_eval_only,
    leave_one_source_out,
    normalize_text,
    overlapping_texts,
    oversample_benign,
    subsample_per_category,
    train_test_split,
    train_val_test_split,
)
from scripts.records import PromptRecord


def make(prompt: str, label: str = "harmful", category: str = "a", source: str = "s1", **meta) -> PromptRecord:
    return PromptRecord(prompt=prompt, label=label, category=category, source=source, meta=meta)


def strata_records() -> list[PromptRecord]:
    """Ten records in each of four (label, category) strata, all distinct after normalisation."""
    records = []
    for label in ("harmful", "benign"):
        for category in ("a", "b"):
            records.extend(make(f"{label} {category} prompt number {i}", label, category) for i in range(10))
    return records


def sides_of(split) -> dict[str, str]:
    return {r.id: side for side in ("train", "val", "test") for r in getattr(split, side)}


def test_normalize_text_ignores_case_spacing_and_punctuation() -> None:
    assert normalize_text("  How do I   bake Cookies?! ") == "how do i bake cookies"
    assert normalize_text("how-do_I bake...cookies") == "how do i bake cookies"
    assert normalize_text("Cookies") != normalize_text("Cookie")


def test_split_is_deterministic_under_a_seed_and_changes_with_it() -> None:
    records = strata_records()
    first = train_val_test_split(records, seed=7)
    assert sides_of(first) == sides_of(train_val_test_split(records, seed=7))
    assert sides_of(first) != sides_of(train_val_test_split(records, seed=8))


def test_split_is_stratified_by_label_and_category() -> None:
    split = train_val_test_split(strata_records(), val_fraction=0.1, test_fraction=0.2, seed=0)
    for side, expected in (("train", 7), ("val", 1), ("test", 2)):
        counts = Counter((r.label, r.category) for r in getattr(split, side))
        assert counts == {("harmful", "a"): expected, ("harmful", "b"): expected,
                          ("benign", "a"): expected, ("benign", "b"): expected}  # fmt: skip


def test_split_keeps_input_order_within_each_side() -> None:
    records = strata_records()
    split = train_val_test_split(records, seed=3)
    for side in (split.train, split.val, split.test):
        positions = [records.index(r) for r in side]
        assert positions == sorted(positions)
    assert sorted(map(records.index, split.train + split.val + split.test)) == list(range(len(records)))


def test_near_duplicates_never_cross_a_split() -> None:
    records = strata_records()
    twins = [make("How do I bake cookies?", "benign", "a"), make("how do i bake  COOKIES", "benign", "b", source="s2")]
    twins += [make(f"Question {i}!", "harmful", "a") for i in range(5)] + [
        make(f"question {i}", "harmful", "b") for i in range(5)
    ]
    records += twins
    for seed in range(10):
        split = train_val_test_split(records, seed=seed)
        assert overlapping_texts(split.train, split.test) == set()
        assert overlapping_texts(split.train, split.val) == set()
        assert overlapping_texts(split.val, split.test) == set()
        side = sides_of(split)
        assert side[twins[0].id] == side[twins[1].id]


def test_eval_only_records_always_land_in_test() -> None:
    held = [make(f"over-refusal {i}", "benign", "a", **{SPLIT_ROLE_KEY: SPLIT_ROLE_EVAL_ONLY}) for i in range(6)]
    split = train_val_test_split(strata_records() + held, seed=1)
    assert all(r in split.test for r in held)
    assert not any(is_eval_only(r) for r in split.train + split.val)
    assert exclude_eval_only(held + strata_records()[:2]) == strata_records()[:2]


def test_train_test_split_has_no_validation_side() -> None:
    train, test = train_test_split(strata_records(), test_fraction=0.3, seed=0)
    assert len(test) == 12 and len(train) == 28


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        train_val_test_split(strata_records(), test_fraction=1.0)
    with pytest.raises(ValueError, match="must be < 1"):
        train_val_test_split(strata_records(), val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(
        ValueError, match=r"unknown stratify field\(s\) \['prompt'\]; valid: \['label', 'category', 'source'\]"
    ):
        train_val_test_split(strata_records(), stratify_by=("prompt",))


def test_subsample_per_category_caps_each_group_seeded_in_order() -> None:
    records = strata_records()
    sample = subsample_per_category(records, 3, seed=5)
    assert Counter((r.label, r.category) for r in sample) == {
        ("harmful", "a"): 3, ("harmful", "b"): 3, ("benign", "a"): 3, ("benign", "b"): 3,
    }  # fmt: skip
    assert sample == subsample_per_category(records, 3, seed=5)
    assert sample != subsample_per_category(records, 3, seed=6)
    assert [records.index(r) for r in sample] == sorted(records.index(r) for r in sample)
    assert subsample_per_category(records, 100) == records
    with pytest.raises(ValueError, match="per_category must be >= 0"):
        subsample_per_category(records, -1)


def test_leave_one_source_out_holds_out_exactly_one_source() -> None:
    records = [
        make("Shared prompt.", source="s1"),
        make("Only in s1.", source="s1"),
        make("Eval only in s1.", "benign", source="s1", **{SPLIT_ROLE_KEY: SPLIT_ROLE_EVAL_ONLY}),
        make("shared prompt", source="s2"),
        make("Only in s2.", source="s2"),
        make("Only in s3.", "benign", source="s3"),
    ]
    train, test = leave_one_source_out(records, "s2")
    assert [r.prompt for r in test] == ["shared prompt", "Only in s2."]
    assert [r.prompt for r in train] == ["Only in s1.", "Only in s3."]
    with pytest.raises(ValueError, match=r"unknown source 's4'; sources present: \['s1', 's2', 's3'\]"):
        leave_one_source_out(records, "s4")


def test_dedupe_keeps_first_of_each_normalised_text() -> None:
    records = [make("Hello, world"), make("hello world!", source="s2"), make("Other")]
    assert dedupe_records(records) == [records[0], records[2]]


def test_oversample_benign_per_category_matches_harmful_counts() -> None:
    records = (
        [make(f"harm a {i}", "harmful", "a") for i in range(5)]
        + [make(f"harm b {i}", "harmful", "b") for i in range(2)]
        + [make(f"look-alike a {i}", "benign", "a") for i in range(2)]
        + [make(f"look-alike b {i}", "benign", "b") for i in range(3)]
        + [make("plain benign", "benign", "benign")]
    )
    balanced = oversample_benign(records, seed=0)
    assert balanced[: len(records)] == records
    counts = Counter((r.label, r.category) for r in balanced)
    assert counts[("benign", "a")] == 5  # two whole copies of both, plus one of them again
    assert counts[("benign", "b")] == 3  # already more than the two harmful ones: nothing dropped
    assert counts[("benign", "benign")] == 1
    extra = [r.prompt for r in balanced[len(records) :]]
    assert extra[:2] == ["look-alike a 0", "look-alike a 1"] and extra[2] in extra[:2] and len(extra) == 3
    assert oversample_benign(records, seed=0) == balanced


def test_oversample_benign_max_category_matches_the_largest_category() -> None:
    records = [make(f"harm a {i}", "harmful", "a") for i in range(4)] + [make("harm b", "harmful", "b")]
    records += [make("benign 0", "benign", "benign"), make("benign 1", "benign", "benign")]
    balanced = oversample_benign(records, target="max_category")
    assert Counter(r.label for r in balanced)["benign"] == 4
    with pytest.raises(ValueError, match=r"unknown target 'total'; valid: \['per_category', 'max_category'\]"):
        oversample_benign(records, target="total")


def _benign_pool() -> list[PromptRecord]:
    """30 plain benign records of two sources and 12 look-alikes over three (source, category) groups."""
    plain = [make(f"plain {source} {i}", "benign", "benign", source) for source in ("p1", "p2") for i in range(15)]
    lookalikes = ([make(f"bbq {i}", "benign", "discrimination", "bbq") for i in range(8)]
                  + [make(f"pairs {i}", "benign", "malicious_uses", "pairs") for i in range(2)]
                  + [make(f"pairs info {i}", "benign", "information_hazards", "pairs") for i in range(2)])
    return plain + lookalikes


def test_balanced_subsample_keeps_small_groups_whole_and_evens_out_large_ones() -> None:
    records = _benign_pool()
    chosen = balanced_subsample(records, 12, seed=1)
    counts = Counter((r.source, r.category) for r in chosen)
    # Five groups, budget 12: the two-record groups are kept whole, the other three share the rest evenly.
    assert counts[("pairs", "malicious_uses")] == counts[("pairs", "information_hazards")] == 2
    assert sorted(counts[key] for key in (("p1", "benign"), ("p2", "benign"), ("bbq", "discrimination"))) == [2, 3, 3]
    assert [r for r in records if r in chosen] == chosen  # input order
    assert chosen == balanced_subsample(records, 12, seed=1)
    assert balanced_subsample(records, 100, seed=1) == records


def test_benign_with_lookalikes_takes_the_requested_share_and_fills_a_short_side() -> None:
    records = _benign_pool()
    half = benign_with_lookalikes(records, 20, seed=0)
    assert len(half) == 20 and sum(r.category != "benign" for r in half) == 10
    assert Counter(r.source for r in half if r.category == "benign") == {"p1": 5, "p2": 5}
    # 12 look-alikes exist: asking for 30 at fraction 0.5 takes all 12 and 18 plain ones.
    most = benign_with_lookalikes(records, 30, seed=0)
    assert sum(r.category != "benign" for r in most) == 12 and len(most) == 30
    # Too few plain records: the look-alikes fill the gap.
    few_plain = [r for r in records if r.category != "benign"] + [r for r in records if r.category == "benign"][:3]
    assert len(benign_with_lookalikes(few_plain, 14, seed=0, lookalike_fraction=0.25)) == 14
    assert all(r.category == "benign" for r in benign_with_lookalikes(records, 10, seed=0, lookalike_fraction=0.0))
    with pytest.raises(ValueError, match="lookalike_fraction"):
        benign_with_lookalikes(records, 10, lookalike_fraction=1.5)


def test_calibration_split_divides_an_eval_only_set_by_category_keeping_near_duplicates_together() -> None:
    role = {SPLIT_ROLE_KEY: SPLIT_ROLE_EVAL_ONLY}
    records = [make(f"look-alike {category} {i}", "benign", category, "over", **role)
               for category in ("a", "b") for i in range(10)]
    records.append(make("LOOK-ALIKE a 3!", "benign", "a", "over", **role))  # a near-duplicate of one above
    calibration, evaluation = calibration_split(records, 0.5, seed=4)
    assert len(calibration) + len(evaluation) == len(records) and not {r.id for r in calibration} & {r.id for r in evaluation}
    assert Counter(r.category for r in calibration)["b"] == 5
    twin = normalize_text("look-alike a 3")
    sides = [side for side, members in (("cal", calibration), ("eval", evaluation)) for r in members
             if normalize_text(r.prompt) == twin]
    assert len(sides) == 2 and len(set(sides)) == 1
    assert all(is_eval_only(r) for r in calibration + evaluation)  # the records themselves are unchanged
    assert (calibration, evaluation) == calibration_split(records, 0.5, seed=4)
    assert calibration != calibration_split(records, 0.5, seed=5)[0]
    with pytest.raises(ValueError, match="calibration_fraction"):
        calibration_split(records, 1.0)

