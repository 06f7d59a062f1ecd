"""A saved run, loaded back: the model, vectors and router exactly as the run used them, ready for new prompts.

>>> from scripts.saved_run import load_run
>>> run = load_run("results/default")                     # doctest: +SKIP
>>> run.route(["How do I pick a lock?"])                   # doctest: +SKIP
>>> run.generate(["How do I pick a lock?"])                # doctest: +SKIP

Everything comes from the run directory: ``config.json`` (model, layer, strengths, routing, routing
policy, category source, category set, system prompt, batch size), ``vectors.safetensors`` and
``probe.safetensors`` (plus ``router.safetensors`` for the probe+token routing). Loading refuses
artifacts that do not belong together: vectors of another model or chat template, another layer or
hook, a router whose probe differs from the stored probe, or a fitted routing policy of another kind
than the run names.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from scripts.activation_caching import chat_template_hash
from scripts.hooked_model import HookedModel, wrap_model
from scripts.linear_probe import LinearProbe, ProbeTokenEnsemble
from scripts.model import format_chat, generate_ids, load_model
from scripts.paths import RunConfig
from scripts.pipeline import DEFAULT_CATEGORY_SOURCE
from scripts.refusal_tokens import CategorySet, get_category_set
from scripts.steering import (
    Condition,
    ProbeRouter,
    Route,
    RoutingPolicy,
    binary_policy,
    categorical,
    probe_router,
    probe_token_router,
)
from scripts.steering_vectors import SteeringVectors

logger = logging.getLogger(__name__)

STEERED_CONDITION = "probe_routed_steering"
ROUTING_POLICY_PARAMETER = "routing_policy"
"""``config.parameters`` key of the routing policy's name (a run without it routes with the binary policy)."""
FITTED_POLICY_PARAMETER = "routing_policy_fitted"
"""``config.parameters`` key of the fitted policy (:meth:`scripts.steering.RoutingPolicy.to_dict`)."""


class RunMismatchError(ValueError):
    """The artifacts of a run directory do not belong together (or to the model given)."""


@dataclass
class SavedRun:
    """A run's model, vectors and router, rebuilt from its directory by :func:`load_run`.

    Attributes:
        run_dir: The run directory.
        config: Its ``config.json``.
        hooked: The model the run steered, wrapped for hooks.
        category_set: The run's refusal categories.
        vectors: The category vectors at the run's layer.
        router: The router with the run's routing, strengths and category source.
    """

    run_dir: Path
    config: RunConfig
    hooked: HookedModel
    category_set: CategorySet
    vectors: SteeringVectors
    router: ProbeRouter

    @property
    def layer(self) -> int:
        return int(self.config.layer)

    @property
    def system_prompt(self) -> str | None:
        return self.config.parameters.get("system_prompt")

    def texts(self, prompts: Sequence[str]) -> list[str]:
        """``prompts`` in the model's chat template, with the run's system prompt."""
        return format_chat(self.hooked.tokenizer, list(prompts), self.system_prompt)

    def route(self, prompts: Sequence[str]) -> list[Route]:
        """Each prompt's route (toward or away from refusal), category and signed strength, as the run routed."""
        return self.router.route(self.hooked, self.texts(prompts))

    def condition(self, name: str = STEERED_CONDITION) -> Condition:
        """The run's probe-routed steering condition (for :func:`scripts.eval.run_condition` and friends)."""
        return categorical(self.vectors, self.router, self.layer, kind=self.config.hook_kind, name=name)

    def generate(self, prompts: Sequence[str], steered: bool = True, max_new_tokens: int | None = None) -> list[str]:
        """Greedy responses to ``prompts``, steered as the run steered (or unsteered), refusal tokens kept.

        Args:
            max_new_tokens: Default the run's ``max_new_tokens``.
        """
        prompts = list(prompts)
        texts = self.texts(prompts)
        plan = self.condition().plan(self.hooked, prompts, texts) if steered else None
        ids = generate_ids(
            self.hooked.model, self.hooked.tokenizer, texts,
            batch_size=int(self.config.parameters.get("batch_size", 16)),
            max_new_tokens=int(max_new_tokens or self.config.parameters.get("max_new_tokens", 64)),
            batch_hook=None if plan is None else plan.batch_hook,
            reuse_prefix=True if plan is None else plan.prompt_prefix_unchanged, progress=False,
        )  # fmt: skip
        return [self.hooked.tokenizer.decode(row, skip_special_tokens=False).strip() for row in ids]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RunMismatchError(message)


def check_vectors_belong(vectors: SteeringVectors, config: RunConfig, hooked: HookedModel, path: Path) -> None:
    """Raise :class:`RunMismatchError` unless ``vectors`` were made by this run, for this model's width and template."""
    _check(vectors.model == config.model, f"{path} holds vectors of model {vectors.model!r}, the run used "
                                          f"{config.model!r}")
    _check((vectors.layer, vectors.hook_kind) == (config.layer, config.hook_kind),
           f"{path} holds vectors of layer {vectors.layer} ({vectors.hook_kind}); the run steered layer "
           f"{config.layer} ({config.hook_kind})")
    _check(next(iter(vectors.vectors.values())).shape[-1] == hooked.d_model,
           f"{path} holds vectors of width {next(iter(vectors.vectors.values())).shape[-1]}, the model's residual "
           f"stream has {hooked.d_model}")
    template = chat_template_hash(hooked.tokenizer)
    _check(not vectors.template_hash or vectors.template_hash == template,
           f"{path} was made with chat template {vectors.template_hash}, the loaded tokenizer's is {template}")


def _same_probe(left: LinearProbe, right: LinearProbe) -> bool:
    a, b = left.state_dict(), right.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def record_routing_policy(config: RunConfig, policy: RoutingPolicy) -> Path:
    """Store the router's fitted policy in the run's ``config.json`` (returns its path), for :func:`load_router`.

    Both live in ``config.parameters``: the name under :data:`ROUTING_POLICY_PARAMETER` (the setting
    the run was asked for) and the fitted thresholds or calibration under :data:`FITTED_POLICY_PARAMETER`.
    """
    config.parameters[ROUTING_POLICY_PARAMETER] = policy.name
    config.parameters[FITTED_POLICY_PARAMETER] = policy.to_dict()
    return config.save()


def load_policy(parameters: Mapping[str, Any], config_path: Path) -> RoutingPolicy:
    """The run's routing policy from ``config.parameters`` (binary where the run records none).

    Raises:
        ValueError: a policy other than binary without its fitted parameters, or an invalid fitted policy.
        RunMismatchError: the fitted policy is of another kind than the run's ``routing_policy``.
    """
    name = parameters.get(ROUTING_POLICY_PARAMETER, "binary")
    fitted = parameters.get(FITTED_POLICY_PARAMETER)
    if fitted is None:
        if name != "binary":
            raise ValueError(f"{config_path} asks for the {name!r} routing policy but records no fitted policy "
                             f"({FITTED_POLICY_PARAMETER}); see scripts.saved_run.record_routing_policy")
        return binary_policy()
    policy = RoutingPolicy.from_dict(fitted)
    _check(policy.name == name, f"{config_path} asks for the {name!r} routing policy but records a fitted "
                                f"{policy.name!r} one")
    return policy


def load_router(run_dir: Path, config: RunConfig, category_set: CategorySet) -> ProbeRouter:
    """The run's router, from its stored probe (and ensemble) and the settings in ``config.json``.

    The routing policy comes from ``config.parameters`` (:func:`load_policy`); a run that records none
    (every run made before policies existed) routes with the binary policy.

    Raises:
        FileNotFoundError: the probe+token routing without ``router.safetensors``.
        RunMismatchError: the ensemble's probe is not the stored probe, or it reads another layer, or
            the fitted policy is not the one the run names.
        ValueError: an unknown routing in the config, or a policy other than binary without its fit.
    """
    parameters = config.parameters
    routing = parameters.get("routing", "probe")
    settings = dict(positive_strength=config.positive_strength, negative_strength=config.negative_strength,
                    category_source=parameters.get("category_source", DEFAULT_CATEGORY_SOURCE),
                    batch_size=int(parameters.get("batch_size", 16)),
                    policy=load_policy(parameters, run_dir / "config.json"))
    probe = LinearProbe.load(run_dir / "probe.safetensors")
    _check(probe.layer == config.layer, f"{run_dir / 'probe.safetensors'} reads layer {probe.layer}, the run "
                                        f"steered layer {config.layer}")
    if routing == "probe":
        return probe_router(probe, config.layer, category_set, kind=config.hook_kind, **settings)
    if routing == "probe+token":
        if not (run_dir / "router.safetensors").exists():
            raise FileNotFoundError(f"{run_dir / 'router.safetensors'} does not exist; the probe+token routing needs it")
        ensemble = ProbeTokenEnsemble.load(run_dir / "router.safetensors")
        _check(_same_probe(ensemble.probe, probe),
               f"the probe inside {run_dir / 'router.safetensors'} differs from {run_dir / 'probe.safetensors'}")
        return probe_token_router(ensemble, category_set, **settings)
    raise ValueError(f"unknown routing {routing!r} in {run_dir / 'config.json'}; valid: ['probe', 'probe+token']")


def load_run(
    run_dir: str | os.PathLike[str], hooked: HookedModel | None = None, device: str | torch.device | None = None
) -> SavedRun:
    """Load a run directory written by the notebook: model, vectors and router as the run used them.

    Args:
        run_dir: ``results/<run>/`` holding ``config.json``, ``vectors.safetensors``, ``probe.safetensors``
            (and ``router.safetensors`` for the probe+token routing).
        hooked: The model, already loaded and wrapped; default: the run's model loaded from its name.
        device: Where to load the model when ``hooked`` is not given (default: CUDA if available).

    Raises:
        FileNotFoundError: the directory lacks an artifact, or its layer and strengths were never chosen.
        RunMismatchError: artifacts that do not belong together or to ``hooked``.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist: not a run directory written by the notebook")
    config = RunConfig.load(config_path)
    if config.layer is None or config.positive_strength is None or config.negative_strength is None:
        raise FileNotFoundError(f"{config_path} records no layer and strengths yet: the run stopped before section 5")
    for name in ("vectors.safetensors", "probe.safetensors"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} does not exist; the run did not finish section 6")
    category_set = get_category_set(config.parameters.get("category_set_name", "donotanswer"))
    if hooked is None:
        model, tokenizer = load_model(config.model, device=device)
        hooked = wrap_model(model, tokenizer)
    vectors = SteeringVectors.load(run_dir / "vectors.safetensors", expected_categories=category_set)
    check_vectors_belong(vectors, config, hooked, run_dir / "vectors.safetensors")
    router = load_router(run_dir, config, category_set)
    logger.info("loaded run %s: %s, layer %d, strengths +%g / %g, %s", run_dir, config.model, config.layer,
                config.positive_strength, config.negative_strength, router.name)
    return SavedRun(run_dir, config, hooked, category_set, vectors, router)
