"""Benchmark: one refusal-token fine-tuning step as the recipe runs it vs a plain SFT step.

Both sides train SmolLM2-135M-Instruct (refusal tokens added) on the same SFT examples built from
the offline corpus, with the same batch size, from the same initial weights:

* ours — :func:`scripts.refusal_token_finetune.epoch_batches` (length-bucketed batches),
  :func:`~scripts.refusal_token_finetune.assistant_loss` (no attention mask, output head only at
  labelled positions), bfloat16 autocast and the fused AdamW step;
* baseline — batches in a seeded random order (no bucketing), ``model(input_ids, attention_mask,
  labels=...)`` in float32 (full-vocabulary logits at every position) and the default AdamW step.

Benign targets are placeholders of ``max_answer_tokens`` tokens (the lengths are what matters here),
so no answers need generating. The last line is ``ratio: X`` (baseline s/step / ours s/step);
``projected`` lines give the whole two-epoch schedule at the measured rate. On a CPU shared with
other jobs, pass ``--threads 1``: oversubscribed OpenMP threads make two-thread timings erratic.

Run: ``PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/finetune.py [--steps 8] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Callable, Sequence

import torch

from scripts.model import load_model
from scripts.offline_corpus import load_offline_corpus
from scripts.refusal_token_finetune import (
    DEFAULT_BENIGN_RATIO,
    BenignAnswer,
    FinetuneConfig,
    SFTExample,
    assistant_loss,
    benign_prompt_budget,
    build_sft_examples,
    collate,
    epoch_batches,
    fit_prompt,
    make_optimizer,
    prepare_refusal_model,
    select_offline_data,
)
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES

logger = logging.getLogger("bench.finetune")


def offline_examples(tokenizer, config: FinetuneConfig) -> list[SFTExample]:
    """The offline build's training examples, with placeholder benign answers of full length."""
    data = select_offline_data(load_offline_corpus(), DONOTANSWER_CATEGORIES, config.seed, benign_ratio=DEFAULT_BENIGN_RATIO)
    budget = benign_prompt_budget(tokenizer, config)
    filler = tokenizer("Sure! Here is a clear and helpful answer to your question. " * 4, add_special_tokens=False)
    filler_ids = filler["input_ids"][: config.max_answer_tokens]
    answers = {
        r.id: BenignAnswer(r.id, fit_prompt(tokenizer, r.prompt, budget, config.system_prompt), filler_ids, False)
        for r in data.train_benign
    }
    return build_sft_examples(data.train_harmful + data.train_benign, tokenizer, DONOTANSWER_CATEGORIES, answers, config)


def time_steps(
    step: Callable[[list[SFTExample]], None], examples: Sequence[SFTExample], batches: Sequence[Sequence[int]]
) -> tuple[float, int]:
    """Seconds per step over ``batches`` (after one untimed warm-up step) and the padded tokens they held."""
    step([examples[i] for i in batches[0]])
    began = time.perf_counter()
    padded = 0
    for batch in batches[1:]:
        rows = [examples[i] for i in batch]
        padded += len(rows) * max(len(row.input_ids) for row in rows)
        step(rows)
    return (time.perf_counter() - began) / max(1, len(batches) - 1), padded


def main(argv: Sequence[str] | None = None) -> None:
    """Time both step kinds and log s/step, padded tokens and the projected schedule time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = FinetuneConfig()
    model, tokenizer = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    prepare_refusal_model(model, tokenizer, DONOTANSWER_CATEGORIES)
    examples = offline_examples(tokenizer, config)
    initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
    schedule_steps = config.epochs * len(epoch_batches([0] * len(examples), config.batch_size, config.seed, 0))
    pad = tokenizer.pad_token_id

    model.train()
    optimizer = make_optimizer(model, config)

    def ours(rows: list[SFTExample]) -> None:
        input_ids, labels = collate(rows, pad)
        assistant_loss(model, input_ids, labels, bf16=True).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    lengths = [len(example.input_ids) for example in examples]
    ours_batches = epoch_batches(lengths, config.batch_size, config.seed, 0)[: args.steps + 1]
    ours_s, ours_tokens = time_steps(ours, examples, ours_batches)

    model.load_state_dict(initial)
    baseline_optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)

    def baseline(rows: list[SFTExample]) -> None:
        input_ids, labels = collate(rows, pad)
        mask = (torch.arange(input_ids.shape[1])[None, :] < torch.tensor([len(r.input_ids) for r in rows])[:, None])
        model(input_ids=input_ids, attention_mask=mask.long(), labels=labels).loss.backward()
        baseline_optimizer.step()
        baseline_optimizer.zero_grad(set_to_none=True)

    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    baseline_batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)][: args.steps + 1]
    baseline_s, baseline_tokens = time_steps(baseline, examples, baseline_batches)

    logger.info("examples: %d, schedule: %d steps (%d epochs, batch %d)", len(examples), schedule_steps,
                config.epochs, config.batch_size)  # fmt: skip
    logger.info("threads: %d", torch.get_num_threads())
    for name, seconds, tokens in (("ours", ours_s, ours_tokens), ("baseline", baseline_s, baseline_tokens)):
        logger.info("%-8s %.2f s/step, %d padded tokens in %d timed steps", name, seconds, tokens, args.steps)
        logger.info("projected %-8s %.1f min for the whole schedule", name, seconds * schedule_steps / 60)
    logger.info("ratio: %.2f", baseline_s / ours_s)


if __name__ == "__main__":
    main()
