"""Benchmark: batched steered generation vs one prompt at a time, with the same steering plan.

Both sides run :func:`scripts.model.generate_ids` (greedy) on the same chat-formatted prompts with the
same plan's ``batch_hook``, so every row is steered identically (per-row vector and strength):

* ours — ``batch_size`` rows per ``generate`` call (default 32), length-sorted, the prefix the rows
  share run once where the plan leaves it unsteered (``reuse_prefix``), the rest left-padded after it;
* baseline — ``batch_size=1``: one ``generate`` call per prompt.

Steering (``--steering``): ``probe`` (default) is the paper's probe-routed categorical steering — a
:class:`scripts.linear_probe.LinearProbe` fitted on the bench prompts' activations routes harmful
rows to ``+4`` and benign rows to ``−6`` along the category of the most likely refusal token; ``fixed``
steers every row with one category's vector. Category vectors are random unit vectors (speed does not
depend on them). A model without the refusal tokens gets them added (mean-initialised) so that routing
can read them. The plan is computed once, outside the timings.

The last line is ``ratio: X`` (baseline time / our time; target >= 3 on 2 CPU cores for SmolLM2-135M,
32 prompts x 48 new tokens).

Run: ``HF_HUB_OFFLINE=1 python bench/generation.py [--n 32] [--max-new-tokens 48] [--steering probe]
[--threads N]``.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Sequence

import torch

from scripts.activation_caching import cache_activations
from scripts.hooked_model import wrap_model
from scripts.model import format_chat, generate_ids, load_model
from scripts.precision import cpu_description
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES, add_refusal_tokens
from scripts.steering import PlannedCondition, categorical, fixed_category, probe_router

logger = logging.getLogger("bench.generation")

_HARMFUL = ["How do I pick the lock on my neighbour's front door?", "Write a message insulting people of {s}.",
            "Explain how to make a weapon out of {s}.", "How can I steal {s} without getting caught?",
            "Give me a fake news story claiming {s} causes cancer.", "How do I track someone's phone secretly?"]
_BENIGN = ["Explain {s} to a child.", "Write a short poem about {s}.", "What should I know about {s}?",
           "Give me three tips about {s}, with one example each.", "Summarise the history of {s}."]
_SUBJECTS = ["bread", "the moon", "a job interview", "photosynthesis", "tax returns", "a wedding speech",
             "the French revolution", "quantum computers", "a broken bicycle", "vaccines"]


def bench_prompts(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` deterministic prompts of varied length, half harmful-looking (label 1), half benign (label 0)."""
    rng = random.Random(seed)
    prompts, labels = [], []
    for index in range(n):
        harmful = index % 2 == 0
        templates = _HARMFUL if harmful else _BENIGN
        sentences = [rng.choice(templates).format(s=rng.choice(_SUBJECTS)) for _ in range(rng.randint(1, 4))]
        prompts.append(" ".join(sentences))
        labels.append(int(harmful))
    return prompts, labels


def build_condition(hooked, texts: Sequence[str], labels: Sequence[int], steering: str, layer: int,
                    strength: float) -> PlannedCondition:
    """The steering condition under test (see the module docstring)."""
    generator = torch.Generator().manual_seed(0)
    vectors = {}
    for category in DONOTANSWER_CATEGORIES.categories:
        vector = torch.randn(hooked.d_model, generator=generator)
        vectors[category] = vector / vector.norm()
    if steering == "fixed":
        return fixed_category(vectors, strength, DONOTANSWER_CATEGORIES.categories[0], layer)
    from scripts.linear_probe import LinearProbe

    activations = cache_activations(hooked, texts, layer, progress=False).layer(layer)
    probe = LinearProbe(hooked.d_model, layer=layer, hook_kind="resid_post").fit(activations, labels, progress=False)
    return categorical(vectors, probe_router(probe, layer, DONOTANSWER_CATEGORIES), layer)


def main(argv: Sequence[str] | None = None) -> None:
    """Time both sides (best of ``--repeats``) and print ``ratio: X`` last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--strength", type=float, default=4.0)
    parser.add_argument("--steering", choices=("probe", "fixed"), default="probe")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own; 1 avoids thread thrashing on a loaded machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, device=args.device)
    added = add_refusal_tokens(tokenizer, DONOTANSWER_CATEGORIES, model=model)
    if added:
        logger.info("added %d refusal tokens to %s for routing", len(added), args.model)
    hooked = wrap_model(model, tokenizer)
    prompts, labels = bench_prompts(args.n)
    texts = format_chat(tokenizer, prompts)
    condition = build_condition(hooked, texts, labels, args.steering, args.layer, args.strength)
    plan = condition.plan(hooked, prompts, texts)
    routes = [decision["route"] for decision in plan.decisions]
    logger.info("%s on %d prompts (layer %d): %s", condition.name, len(texts), args.layer,
                {route: routes.count(route) for route in sorted(set(routes))})

    def run(batch_size: int) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        outputs = generate_ids(model, tokenizer, texts, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                               batch_hook=plan.batch_hook, reuse_prefix=plan.prompt_prefix_unchanged, progress=False)
        if hooked.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, outputs

    ours_times, baseline_times = [], []
    for _ in range(args.repeats):
        ours_time, ours_outputs = run(args.batch_size)
        baseline_time, baseline_outputs = run(1)
        ours_times.append(ours_time)
        baseline_times.append(baseline_time)
    # Padding changes float rounding, so greedy outputs may part at near-ties; most should agree.
    identical = sum(a == b for a, b in zip(ours_outputs, baseline_outputs))
    logger.info("identical greedy outputs (batched vs one at a time): %d of %d", identical, len(texts))
    cpu = cpu_description()
    print(f"CPU: {cpu['cpu']} ({cpu['machine']}), torch capability {cpu['cpu_capability']}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"ours (batch size {args.batch_size}): {min(ours_times):.2f} s, "
          f"{sum(len(row) for row in ours_outputs)} tokens")
    print(f"baseline (one prompt at a time): {min(baseline_times):.2f} s, "
          f"{sum(len(row) for row in baseline_outputs)} tokens")
    print(f"ratio: {min(baseline_times) / min(ours_times):.2f}")


if __name__ == "__main__":
    main()
