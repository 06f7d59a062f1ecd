"""Tests of the rate, interval, agreement and summary arithmetic in ``scripts.report``."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import norm
from sklearn.metrics import cohen_kappa_score

from scripts.report import cohen_kappa, format_rate, format_table, rate_summary, summarise_verdicts, wilson_interval


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
