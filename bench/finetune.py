"""Benchmark: one refusal-token fine-tuning step as the recipe runs it vs a plain SFT step, and the projected build.

Both sides train SmolLM2-135M-Instruct (refusal tokens added) on the same SFT examples built from
the offline corpus, with the same batch size, from the same initial weights:

* ours — :func:`scripts.refusal_token_finetune.epoch_batches` (length-bucketed batches),
  :func:`~scripts.refusal_token_finetune.assistant_loss` (the batch packed into one sequence
  without padding, its shared prefix once, output head only at labelled positions) in the precision ``--precision``
  resolves to (:func:`scripts.precision.resolve_precision`: bfloat16 autocast only where the CPU
  computes it natively), the lower layers frozen where ``--frozen-layer-fraction`` asks
  (:func:`~scripts.refusal_token_finetune.frozen_lower_layers`), gradient clipping and the fused
  AdamW step, as
  :func:`~scripts.refusal_token_finetune.train` runs them;
* baseline — batches in a seeded random order (no bucketing), ``model(input_ids, attention_mask,
  labels=...)`` in float32 (full-vocabulary logits at every position), every layer trained,
  gradient clipping and the default AdamW step.

Benign targets are placeholders of ``max_answer_tokens`` tokens (the lengths are what matters here),
so no answers need generating. The projected build is the whole two-epoch schedule at ours' rate
plus the held-out evaluation (:func:`~scripts.refusal_token_finetune.first_token_ids` timed on
every ``--eval-stride``-th evaluation prompt and scaled by prompt tokens). The output names the CPU
(model name and torch's kernel capability); the last line is ``ratio: X`` (baseline s/step / ours
s/step). On a CPU shared with other jobs, pass ``--threads 1``: oversubscribed OpenMP threads make
two-thread timings erratic.

Run: ``HF_HUB_OFFLINE=1 python bench/finetune.py [--steps 8] [--threads 2] [--precision float32]
[--frozen-layer-fraction 0.333]``.
To see an AVX2-only CPU's kernel choice on a CPU with bfloat16, set ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` and, on an Intel CPU, ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL runs the float32
matrix products and reads neither of the other two: without it an Intel CPU keeps its AVX-512 products),
and call it emulated AVX2, not an AVX2 machine.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Callable, Sequence

import torch

from scripts.model import format_chat, load_model
from scripts.offline_corpus import load_offline_corpus
from scripts.precision import PRECISIONS, cpu_description, resolve_precision
from scripts.refusal_token_finetune import (
    DEFAULT_BENIGN_RATIO,
    BenignAnswer,
    FinetuneConfig,
    OfflineData,
    SFTExample,
    assistant_loss,
    benign_prompt_budget,
    build_sft_examples,
    collate,
    epoch_batches,
    first_token_ids,
    fit_prompt,
    frozen_lower_layers,
    make_optimizer,
    pack_batch,
    prepare_refusal_model,
    select_offline_data,
)
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES

logger = logging.getLogger("bench.finetune")


def offline_examples(tokenizer, config: FinetuneConfig, data: OfflineData) -> list[SFTExample]:
    """The offline build's training examples, with placeholder benign answers of full length."""
    budget = benign_prompt_budget(tokenizer, config)
    filler = tokenizer("Sure! Here is a clear and helpful answer to your question. " * 4, add_special_tokens=False)
    filler_ids = filler["input_ids"][: config.max_answer_tokens]
    answers = {
        r.id: BenignAnswer(r.id, fit_prompt(tokenizer, r.prompt, budget, config.system_prompt), filler_ids, False)
        for r in data.train_benign
    }
    return build_sft_examples(data.train_harmful + data.train_benign, tokenizer, DONOTANSWER_CATEGORIES, answers, config)


def evaluation_prompts(data: OfflineData) -> list[str]:
    """Every prompt the build's held-out evaluation runs (test splits, over-refusal set, extra harmful sources)."""
    records = data.test_harmful + data.test_benign + data.overrefusal
    for extra in data.extra_harmful.values():
        records = records + extra
    return [record.prompt for record in records]


def time_steps(
    step: Callable[[list[SFTExample]], None],
    examples: Sequence[SFTExample],
    batches: Sequence[Sequence[int]],
    tokens_run: Callable[[list[SFTExample]], int],
) -> tuple[float, float, int]:
    """Wall and CPU seconds per step over ``batches`` (after one untimed warm-up step) and the tokens the steps ran.

    ``tokens_run(rows)`` counts the tokens a step puts through the model for ``rows`` (padding included).

    With one thread, CPU seconds are what the step costs on a quiet core; on a shared CPU the wall
    time also holds the waits for other jobs.
    """
    step([examples[i] for i in batches[0]])
    began, began_cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for batch in batches[1:]:
        rows = [examples[i] for i in batch]
        tokens += tokens_run(rows)
        step(rows)
    steps = max(1, len(batches) - 1)
    return (time.perf_counter() - began) / steps, (time.process_time() - began_cpu) / steps, tokens


def main(argv: Sequence[str] | None = None) -> None:
    """Time both step kinds and the evaluation; log s/step, the tokens run and the projected build time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="precision of ours (default: auto)")
    parser.add_argument("--eval-stride", type=int, default=8, help="time every N-th evaluation prompt")
    parser.add_argument("--frozen-layer-fraction", type=float, default=FinetuneConfig().frozen_layer_fraction,
                        help="decoder layers, from the input, ours leaves untrained (default: the recipe's)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_stride < 1:
        parser.error("--steps and --eval-stride must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = FinetuneConfig(precision=args.precision, frozen_layer_fraction=args.frozen_layer_fraction)
    cpu = cpu_description()
    logger.info("CPU: %s (torch capability %s, %s), %d torch threads", cpu["cpu"], cpu["cpu_capability"],
                cpu["machine"], torch.get_num_threads())  # fmt: skip
    precision = resolve_precision(config.precision, "cpu")
    logger.info("precision: %s -> %s (%s)", config.precision, precision.name, precision.reason)

    model, tokenizer = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    prepare_refusal_model(model, tokenizer, DONOTANSWER_CATEGORIES)
    corpus = load_offline_corpus()
    data = select_offline_data(corpus, DONOTANSWER_CATEGORIES, config.seed, benign_ratio=DEFAULT_BENIGN_RATIO)
    examples = offline_examples(tokenizer, config, data)
    initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
    schedule_steps = config.epochs * len(epoch_batches([0] * len(examples), config.batch_size, config.seed, 0))
    pad = tokenizer.pad_token_id

    model.train()
    with frozen_lower_layers(model, config.frozen_layer_fraction) as frozen:
        optimizer = make_optimizer(model, config)

        def ours(rows: list[SFTExample]) -> None:
            input_ids, labels = collate(rows, pad)
            assistant_loss(model, input_ids, labels, precision).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        lengths = [len(example.input_ids) for example in examples]
        ours_batches = epoch_batches(lengths, config.batch_size, config.seed, 0)[: args.steps + 1]
        def packed_tokens(rows: list[SFTExample]) -> int:
            return int(pack_batch(*collate(rows, pad)).input_ids.shape[1])

        ours_s, ours_cpu, ours_tokens = time_steps(ours, examples, ours_batches, packed_tokens)

    model.load_state_dict(initial)
    baseline_optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)

    def baseline(rows: list[SFTExample]) -> None:
        input_ids, labels = collate(rows, pad)
        mask = torch.arange(input_ids.shape[1])[None, :] < torch.tensor([len(r.input_ids) for r in rows])[:, None]
        model(input_ids=input_ids, attention_mask=mask.long(), labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        baseline_optimizer.step()
        baseline_optimizer.zero_grad(set_to_none=True)

    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    baseline_batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)][: args.steps + 1]
    baseline_s, baseline_cpu, baseline_tokens = time_steps(
        baseline, examples, baseline_batches, lambda rows: len(rows) * max(len(row.input_ids) for row in rows)
    )

    model.eval()
    prompts = evaluation_prompts(data)
    sample = prompts[:: args.eval_stride]
    tokens = [len(ids) for ids in tokenizer(format_chat(tokenizer, prompts), add_special_tokens=False)["input_ids"]]
    began, began_cpu = time.perf_counter(), time.process_time()
    first_token_ids(model, tokenizer, sample, batch_size=config.generation_batch_size, progress=False)
    sample_s, sample_cpu = time.perf_counter() - began, time.process_time() - began_cpu
    scale = sum(tokens) / sum(tokens[:: args.eval_stride])
    evaluation_s = sample_s * scale
    logger.info("evaluation: %.1f s (CPU %.1f s) for %d of %d prompts, projected %.0f s (CPU %.0f s) for all",
                sample_s, sample_cpu, len(sample), len(prompts), evaluation_s, sample_cpu * scale)  # fmt: skip

    logger.info("examples: %d, schedule: %d steps (%d epochs, batch %d), ours trains the upper %d of %d layers",
                len(examples), schedule_steps, config.epochs, config.batch_size,
                len(model.base_model.layers) - frozen, len(model.base_model.layers))  # fmt: skip
    rows = (
        ("ours", precision.name, ours_s, ours_cpu, ours_tokens),
        ("baseline", "float32", baseline_s, baseline_cpu, baseline_tokens),
    )
    for name, dtype, seconds, cpu_seconds, tokens in rows:
        logger.info("%-8s %-8s %.2f s/step (CPU %.2f s/step), %d tokens run in %d timed steps, projected %.1f min "
                    "for the schedule", name, dtype, seconds, cpu_seconds, tokens, args.steps,
                    seconds * schedule_steps / 60)  # fmt: skip
    logger.info("projected build (training + evaluation, benign answers cached): %.1f min (CPU %.1f min) on %s (%s)",
                (ours_s * schedule_steps + evaluation_s) / 60, (ours_cpu * schedule_steps + sample_cpu * scale) / 60,
                cpu["cpu"], cpu["cpu_capability"])  # fmt: skip
    logger.info("ratio: %.2f", baseline_s / ours_s)


if __name__ == "__main__":
    main()
