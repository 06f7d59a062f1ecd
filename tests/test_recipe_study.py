"""The recipe study's table: cells only over prompts a recipe never trained on, paired against the reference."""

from __future__ import annotations

import pytest

from scripts.recipe_study import recipe_name, study_markdown, study_table
from scripts.records import PromptRecord
from scripts.report import paired_difference


def _record(index: int, label: str, source: str = "look") -> PromptRecord:
    return PromptRecord(id=f"{source}-{index}", prompt=f"prompt {index}", label=label,
                        category="benign" if label == "benign" else "malicious_uses", source=source)  # fmt: skip


def test_recipe_names_sort_the_left_out_sources():
    assert recipe_name(0.6, ["rho_refusal_pairs", "rho_bbq"]) == "benign0.6_without_rho_bbq+rho_refusal_pairs"
    assert recipe_name(1.2, []) == "benign1.2"


def test_cells_leave_out_trained_prompts_and_pair_on_the_shared_ones():
    benign = [_record(i, "benign") for i in range(6)]
    harmful = [_record(i, "harmful", "dna") for i in range(6, 10)]
    sets = {"look": benign, "dna": harmful}
    decisions = {
        "a": {r.id: i % 2 == 0 for i, r in enumerate(benign + harmful)},
        "b": {r.id: False for r in benign + harmful},
    }
    trained = {"a": set(), "b": {"look-0", "look-1"}}
    table = study_table(decisions, trained, sets, reference="a")
    cell_a, cell_b = table["look"]["benign"]["a"], table["look"]["benign"]["b"]
    assert (cell_a["k"], cell_a["n"], cell_a["paired"]) == (3, 6, None)
    assert (cell_b["k"], cell_b["n"]) == (0, 4)  # look-0 and look-1 were b's training prompts
    # Paired on look-2..look-5: a refused look-2 and look-4, b none.
    assert cell_b["paired"] == paired_difference([True, False, True, False], [False] * 4)
    assert table["dna"]["harmful"]["b"]["paired"]["difference"] == pytest.approx(-0.5)
    with pytest.raises(KeyError, match="unknown reference recipe 'c'"):
        study_table(decisions, trained, sets, reference="c")
    study = {"reference": "a", "exclude_sources": ["look"], "seed": 0, "machine": "cpu",
             "builds": {name: {"figures": {"harmful_category_token_first": 0.9, "harmful_right_category": 0.8,
                                           "benign_respond_first": 0.95},
                               "train_harmful": 10, "train_benign": 6, "minutes": 12.0, "frozen_layers": 10} for name in ("a", "b")},
             "table": table}  # fmt: skip
    page = study_markdown(study)
    assert "| `look` | benign | `b` | 0.000 [0.000, 0.490] (0/4) | -0.500 [" in page
    assert "| `a` | 10 + 6 | 0.900 | 0.800 | 0.950 | 10 | 12.0 |" in page
