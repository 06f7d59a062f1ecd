"""Tests of ``refusal_tradeoff_plot.py``: points come from the judge's files, the images are valid."""

from __future__ import annotations

import json
import random
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest

import refusal_tradeoff_plot as rtp
from scripts.records import write_jsonl
from scripts.report import summarise_verdicts, wilson_interval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PDF_MAGIC = b"%PDF-"

# condition -> (refusals among 20 harmful, refusals among 20 benign)
COUNTS = {"baseline": (10, 2), "refusal_tokens": (17, 5), "steer_malicious": (19, 1), "only_harmful": (12, None)}


def _verdict_rows(judge: str = "phrase") -> list[dict]:
    rows = []
    for condition, (harmful_k, benign_k) in COUNTS.items():
        for label, k in (("harmful", harmful_k), ("benign", benign_k)):
            if k is None:
                continue
            for i in range(20):
                rows.append(
                    {
                        "id": f"{condition}-{label}-{i}",
                        "condition": condition,
                        "label": label,
                        "category": "malicious_uses",
                        "judge": judge,
                        "is_refusal": i < k,
                    }
                )
        # One error row per condition: it must not move any point.
        rows.append(
            {
                "id": f"{condition}-err",
                "condition": condition,
                "label": "harmful",
                "category": "x",
                "judge": judge,
                "is_refusal": None,
                "error": "no refusal token",
            }
        )
    return rows


def _plotted_conditions() -> set[str]:
    return {c for c, (_, benign_k) in COUNTS.items() if benign_k is not None}


def test_points_come_from_the_verdicts() -> None:
    points = {p.condition: p for p in rtp.tradeoff_points(_verdict_rows())}
    assert set(points) == _plotted_conditions()
    base = points["baseline"]
    assert base.refusal_rate == pytest.approx(10 / 20) and base.over_refusal_rate == pytest.approx(2 / 20)
    assert base.refusal_ci == pytest.approx(wilson_interval(10, 20))
    assert base.n_harmful == 20 and base.n_benign == 20


def test_plot_tradeoff_writes_valid_png_pdf_and_one_point_per_condition(tmp_path: Path) -> None:
    png = rtp.plot_tradeoff(_verdict_rows(), tmp_path / "fig" / "tradeoff.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert png.with_suffix(".pdf").read_bytes()[:5] == PDF_MAGIC
    metadata = json.loads(png.with_suffix(".points.json").read_text())
    assert metadata["judge"] == "phrase"
    assert {p["condition"] for p in metadata["points"]} == _plotted_conditions()
    assert len(metadata["points"]) == len(_plotted_conditions())


def test_draw_tradeoff_draws_each_point_at_its_rates() -> None:
    points = rtp.tradeoff_points(summarise_verdicts(_verdict_rows()))
    fig, ax = plt.subplots()
    containers = rtp.draw_tradeoff(ax, points)
    assert len(containers) == len(points) == len(_plotted_conditions())
    for container, point in zip(containers, points):
        x, y = container.lines[0].get_data()
        assert (x[0], y[0]) == pytest.approx((point.over_refusal_rate, point.refusal_rate))
    labels = {text.get_text() for text in ax.texts}
    assert labels == _plotted_conditions()
    plt.close(fig)


def _point(condition: str, over_refusal: float, refusal: float) -> rtp.TradeoffPoint:
    return rtp.TradeoffPoint(condition, over_refusal, (over_refusal, over_refusal), refusal, (refusal, refusal), 10, 10)


def test_labels_of_coinciding_and_nearby_points_do_not_overprint() -> None:
    points = [_point("base", 0.2, 0.84), _point("categorical", 0.2, 0.84), _point("low_rank", 0.147, 0.87),
              _point("probe", 0.173, 0.87), _point("logit_bias", 0.067, 0.70)]  # fmt: skip
    labels = rtp.point_labels(points)
    assert labels[1] is None  # categorical sits on base: one shared label
    assert [label[0] for label in labels if label] == ["base = categorical", "low_rank", "probe", "logit_bias"]
    x = 0.2 + 0.03  # right of the widest interval (here every interval is its point)
    expected = {"low_rank": (x, 0.87), "probe": (x, 0.87 - 0.045), "base = categorical": (x, 0.87 - 0.09),
                "logit_bias": (x, 0.70)}  # fmt: skip
    for text, position in (label for label in labels if label):
        assert position == pytest.approx(expected[text])
    fig, ax = plt.subplots()
    rtp.draw_tradeoff(ax, points)
    assert sorted(text.get_text() for text in ax.texts) == ["base = categorical", "logit_bias", "low_rank", "probe"]
    plt.close(fig)


def test_report_json_and_verdicts_give_the_same_points(tmp_path: Path) -> None:
    rows = _verdict_rows()
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(summarise_verdicts(rows)))
    verdicts_path = tmp_path / "verdicts.jsonl"
    write_jsonl(verdicts_path, rows)
    from_report = rtp.tradeoff_points(rtp.load_plot_input([report_path]))
    from_rows = rtp.tradeoff_points(rtp.load_plot_input([verdicts_path]))
    assert from_report == from_rows


def test_judge_choice() -> None:
    rows = _verdict_rows("phrase") + _verdict_rows("azure")
    report = summarise_verdicts(rows)
    assert rtp.choose_judge(report) == "azure"
    assert rtp.choose_judge(report, "phrase") == "phrase"
    with pytest.raises(ValueError, match="available"):
        rtp.choose_judge(report, "token")


def _sweep_rows() -> list[dict]:
    rng = random.Random(0)
    rows = []
    for condition, slope in (("steer_malicious", 0.3), ("steer_all", 0.15)):
        for strength in (0.0, 1.0, 2.0, 3.0):
            for label, base in (("harmful", 0.3), ("benign", 0.05)):
                p = min(1.0, base + slope * strength * (1.0 if label == "harmful" else 0.5))
                for i in range(30):
                    rows.append(
                        {
                            "id": f"{condition}-{strength}-{label}-{i}",
                            "condition": condition,
                            "label": label,
                            "strength": strength,
                            "judge": "token",
                            "is_refusal": rng.random() < p,
                        }
                    )
    return rows


def test_strength_sweep_plots_a_curve_per_condition(tmp_path: Path) -> None:
    png = rtp.plot_strength_sweep(_sweep_rows(), tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and mpimg.imread(png).ndim == 3
    assert png.with_suffix(".pdf").read_bytes()[:5] == PDF_MAGIC
    curves = json.loads(png.with_suffix(".points.json").read_text())["curves"]
    assert set(curves) == {"steer_malicious", "steer_all"}
    for points in curves.values():
        assert [p["strength"] for p in points] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="strength"):
        rtp.plot_strength_sweep(_verdict_rows(), tmp_path / "none.png")


def test_cli(tmp_path: Path) -> None:
    verdicts = tmp_path / "verdicts.jsonl"
    write_jsonl(verdicts, _verdict_rows() + _sweep_rows())
    assert (
        rtp.main(
            [
                str(verdicts),
                "--out",
                str(tmp_path / "t.png"),
                "--sweep-out",
                str(tmp_path / "s.png"),
                "--judge",
                "phrase",
            ]
        )
        == 2
    )  # the phrase judge has no strength rows
    assert rtp.main([str(verdicts), "--out", str(tmp_path / "t.png"), "--judge", "phrase"]) == 0
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC
    assert (
        rtp.main(
            [
                str(verdicts),
                "--out",
                str(tmp_path / "t2.png"),
                "--sweep-out",
                str(tmp_path / "s.png"),
                "--judge",
                "token",
            ]
        )
        == 0
    )
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    empty = tmp_path / "empty.jsonl"
    write_jsonl(empty, [{"judge": "phrase", "is_refusal": True, "label": "harmful"}])
    assert rtp.main([str(empty), "--out", str(tmp_path / "e.png")]) == 2
