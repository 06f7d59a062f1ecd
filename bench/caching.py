"""Benchmark: last-token activation caching vs a full forward pass with ``output_hidden_states``.

Both sides run the same model on the same prompts, batch size and device:

* ours — :func:`scripts.activation_caching.cache_activations`: length-sorted batches, the pass stops
  after the requested layer (no upper blocks, no unembedding);
* baseline — batches in the order given (no length sorting), ``model(..., output_hidden_states=True)``
  through every block and the unembedding, then the last non-pad position of ``hidden_states[layer + 1]``.
  It gets the same position ids from the attention mask, so both compute the same activations.

The activations are checked to agree (allclose) before timings are printed. The last line is
``ratio: X`` (baseline time / our time; target >= 2.2 for SmolLM2-135M, 256 prompts, layer 15).

Run: ``HF_HUB_OFFLINE=1 python bench/caching.py [--n 256] [--layer 15] [--batch-size 32]``.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Sequence

import torch

from scripts.activation_caching import cache_activations, last_token_indices, position_ids_from_mask
from scripts.hooked_model import wrap_model
from scripts.model import format_chat, load_model, pad_batch
from scripts.precision import cpu_description

logger = logging.getLogger("bench.caching")

_SUBJECTS = ["bread", "the moon", "a job interview", "photosynthesis", "my neighbour's dog", "tax returns",
             "a wedding speech", "the French revolution", "quantum computers", "a broken bicycle"]
_ASKS = ["Explain {s} to a child.", "Write a short poem about {s}.", "What should I know about {s}?",
         "Give me three tips about {s}, with one example each.", "Summarise the history of {s} in detail."]


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts of varied length: the offline corpus when provisioned, else deterministic synthetic prompts."""
    rng = random.Random(seed)
    try:
        from scripts.offline_corpus import load_offline_corpus

        records = load_offline_corpus()
    except FileNotFoundError:
        records = []
    if len(records) >= n:
        logger.info("using %d prompts sampled from the offline corpus", n)
        return [record.prompt for record in rng.sample(records, n)]
    logger.info("offline corpus absent; generating %d synthetic prompts", n)
    prompts = []
    for _ in range(n):
        sentences = [rng.choice(_ASKS).format(s=rng.choice(_SUBJECTS)) for _ in range(rng.randint(1, 8))]
        prompts.append(" ".join(sentences))
    return prompts


@torch.no_grad()
def baseline_last_token(model, tokenizer, texts: Sequence[str], layer: int, batch_size: int) -> torch.Tensor:
    """Full forward in the order given; last-token ``hidden_states[layer + 1]`` ``[N, d_model]`` (float32, CPU)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(ids), batch_size):
        input_ids, mask = pad_batch(ids[start : start + batch_size], tokenizer.pad_token_id, tokenizer.padding_side)
        output = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       position_ids=position_ids_from_mask(mask).to(device), output_hidden_states=True, use_cache=False)
        states = output.hidden_states[layer + 1]
        rows.append(states[torch.arange(states.shape[0]), last_token_indices(mask).to(device)].float().cpu())
    return torch.cat(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Time both sides (best of ``--repeats``), check agreement, and print ``ratio: X`` last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model, tokenizer = load_model(args.model, device=args.device)
    hooked = wrap_model(model, tokenizer)
    texts = format_chat(tokenizer, bench_prompts(args.n))
    lengths = [len(row) for row in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    logger.info("%d prompts, %d..%d tokens (mean %.1f), layer %d of %d, batch size %d, device %s",
                len(texts), min(lengths), max(lengths), sum(lengths) / len(lengths), args.layer, hooked.n_layers,
                args.batch_size, hooked.device)

    def synchronize() -> None:
        if hooked.device.type == "cuda":
            torch.cuda.synchronize()

    ours_times, baseline_times = [], []
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        ours = cache_activations(hooked, texts, args.layer, batch_size=args.batch_size, progress=False).acts[args.layer]
        synchronize()
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline = baseline_last_token(model, tokenizer, texts, args.layer, args.batch_size)
        synchronize()
        baseline_times.append(time.perf_counter() - start)

    scale = float(baseline.abs().max())
    difference = float((ours - baseline).abs().max())
    tolerance = (1e-4 if model.dtype == torch.float32 else 2e-2) * scale
    if not torch.allclose(ours, baseline, rtol=0, atol=tolerance):
        raise SystemExit(f"activations disagree: max |diff| {difference:.3g} > {tolerance:.3g}")
    logger.info("activations agree: max |diff| %.3g (max |value| %.3g)", difference, scale)
    ours_best, baseline_best = min(ours_times), min(baseline_times)
    cpu = cpu_description()
    print(f"CPU: {cpu['cpu']} ({cpu['machine']}), torch capability {cpu['cpu_capability']}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"ours (sorted batches, stop after layer {args.layer}): {ours_best:.3f} s")
    print(f"baseline (batches as given, full forward + hidden states): {baseline_best:.3f} s")
    print(f"ratio: {baseline_best / ours_best:.2f}")


if __name__ == "__main__":
    main()
