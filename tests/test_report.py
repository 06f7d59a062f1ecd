"""Tests of the rate, interval, agreement, paired comparison and summary arithmetic in ``scripts.report``."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import binomtest, norm
from sklearn.metrics import cohen_kappa_score

from scripts.report import (
    cohen_kappa,
    format_rate,
    format_table,
    mcnemar_exact_p,
    paired_against_reference,
    paired_difference,
    rate_summary,
    summarise_verdicts,
    wilson_interval,
)


def _wilson_by_inversion(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson interval as the set of p whose score test does not reject, found by bisection."""
    p_hat = k / n

    def inside(p: float) -> bool:
        return (p_hat - p) ** 2 <= z * z * p * (1 - p) / n

    def boundary(lo: float, hi: float) -> float:
        # ``lo`` is inside the interval and ``hi`` outside (or the other way round).
        lo_inside = inside(lo)
        for _ in range(200):
            mid = (lo + hi) / 2
            if inside(mid) == lo_inside:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if inside(0.0) else boundary(p_hat, 0.0)
    high = 1.0 if inside(1.0) else boundary(p_hat, 1.0)
    return low, high


@pytest.mark.parametrize("k,n", [(0, 1), (0, 10), (1, 10), (5, 10), (10, 10), (37, 113), (999, 1000)])
@pytest.mark.parametrize("z", [1.0, 1.96, 2.576])
def test_wilson_interval_matches_score_test_inversion(k: int, n: int, z: float) -> None:
    low, high = wilson_interval(k, n, z)
    ref_low, ref_high = _wilson_by_inversion(k, n, z)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_interval_published_values() -> None:
    # 95% Wilson intervals tabulated by Newcombe (1998), Table I, rows 81/263 and 15/148.
    low, high = wilson_interval(81, 263, norm.ppf(0.975))
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(15, 148, norm.ppf(0.975))
    assert (round(low, 4), round(high, 4)) == (0.0624, 0.1605)


@pytest.mark.parametrize("k,n", [(0, 0), (-1, 5), (6, 5)])
def test_wilson_interval_rejects_bad_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_cohen_kappa_matches_sklearn_on_random_labels() -> None:
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 60)
        a = [rng.random() < 0.4 for _ in range(n)]
        b = [x if rng.random() < 0.7 else not x for x in a]
        if len(set(a)) == 1 and set(a) == set(b):
            continue
        assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def test_cohen_kappa_multiclass_and_degenerate() -> None:
    a = ["x", "y", "z", "x", "y", "x"]
    b = ["x", "y", "y", "x", "z", "z"]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert math.isnan(cohen_kappa([True, True], [True, True]))
    assert cohen_kappa([True, False], [False, True]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        cohen_kappa([True], [True, False])


def test_rate_summary_excludes_errors() -> None:
    summary = rate_summary([True, True, False, None, None])
    assert summary["n"] == 3 and summary["k"] == 2 and summary["n_errors"] == 2
    assert summary["rate"] == pytest.approx(2 / 3)
    empty = rate_summary([None])
    assert empty["rate"] is None and empty["n_errors"] == 1


def _rows() -> list[dict]:
    rows = []
    spec = [
        ("baseline", "harmful", "malicious_uses", [True, True, True, False]),
        ("baseline", "benign", "malicious_uses", [False, False, True, None]),
        ("steer", "harmful", "information_hazards", [True, True, True, True]),
        ("steer", "benign", "information_hazards", [True, False, False, False]),
    ]
    for condition, label, category, verdicts in spec:
        for i, verdict in enumerate(verdicts):
            item = f"{condition}-{label}-{i}"
            rows.append(
                {
                    "id": item,
                    "judge": "phrase",
                    "condition": condition,
                    "label": label,
                    "category": category,
                    "is_refusal": verdict,
                }
            )
            # A second judge that disagrees on exactly one harmful baseline item.
            flip = condition == "baseline" and label == "harmful" and i == 0
            rows.append(
                {
                    "id": item,
                    "judge": "azure",
                    "condition": condition,
                    "label": label,
                    "category": category,
                    "is_refusal": (not verdict) if flip and verdict is not None else verdict,
                }
            )
    return rows


def test_summarise_verdicts_groups_metrics_and_kappa() -> None:
    report = summarise_verdicts(_rows())
    assert report["confidence"] == pytest.approx(0.95, abs=1e-3)
    phrase = {(g["condition"], g["label"]): g for g in report["judges"]["phrase"]["groups"]}
    harmful = phrase[("baseline", "harmful")]
    assert harmful["metric"] == "refusal_rate" and harmful["n"] == 4 and harmful["k"] == 3
    benign = phrase[("baseline", "benign")]
    assert benign["metric"] == "over_refusal_rate" and benign["n"] == 3 and benign["n_errors"] == 1
    assert benign["ci"] == pytest.approx(wilson_interval(1, 3))
    assert benign["per_category"]["malicious_uses"]["n"] == 3
    assert report["judges"]["phrase"]["n_errors"] == 1
    (pair,) = report["agreement"]
    assert pair["judges"] == ["azure", "phrase"] and pair["n"] == 15 and pair["n_excluded"] == 1
    a = [r["is_refusal"] for r in _rows() if r["judge"] == "azure" and r["is_refusal"] is not None]
    b = [r["is_refusal"] for r in _rows() if r["judge"] == "phrase" and r["is_refusal"] is not None]
    assert pair["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    table = format_table(report)
    assert "over_refusal_rate" in table and "Cohen's kappa" in table


def test_summarise_verdicts_strength_groups() -> None:
    rows = [
        {"id": str(i), "judge": "token", "condition": "steer", "label": "harmful", "strength": s, "is_refusal": v}
        for i, (s, v) in enumerate([(0.0, False), (0.0, False), (1.0, True), (1.0, False), (2.0, True)])
    ]
    groups = summarise_verdicts(rows)["judges"]["token"]["strength_groups"]
    assert [(g["strength"], g["k"], g["n"]) for g in groups] == [(0.0, 0, 2), (1.0, 1, 2), (2.0, 1, 1)]


def test_agreement_keeps_items_apart_that_share_an_id() -> None:
    # One prompt id under two conditions: two items, matched by input line.
    rows = []
    for line, (condition, a, b) in enumerate([("base", True, True), ("steer", False, True)], start=1):
        for judge, verdict in (("azure", a), ("phrase", b)):
            rows.append(
                {
                    "id": "p1",
                    "condition": condition,
                    "source_file": "r.jsonl",
                    "source_line": line,
                    "judge": judge,
                    "is_refusal": verdict,
                }
            )
    (pair,) = summarise_verdicts(rows)["agreement"]
    assert pair["n"] == 2 and pair["agreement"] == 0.5


def test_format_rate_rounds_to_three_places_and_marks_missing_rates() -> None:
    assert [format_rate(value) for value in (0.82, 2 / 3, 0.0, 1.0, None)] == ["0.820", "0.667", "0.000", "1.000", "-"]


def test_summarise_verdicts_rates_one_output_set_by_source_label_and_judge() -> None:
    rng = random.Random(5)
    rows = []
    for index in range(120):
        source, label = rng.choice(["dna", "harmbench", "rho"]), rng.choice(["harmful", "benign"])
        for judge in ("phrase", "token"):
            rows.append({"judge": judge, "id": str(index), "source": source, "label": label,
                         "is_refusal": rng.random() < (0.7 if judge == "phrase" else 0.5)})
    report = summarise_verdicts(rows, by=("source", "label"))
    for judge, summary in report["judges"].items():
        keys = [(group["source"], group["label"]) for group in summary["groups"]]
        assert keys == sorted({(r["source"], r["label"]) for r in rows})
        for group in summary["groups"]:
            members = [r for r in rows if r["judge"] == judge and r["source"] == group["source"]
                       and r["label"] == group["label"]]
            assert (group["n"], group["k"]) == (len(members), sum(r["is_refusal"] for r in members))
            assert group["metric"] == ("refusal_rate" if group["label"] == "harmful" else "over_refusal_rate")
            assert "condition" not in group
    assert report["agreement"][0]["n"] == 120
    with pytest.raises(ValueError, match="including 'label'"):
        summarise_verdicts(rows, by=("source",))


def _paired(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Verdict lists ``(a, b)`` of a paired table, pairs in a shuffled order."""
    pairs = [(True, True)] * both + [(True, False)] * a_only + [(False, True)] * b_only + [(False, False)] * neither
    random.Random(0).shuffle(pairs)
    return [x for x, _ in pairs], [y for _, y in pairs]


def test_paired_difference_published_values() -> None:
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables, ch. 8 (Cavo et al. 2012):
    # 59 both, 6 first only, 16 second only, 80 neither; Newcombe square-and-add: -0.0621 (-0.1186 to -0.0046)
    # for first minus second, so second minus first is 0.0621 (0.0046 to 0.1186).
    a, b = _paired(59, 6, 16, 80)
    result = paired_difference(a, b)
    assert result["n"] == 161 and result["n_errors"] == 0 and result["discordant"] == [6, 16]
    assert result["difference"] == pytest.approx(10 / 161) and round(result["difference"], 4) == 0.0621
    assert [round(bound, 4) for bound in result["ci"]] == [0.0046, 0.1186]
    # Exact McNemar by hand: 2 · P(X <= 6) for X ~ Binomial(22, 1/2).
    assert result["p_value"] == pytest.approx(2 * sum(math.comb(22, k) for k in range(7)) / 2**22, rel=1e-12)
    assert round(result["p_value"], 3) == 0.052
    swapped = paired_difference(b, a)
    assert swapped["difference"] == -result["difference"] and swapped["p_value"] == result["p_value"]
    assert swapped["ci"] == pytest.approx([-result["ci"][1], -result["ci"][0]], abs=1e-15)


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (0, 1), (1, 0), (3, 3), (2, 9), (10, 4), (0, 25), (40, 61)])
def test_mcnemar_exact_p_is_the_doubled_binomial_tail(a_only: int, b_only: int) -> None:
    n = a_only + b_only
    by_hand = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n)
    assert mcnemar_exact_p(a_only, b_only) == pytest.approx(by_hand, rel=1e-12)
    if n:
        assert mcnemar_exact_p(a_only, b_only) == pytest.approx(binomtest(a_only, n, 0.5).pvalue, rel=1e-9)


@pytest.mark.parametrize("table", [(0, 0, 0, 5), (5, 0, 0, 0), (0, 5, 0, 0), (0, 0, 5, 0), (3, 1, 4, 2),
                                   (1, 0, 9, 0), (40, 2, 3, 55), (0, 12, 0, 12), (7, 0, 0, 7)])
def test_paired_difference_interval_holds_the_estimate(table: tuple[int, int, int, int]) -> None:
    for confidence in (0.8, 0.95, 0.99):
        result = paired_difference(*_paired(*table), confidence=confidence)
        low, high = result["ci"]
        assert -1.0 <= low <= result["difference"] <= high <= 1.0
        assert result["difference"] == pytest.approx(result["rate_b"] - result["rate_a"])
    narrow, wide = (paired_difference(*_paired(*table), confidence=c)["ci"] for c in (0.8, 0.99))
    assert wide[0] <= narrow[0] and narrow[1] <= wide[1]


def test_paired_difference_drops_pairs_with_an_error() -> None:
    a, b = _paired(3, 1, 4, 2)
    with_errors_a = a[:5] + [None, True, None] + a[5:]
    with_errors_b = b[:5] + [False, None, None] + b[5:]
    result = paired_difference(with_errors_a, with_errors_b)
    assert result == {**paired_difference(a, b), "n_errors": 3}
    empty = paired_difference([None, True], [False, None])
    assert empty == {"n": 0, "n_errors": 2, "discordant": [0, 0], "rate_a": None, "rate_b": None,
                     "difference": None, "ci": None, "p_value": None}
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([True], [True, False])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([True], [False], confidence=1.0)


def test_paired_against_reference_pairs_each_condition_with_the_base_by_prompt_id_and_label():
    # Six benign prompts: base refuses 0-2, steered refuses 2-3 (and 0 errs); harmful: both refuse 0, steered also 1.
    def rows(condition, refused, label, errors=()):
        return [{"id": f"{label}{i}", "condition": condition, "label": label, "judge": "phrase",
                 "is_refusal": None if i in errors else i in refused} for i in range(6)]

    verdicts = (rows("base", {0, 1, 2}, "benign") + rows("steered", {2, 3}, "benign", errors={0})
                + rows("base", {0}, "harmful") + rows("steered", {0, 1}, "harmful")
                + [{**row, "judge": "token", "is_refusal": True} for row in rows("base", set(), "benign")])
    paired = paired_against_reference(verdicts, "phrase")
    assert set(paired) == {"steered"}
    benign = paired["steered"]["benign"]
    # Pairs 1..5 (0 dropped): base refuses 1, 2; steered refuses 2, 3 -> discordant: base only {1}, steered only {3}.
    assert (benign["n"], benign["n_errors"], benign["discordant"]) == (5, 1, [1, 1])
    assert benign["difference"] == 0.0
    assert paired["steered"]["harmful"]["difference"] == pytest.approx(1 / 6)
    assert paired["steered"]["harmful"]["p_value"] == mcnemar_exact_p(0, 1)
    with pytest.raises(ValueError, match="reference condition 'none'"):
        paired_against_reference(verdicts, "phrase", reference="none")
