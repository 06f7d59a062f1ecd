"""TransformerLens hooks on a Hugging Face chat model.

The model is wrapped with ``TransformerBridge.boot_transformers(..., hf_model=...)``: the bridge shares
the Hugging Face model's weights and its hook points (``blocks.{L}.hook_resid_post`` …) fire inside
``model(...)`` and ``model.generate(...)``, batched and with the KV cache. Hook names are
TransformerLens's and are the common language of every module here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

HOOK_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")

HookFunction = Callable[..., torch.Tensor | None]
"""``fn(activation [batch, pos, d_model], hook) -> replacement or None``, as in TransformerLens."""


def model_n_layers(model) -> int:
    """Number of transformer blocks of a Hugging Face causal LM."""
    return int(model.config.num_hidden_layers)


def model_d_model(model) -> int:
    """Residual-stream width of a Hugging Face causal LM."""
    return int(model.config.hidden_size)


def validate_layer(layer: int, n_layers: int) -> int:
    """Return ``layer`` if it is in ``[0, n_layers)``; else raise ``ValueError`` naming the valid range.

    Negative layers count from the end, as in Python indexing.
    """
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    resolved = layer + n_layers if layer < 0 else layer
    if not 0 <= resolved < n_layers:
        raise ValueError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
    return resolved


def hook_name(layer: int, kind: str = "resid_post", n_layers: int | None = None) -> str:
    """The TransformerLens hook name of a residual-stream point, e.g. ``blocks.15.hook_resid_post``.

    Args:
        layer: Block index (validated against ``n_layers`` when given).
        kind: One of ``resid_pre`` (block input), ``resid_mid`` (after attention), ``resid_post`` (block output).
    """
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {kind!r}; valid kinds: {list(HOOK_KINDS)}")
    if n_layers is not None:
        layer = validate_layer(layer, n_layers)
    return f"blocks.{layer}.hook_{kind}"


def parse_hook_name(name: str) -> tuple[int, str]:
    """Inverse of :func:`hook_name`: ``"blocks.3.hook_resid_mid"`` → ``(3, "resid_mid")``."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[2].startswith("hook_"):
        raise ValueError(f"not a residual hook name: {name!r}")
    kind = parts[2][len("hook_") :]
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind in {name!r}; valid kinds: {list(HOOK_KINDS)}")
    return int(parts[1]), kind


@dataclass
class HookedModel:
    """A Hugging Face causal LM, its tokenizer and the TransformerLens bridge that hooks it.

    ``model`` and ``bridge.original_model`` are the same object: running ``model`` (or its
    ``generate``) fires the bridge's hooks while they are registered.
    """

    model: object
    tokenizer: object
    bridge: object

    @property
    def n_layers(self) -> int:
        return model_n_layers(self.model)

    @property
    def d_model(self) -> int:
        return model_d_model(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        return str(getattr(self.model.config, "name_or_path", "") or "unknown")

    def hook_name(self, layer: int, kind: str = "resid_post") -> str:
        """Validated hook name of ``layer`` and ``kind`` on this model."""
        return hook_name(layer, kind, self.n_layers)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, HookFunction]]) -> Iterator["HookedModel"]:
        """Register forward hooks for the duration of the block; they are removed in ``finally``."""
        known = self.bridge.hook_dict
        for name, _ in fwd_hooks:
            if name not in known:
                raise KeyError(f"unknown hook point {name!r} (e.g. {self.hook_name(0)!r})")
        # The bridge's context removes exactly the hooks it added, in ``finally``; outer contexts' hooks stay.
        with self.bridge.hooks(fwd_hooks=list(fwd_hooks)):
            yield self


def check_cache_argument(model) -> None:
    """Raise if the model's attention takes its KV cache under a name the bridge does not read.

    transformers 5.24 renamed the attention argument ``past_key_values`` to ``cache``; transformer_lens
    4.3's bridge re-implements attention and reads only ``past_key_values`` (or ``layer_past``), so on
    such a model cached generation would silently attend to the newest token alone.
    """
    import inspect

    for module in model.modules():
        if module.__class__.__name__.endswith("Attention"):
            parameters = inspect.signature(module.forward).parameters
            if "cache" in parameters and not {"past_key_values", "layer_past"} & set(parameters):
                import transformers

                raise RuntimeError(
                    f"{module.__class__.__name__}.forward takes its KV cache as `cache=` (transformers "
                    f"{transformers.__version__}), which the TransformerLens bridge ignores; install "
                    "transformers<5.24 (see requirements.txt)"
                )
            return


def _bridge_replacements(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Every place where the bridge put one of its components into ``module``'s tree.

    Returns ``(parent, child name, bridge component)`` triples, outermost first. A bridge component keeps
    the module it replaced as its ``_original_component`` child; the search continues inside that module,
    never inside the component (whose aliases, e.g. a block's ``attn``, would list the same modules twice).
    """
    found = []
    for child_name, child in module._modules.items():
        if child is None:
            continue
        original = child._modules.get("_original_component")
        if original is not None:
            found.append((module, child_name, child))
            found += _bridge_replacements(original)
        else:
            found += _bridge_replacements(child)
    return found


@contextlib.contextmanager
def unwrapped_model(model) -> Iterator[object]:
    """Put the Hugging Face modules a bridge replaced back into ``model`` for the duration of the block.

    ``TransformerBridge.boot_transformers`` wraps the model in place: each block, attention, MLP, norm,
    embedding and ``lm_head`` becomes a bridge component holding the original as ``_original_component``,
    so ``state_dict`` keys change and every tied or aliased weight appears under several names (which
    ``save_pretrained`` refuses as shared tensors); and a bias-free ``lm_head`` gets a zero ``bias``
    buffer (TransformerLens's ``b_U``). Inside the block the module tree and ``state_dict`` are the plain
    model's again, over the same parameters, and the zero bias is left out of ``state_dict``; everything
    is restored in ``finally``, so the hooks fire again afterwards. The bridge's hooks do not fire inside
    the block.
    """
    replacements = _bridge_replacements(model)
    for parent, child_name, component in replacements:
        parent._modules[child_name] = component._modules["_original_component"]
    # A Linear's own bias is a parameter: a buffer named ``bias`` is the one the unembedding bridge added.
    added_biases = [module for module in model.modules() if isinstance(module, torch.nn.Linear)
                    and "bias" in module._buffers and "bias" not in module._non_persistent_buffers_set]
    for module in added_biases:
        module._non_persistent_buffers_set.add("bias")
    try:
        yield model
    finally:
        for module in added_biases:
            module._non_persistent_buffers_set.discard("bias")
        for parent, child_name, component in reversed(replacements):
            parent._modules[child_name] = component


def _save_pretrained_unwrapped(model) -> None:
    """Make ``model.save_pretrained`` write the plain model's weights while ``model`` is wrapped by a bridge."""
    save_pretrained = model.save_pretrained

    @functools.wraps(save_pretrained)
    def save_unwrapped(*args, **kwargs):
        with unwrapped_model(model):
            return save_pretrained(*args, **kwargs)

    model.save_pretrained = save_unwrapped


def wrap_model(model, tokenizer, name: str | None = None) -> HookedModel:
    """Wrap a loaded Hugging Face model with a TransformerLens ``TransformerBridge`` (no weights copied).

    Args:
        model: A Hugging Face causal LM (already on its device).
        tokenizer: Its tokenizer. The bridge may re-load it from ``tokenizer.name_or_path`` to add a
            BOS token; this library always tokenizes with the tokenizer given here.
        name: Architecture name for the bridge; default the model's ``name_or_path``.

    The bridge replaces the model's modules in place; ``model.save_pretrained`` still writes the plain
    model's weights and config (see :func:`unwrapped_model`).
    """
    from transformer_lens.model_bridge import TransformerBridge

    check_cache_argument(model)
    padding_side = tokenizer.padding_side
    # The bridge picks its adapter from ``config.architectures``, which only checkpoints loaded from disk
    # carry; a model built from its config (e.g. Gemma3ForCausalLM, whose "gemma3_text" model type the
    # bridge does not map) is named by its own class instead.
    overrides = None if getattr(model.config, "architectures", None) else {"architectures": [type(model).__name__]}
    bridge = TransformerBridge.boot_transformers(
        name or str(getattr(model.config, "name_or_path", "") or "model"),
        hf_model=model,
        tokenizer=tokenizer,
        device=next(model.parameters()).device,
        dtype=next(model.parameters()).dtype,
        hf_config_overrides=overrides,
    )
    # The bridge normalises the tokenizer it is given; generation here relies on left padding.
    tokenizer.padding_side = padding_side
    # Wrapping replaced the model's modules in place; saving must see the plain model (``unwrapped_model``).
    _save_pretrained_unwrapped(model)
    return HookedModel(model=model, tokenizer=tokenizer, bridge=bridge)


def load_hooked_model(name_or_path: str, **load_kwargs) -> HookedModel:
    """:func:`scripts.model.load_model` followed by :func:`wrap_model`."""
    from scripts.model import load_model

    model, tokenizer = load_model(name_or_path, **load_kwargs)
    return wrap_model(model, tokenizer)
