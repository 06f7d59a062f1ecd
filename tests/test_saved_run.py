"""A saved run loads back as it ran: same routes (and routing policy) and the same steered generations from the
run directory alone, the README's example runs on it, and artifacts that do not belong together are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts.activation_caching import cache_activations, chat_template_hash
from scripts.model import format_chat, generate_ids
from scripts.paths import REPO_ROOT, RunConfig
from scripts.pipeline import fit_category_vectors, fit_router, fit_routing_probe, split_fit_rows
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES
from scripts.saved_run import FITTED_POLICY_PARAMETER, RunMismatchError, load_run, record_routing_policy
from scripts.steering import binary_policy, categorical, refusal_token_probabilities, token_router_scores
from tests.test_pipeline import CATEGORIES, WORDS, records
from tests.tiny_steering import build_hooked_tiny

LAYER = 1
PROMPTS = [f"How do I get {w} {c} fast?" for c in CATEGORIES[:2] for w in WORDS[:2]]
PROMPTS += [f"Tell me about {w} number 7." for w in WORDS[:4]]


def build_run(tmp_path: Path, routing: str, seed: int = 0, policy: str = "binary"):
    """The tiny model saved to disk and a run directory fitted on it as the notebook does.

    A policy other than binary is recorded in ``config.json``; a binary run records none, as runs made
    before routing policies existed.
    """
    hooked = build_hooked_tiny()
    model_dir = tmp_path / "model"
    hooked.model.save_pretrained(model_dir)
    hooked.tokenizer.save_pretrained(model_dir)
    train, val = split_fit_rows(records(), 0.3, seed=seed)
    texts = format_chat(hooked.tokenizer, [r.prompt for r in train + val])
    acts = cache_activations(hooked, texts, [LAYER], progress=False).layer(LAYER)
    tokens = token_router_scores(refusal_token_probabilities(hooked, texts, DONOTANSWER_CATEGORIES))
    n = len(train)
    config = RunConfig(model=str(model_dir), layer=LAYER, results_root=str(tmp_path / "results"), name="run",
                       positive_strength=3.0, negative_strength=-5.0,
                       parameters={"routing": routing, "category_source": "probe_head", "batch_size": 4,
                                   "category_set_name": "donotanswer", "max_new_tokens": 6, "system_prompt": None})
    vectors = fit_category_vectors(acts[:n], train, DONOTANSWER_CATEGORIES, LAYER, model=config.model,
                                   template_hash=chat_template_hash(hooked.tokenizer))
    probe, _ = fit_routing_probe(acts[:n], train, acts[n:], val, DONOTANSWER_CATEGORIES, LAYER)
    router, ensemble, _ = fit_router(routing, probe, DONOTANSWER_CATEGORIES, 3.0, -5.0, val_acts=acts[n:],
                                     val_token_scores=tokens[n:], val_records=val, batch_size=4, policy=policy)
    vectors.save(config.artifact_path("vectors"))
    probe.save(config.artifact_path("probe"))
    if ensemble is not None:
        ensemble.save(config.artifact_path("router"))
    config.save()
    if policy != "binary":
        record_routing_policy(config, router.policy)
    return hooked, config, vectors, router


@pytest.mark.parametrize("routing", ["probe", "probe+token"])
def test_a_loaded_run_routes_and_steers_exactly_as_the_run(tmp_path, routing):
    hooked, config, vectors, router = build_run(tmp_path, routing)
    run = load_run(config.run_dir)
    texts = format_chat(hooked.tokenizer, PROMPTS)
    assert run.router.policy == binary_policy()
    assert [r.decision() for r in run.route(PROMPTS)] == [r.decision() for r in router.route(hooked, texts)]
    assert len({r.route for r in run.route(PROMPTS)}) == 2, "both routes should occur"
    plan = categorical(vectors, router, LAYER).plan(hooked, PROMPTS, texts)
    # Weights stored and loaded bit for bit, the same shapes and kernels: greedy outputs are identical.
    expected = generate_ids(hooked.model, hooked.tokenizer, texts, batch_size=4, max_new_tokens=6,
                            batch_hook=plan.batch_hook, progress=False)
    assert run.generate(PROMPTS) == [hooked.tokenizer.decode(ids, skip_special_tokens=False).strip() for ids in expected]
    assert run.generate(PROMPTS, steered=False) != run.generate(PROMPTS)


def test_a_saved_run_with_an_abstain_policy_reloads_the_same_routes(tmp_path):
    hooked, config, _, router = build_run(tmp_path, "probe+token", policy="abstain")
    run = load_run(config.run_dir, hooked=hooked)
    assert router.policy.name == "abstain" and run.router.policy == router.policy
    texts = format_chat(hooked.tokenizer, PROMPTS)
    assert [r.decision() for r in run.route(PROMPTS)] == [r.decision() for r in router.route(hooked, texts)]
    assert run.router.metadata() == router.metadata()
    saved = RunConfig.load(config.artifact_path("config"))
    saved.parameters["routing_policy"] = "graded"
    saved.save()
    with pytest.raises(RunMismatchError, match="asks for the 'graded' routing policy but records a fitted 'abstain'"):
        load_run(config.run_dir, hooked=hooked)
    del saved.parameters[FITTED_POLICY_PARAMETER]
    saved.save()
    with pytest.raises(ValueError, match="records no fitted policy"):
        load_run(config.run_dir, hooked=hooked)


def readme_example() -> str:
    """The saved-run example of the README (its first python block under "Using the modules")."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Using the modules"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_on_a_saved_run(tmp_path):
    _, config, _, _ = build_run(tmp_path, "probe+token")
    example = readme_example()
    assert len(example.strip().splitlines()) <= 5 and '"results/default"' in example
    namespace: dict = {}
    exec(example.replace('"results/default"', repr(str(config.run_dir))), namespace)  # noqa: S102
    assert namespace["routes"] and all(route.route in ("harmful", "benign") for route in namespace["routes"])
    assert len(namespace["responses"]) == len(namespace["routes"])


def test_artifacts_that_do_not_belong_together_are_refused(tmp_path):
    hooked, config, vectors, _ = build_run(tmp_path, "probe+token")
    run_dir = config.run_dir
    other_probe_run = build_run(tmp_path / "other", "probe+token", seed=1)[1].run_dir
    (run_dir / "router.safetensors").write_bytes((other_probe_run / "router.safetensors").read_bytes())
    with pytest.raises(RunMismatchError, match="differs from"):
        load_run(run_dir, hooked=hooked)
    (run_dir / "router.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="router.safetensors"):
        load_run(run_dir, hooked=hooked)
    config.parameters["routing"] = "probe"
    config.save()
    vectors.template_hash = "0123456789abcdef"
    vectors.save(run_dir / "vectors.safetensors")
    with pytest.raises(RunMismatchError, match="chat template"):
        load_run(run_dir, hooked=hooked)
    config.layer = None
    config.save()
    with pytest.raises(FileNotFoundError, match="no layer and strengths"):
        load_run(run_dir, hooked=hooked)
