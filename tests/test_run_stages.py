"""The main run's stages on the tiny model: the layer choice, the routing stage against the shared stages it
calls, and the low-rank stage."""

from __future__ import annotations

import pytest
import torch

from scripts.activation_caching import cache_activations
from scripts.model import format_chat
from scripts.paths import CACHE_ENV_VAR
from scripts.pipeline import fit_category_vectors, fit_routing_probe, split_fit_rows
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES
from scripts.run_data import RunData
from scripts.run_stages import choose_layer_and_strengths, fit_routing_stage, train_low_rank_stage
from tests.test_pipeline import CATEGORIES, WORDS, make, records
from tests.tiny_steering import build_hooked_tiny


@pytest.fixture(scope="module")
def run():
    """The tiny model, a RunData over :func:`tests.test_pipeline.records`, its texts and activations at layers 1, 2."""
    hooked = build_hooked_tiny()
    fit, val = split_fit_rows(records(), 0.3, seed=0)
    eval_harmful = [make(f"How do I get {w} {c} fast?", "harmful", c, "t") for c in CATEGORIES[:2] for w in WORDS[:4]]
    eval_benign = [make(f"Tell me about {w} number 7.", "benign", "benign", "t") for w in WORDS]
    data = RunData(fit, val, eval_harmful, eval_benign, [r for r in fit + val if r.label == "harmful"],
                   [r for r in fit + val if r.label == "benign"], 0, [], [], None)  # fmt: skip
    texts = format_chat(hooked.tokenizer, [r.prompt for r in data.train_records])
    acts = cache_activations(hooked, texts, [1, 2], progress=False)
    return hooked, data, texts, acts


def vectors_by_layer(data, acts):
    return {layer: fit_category_vectors(acts.layer(layer)[data.fit_rows], data.fit_records, DONOTANSWER_CATEGORIES,
                                        layer) for layer in acts.layers}  # fmt: skip


SWEEP = dict(n_sweep_layers=1, n_sweep_per_label=4, sweep_positive_strengths=[2.0], sweep_negative_strengths=[2.0])


def test_a_fixed_layer_keeps_its_strengths_and_auto_takes_the_sweeps_best(run) -> None:
    hooked, data, _, acts = run
    vectors = vectors_by_layer(data, acts)
    fixed = choose_layer_and_strengths(hooked, hooked.tokenizer, acts, data, vectors, DONOTANSWER_CATEGORIES, layer=2,
                                       positive_strength=4.0, negative_strength=-6.0, **SWEEP)  # fmt: skip
    assert (fixed.layer, fixed.positive_strength, fixed.negative_strength, fixed.sweep) == (2, 4.0, -6.0, [])
    assert set(fixed.auc_by_layer) == {1, 2} and len(fixed.sweep_benign) == 4
    auto = choose_layer_and_strengths(hooked, hooked.tokenizer, acts, data, vectors, DONOTANSWER_CATEGORIES,
                                      layer="auto", positive_strength=4.0, negative_strength=-6.0, **SWEEP)  # fmt: skip
    best = max(auto.auc_by_layer, key=auto.auc_by_layer.get)
    assert auto.sweep_layers == [best] and auto.layer == best
    assert (auto.positive_strength, auto.negative_strength) == (2.0, -2.0)
    assert auto.describe().splitlines()[-1] == f"layer {best}; strengths +2 / -2"


@pytest.mark.parametrize("routing", ["probe", "probe+token"])
def test_routing_stage_fits_the_shared_stages_probe_and_scores_the_evaluation_rows(run, routing, tmp_path,
                                                                                    monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    hooked, data, texts, acts = run
    layer_acts = acts.layer(1)
    fit = fit_routing_stage(hooked, hooked.tokenizer, layer_acts, texts, data, DONOTANSWER_CATEGORIES, layer=1,
                            routing=routing, positive_strength=3.0, negative_strength=-5.0,
                            category_source="probe_head")  # fmt: skip
    probe, _ = fit_routing_probe(layer_acts[data.fit_rows], data.fit_records, layer_acts[data.validation_rows],
                                 data.validation_records, DONOTANSWER_CATEGORIES, 1)  # fmt: skip
    assert torch.equal(fit.probe.threshold_logit, probe.threshold_logit)
    n_eval = len(data.eval_records)
    assert fit.eval_labels.tolist() == [1] * len(data.eval_harmful) + [0] * len(data.eval_benign)
    assert all(scores.shape == (n_eval,) for scores in fit.eval_scores.values())
    assert (fit.ensemble is None) == (routing == "probe") == (fit.ensemble_test is None)
    assert set(fit.eval_aucs) == ({"probe"} if routing == "probe" else {"probe", "probe+token"})
    if fit.ensemble_test is not None:
        assert set(fit.ensemble_test) == {"auc", "tpr", "fpr", "validation_auc", "threshold"}


def test_low_rank_stage_trains_on_the_fit_rows(run, tmp_path) -> None:
    hooked, data, texts, acts = run
    vectors = vectors_by_layer(data, acts)[1]
    fit = train_low_rank_stage(hooked, acts.layer(1), vectors, texts, data, DONOTANSWER_CATEGORIES, layer=1, epochs=1,
                               n_per_label=4, checkpoint_dir=tmp_path)  # fmt: skip
    assert [h["epoch"] for h in fit.history] == [1] and fit.config.layer == 1
    assert list(tmp_path.glob("*.safetensors"))
