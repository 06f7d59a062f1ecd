"""Train the low-rank combination operator with the refusal-token loss and a benign KL anchor.

Objective per step (one harmful and one benign batch of chat-formatted texts, read at the assistant
turn's first position, the operator hooked at one layer with ``strength``):

* harmful: ``−log Σ_c p_steered(refusal token c)``, averaged over the batch: make *some* refusal token
  likely, letting the operator choose the category mix;
* benign: ``kl_weight · KL(p_base ‖ p_steered)`` over the whole vocabulary, ``p_base`` computed without
  hooks under ``no_grad``: leave benign behaviour alone.

Only the operator trains (the model's parameters have ``requires_grad`` switched off for the run and
restored afterwards). AdamW with gradient-norm clipping; a non-finite loss raises. Batches are
shuffled per epoch from ``(seed, epoch)`` alone, and a checkpoint (operator + AdamW state, safetensors)
is written after every epoch, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from scripts.hooked_model import HookedModel
from scripts.low_rank_combination_steering import LowRankCombinationSteering
from scripts.refusal_tokens import CategorySet
from scripts.steering import check_positions, encode_texts, next_token_logits, steer_with_operator

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "low_rank_training_checkpoint"
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d{4})\.safetensors$")


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of one training run (recorded in every checkpoint).

    Attributes:
        layer: Layer whose residual stream the operator steers.
        kind: Hook kind (``resid_post``…).
        positions: Steered positions (see :mod:`scripts.steering`); the loss reads the last prompt position.
        strength: Multiplier of the operator's output during training.
        kl_weight: Weight of the benign KL term.
        epochs: Total number of epochs (a resumed run may raise it).
        batch_size: Texts per harmful and per benign batch.
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        max_grad_norm: Gradient-norm clipping threshold.
        seed: Seed of the per-epoch shuffles.
    """

    layer: int
    kind: str = "resid_post"
    positions: str = "prompt"
    strength: float = 1.0
    kl_weight: float = 1.0
    epochs: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_positions(self.positions)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")


@dataclass
class TrainingResult:
    """The trained operator and one record per epoch (losses, step count; resumed epochs included)."""

    operator: LowRankCombinationSteering
    history: list[dict[str, Any]] = field(default_factory=list)


def refusal_token_loss(logits: torch.Tensor, refusal_ids: torch.Tensor) -> torch.Tensor:
    """``−mean log Σ_c softmax(logits)[c]`` over refusal-token ids ``c``; logits ``[batch, vocab]`` → ``[]``."""
    log_probabilities = F.log_softmax(logits.float(), dim=-1)
    return -torch.logsumexp(log_probabilities[:, refusal_ids], dim=-1).mean()


def kl_to_base(base_logits: torch.Tensor, steered_logits: torch.Tensor) -> torch.Tensor:
    """``mean KL(softmax(base) ‖ softmax(steered))`` over the batch; both ``[batch, vocab]`` → ``[]``."""
    base = F.log_softmax(base_logits.float(), dim=-1)
    steered = F.log_softmax(steered_logits.float(), dim=-1)
    return (base.exp() * (base - steered)).sum(dim=-1).mean()


def epoch_batches(
    n_harmful: int, n_benign: int, batch_size: int, seed: int, epoch: int
) -> list[tuple[list[int], list[int]]]:
    """Index pairs ``(harmful batch, benign batch)`` of one epoch: both sets shuffled from ``(seed, epoch)``.

    The epoch has as many steps as the larger set has batches; the smaller set's batches repeat cyclically.
    """
    if n_harmful < 1 or n_benign < 1:
        raise ValueError(f"need harmful and benign texts, got {n_harmful} and {n_benign}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    harmful = torch.randperm(n_harmful, generator=generator).tolist()
    benign = torch.randperm(n_benign, generator=generator).tolist()
    harmful_batches = [harmful[i : i + batch_size] for i in range(0, n_harmful, batch_size)]
    benign_batches = [benign[i : i + batch_size] for i in range(0, n_benign, batch_size)]
    steps = max(len(harmful_batches), len(benign_batches))
    return [(harmful_batches[s % len(harmful_batches)], benign_batches[s % len(benign_batches)]) for s in range(steps)]


def harmful_refusal_loss(
    hooked: HookedModel,
    operator: LowRankCombinationSteering,
    texts: Sequence[str],
    refusal_ids: torch.Tensor,
    config: TrainingConfig,
) -> torch.Tensor:
    """Refusal-token loss of steered ``texts`` (differentiable in the operator): ``[]``."""
    encoded = encode_texts(hooked.tokenizer, texts, hooked.device)
    with steer_with_operator(hooked, config.layer, operator, config.strength, config.kind, config.positions):
        return refusal_token_loss(next_token_logits(hooked.model, encoded), refusal_ids)


def benign_kl(
    hooked: HookedModel, operator: LowRankCombinationSteering, texts: Sequence[str], config: TrainingConfig
) -> torch.Tensor:
    """``KL(base ‖ steered)`` of ``texts`` at the next token (differentiable in the operator): ``[]``."""
    encoded = encode_texts(hooked.tokenizer, texts, hooked.device)
    with torch.no_grad():
        base_logits = next_token_logits(hooked.model, encoded)
    with steer_with_operator(hooked, config.layer, operator, config.strength, config.kind, config.positions):
        return kl_to_base(base_logits, next_token_logits(hooked.model, encoded))


def evaluate_loss(
    hooked: HookedModel,
    operator: LowRankCombinationSteering,
    harmful_texts: Sequence[str],
    benign_texts: Sequence[str],
    category_set: CategorySet,
    config: TrainingConfig,
) -> dict[str, float]:
    """Mean losses over all texts (no gradients): ``{"harmful_loss", "kl", "loss"}``, batch-size weighted."""
    refusal_ids = _refusal_ids(hooked, category_set)
    harmful_total, kl_total = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(harmful_texts), config.batch_size):
            batch = harmful_texts[start : start + config.batch_size]
            harmful_total += float(harmful_refusal_loss(hooked, operator, batch, refusal_ids, config)) * len(batch)
        for start in range(0, len(benign_texts), config.batch_size):
            batch = benign_texts[start : start + config.batch_size]
            kl_total += float(benign_kl(hooked, operator, batch, config)) * len(batch)
    result = {"harmful_loss": harmful_total / len(harmful_texts), "kl": kl_total / len(benign_texts)}
    result["loss"] = result["harmful_loss"] + config.kl_weight * result["kl"]
    return result


def _refusal_ids(hooked: HookedModel, category_set: CategorySet) -> torch.Tensor:
    by_category = category_set.token_ids(hooked.tokenizer)
    return torch.tensor([by_category[c] for c in category_set.categories], dtype=torch.long, device=hooked.device)


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def checkpoint_path(directory: str | os.PathLike[str], epoch: int) -> Path:
    """``directory/epoch_NNNN.safetensors`` (``epoch`` counts completed epochs, from 1)."""
    return Path(directory) / f"epoch_{epoch:04d}.safetensors"


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the most completed epochs in ``directory``, or ``None``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted(p for p in directory.iterdir() if CHECKPOINT_PATTERN.match(p.name))
    return found[-1] if found else None


def save_checkpoint(
    path: str | os.PathLike[str],
    operator: LowRankCombinationSteering,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: TrainingConfig,
    history: Sequence[dict[str, Any]],
) -> Path:
    """Write operator tensors, AdamW state tensors and JSON metadata to one safetensors file, atomically.

    The optimiser's per-parameter state is flattened to ``optimizer.{param index}.{name}`` tensors and
    its parameter groups (plain numbers) go to the metadata, so nothing is pickled.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = optimizer.state_dict()
    tensors = {f"operator.{name}": t.detach().cpu().contiguous() for name, t in operator.state_dict().items()}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    header = {
        "epoch": epoch,
        "config": asdict(config),
        "param_groups": state["param_groups"],
        "history": list(history),
        "categories": operator.categories,
        "operator_metadata": operator.metadata,
    }
    staging = path.with_name(path.name + ".part")
    save_file(tensors, str(staging), metadata={CHECKPOINT_KEY: json.dumps(header, sort_keys=True)})
    os.replace(staging, path)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    operator: LowRankCombinationSteering,
    optimizer: torch.optim.Optimizer,
    config: TrainingConfig | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Restore ``operator`` and ``optimizer`` from :func:`save_checkpoint`; returns ``(epoch, history)``.

    Raises:
        ValueError: not a checkpoint, or ``config`` differs from the checkpoint's in anything but ``epochs``.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        raw = (handle.metadata() or {}).get(CHECKPOINT_KEY)
        if raw is None:
            raise ValueError(f"{path} is not a low-rank training checkpoint")
        header = json.loads(raw)
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if config is not None:
        saved = {k: v for k, v in header["config"].items() if k != "epochs"}
        current = {k: v for k, v in asdict(config).items() if k != "epochs"}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"{path} was trained with another configuration (differs in {changed}); "
                             "use a fresh checkpoint directory")
    device = operator.U.device
    operator.load_state_dict({n[len("operator."):]: t.to(device) for n, t in tensors.items()
                              if n.startswith("operator.")}, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    return int(header["epoch"]), list(header["history"])


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def train_low_rank_combination(
    hooked: HookedModel,
    operator: LowRankCombinationSteering,
    harmful_texts: Sequence[str],
    benign_texts: Sequence[str],
    category_set: CategorySet,
    config: TrainingConfig,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    eval_texts: tuple[Sequence[str], Sequence[str]] | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train ``operator`` in place (see the module docstring).

    Args:
        harmful_texts, benign_texts: Chat-formatted training inputs ending with the assistant turn's opening.
        category_set: Whose category tokens make up the refusal-token loss.
        checkpoint_dir: Where ``epoch_NNNN.safetensors`` checkpoints go (e.g. ``RunConfig.artifact_path(
            "low_rank", name)``); ``None`` writes none.
        resume: Continue from the latest checkpoint in ``checkpoint_dir`` when there is one.
        eval_texts: Optional held-out ``(harmful, benign)`` texts scored after every epoch.

    Returns:
        The operator and the per-epoch history (``epoch``, ``steps``, mean ``harmful_loss``/``kl``/``loss``,
        and ``eval_*`` values with ``eval_texts``).

    Raises:
        FloatingPointError: a loss is not finite (the step is not applied).
        ValueError: bad inputs, or a checkpoint from another configuration.
    """
    from tqdm.auto import tqdm

    if operator.d_model != hooked.d_model:
        raise ValueError(f"the operator has d_model {operator.d_model}, the model {hooked.d_model}")
    hooked.hook_name(config.layer, config.kind)
    harmful_texts, benign_texts = list(harmful_texts), list(benign_texts)
    refusal_ids = _refusal_ids(hooked, category_set)
    torch.manual_seed(config.seed)
    operator.to(hooked.device).train()
    optimizer = torch.optim.AdamW(operator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_epoch, history = 0, []
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None and resume else None
    if latest is not None:
        start_epoch, history = load_checkpoint(latest, operator, optimizer, config)
        logger.info("resuming from %s (%d epochs done)", latest, start_epoch)
    frozen = [(p, p.requires_grad) for p in hooked.model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    try:
        for epoch in tqdm(range(start_epoch, config.epochs), desc="low-rank epochs", disable=not progress):
            batches = epoch_batches(len(harmful_texts), len(benign_texts), config.batch_size, config.seed, epoch)
            sums = {"harmful_loss": 0.0, "kl": 0.0, "loss": 0.0}
            bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
            for step, (harmful_index, benign_index) in enumerate(bar):
                harmful_loss = harmful_refusal_loss(hooked, operator, [harmful_texts[i] for i in harmful_index],
                                                    refusal_ids, config)
                kl = benign_kl(hooked, operator, [benign_texts[i] for i in benign_index], config)
                loss = harmful_loss + config.kl_weight * kl
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch + 1}, step {step + 1}: "
                        f"harmful_loss={harmful_loss.item()}, kl={kl.item()}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(operator.parameters(), config.max_grad_norm)
                optimizer.step()
                for key, value in (("harmful_loss", harmful_loss), ("kl", kl), ("loss", loss)):
                    sums[key] += value.item()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            record: dict[str, Any] = {"epoch": epoch + 1, "steps": len(batches),
                                      **{k: v / len(batches) for k, v in sums.items()}}
            if eval_texts is not None:
                operator.eval()
                scores = evaluate_loss(hooked, operator, eval_texts[0], eval_texts[1], category_set, config)
                operator.train()
                record.update({f"eval_{k}": v for k, v in scores.items()})
            history.append(record)
            logger.info("epoch %d: %s", epoch + 1, {k: round(v, 5) for k, v in record.items() if isinstance(v, float)})
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_path(checkpoint_dir, epoch + 1), operator, optimizer, epoch + 1, config,
                                history)
    finally:
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
        operator.eval()
    return TrainingResult(operator=operator, history=history)
