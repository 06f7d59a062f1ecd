"""The method's core steps on tiny random models of three families: Llama, Qwen2 and Gemma 3.

Each family brings its own traits (``tests/tiny.py``): Qwen2 q/k/v biases and untied embeddings, Gemma 3
scaled embeddings, ``(1 + w)`` norms around both sublayers, query/key norms, sliding-window layers and a
chat template without a system role. Every check compares the library's result with a reference computed
another way, mostly on a plain copy of the model that TransformerLens never wrapped (its own
``output_hidden_states``, or a PyTorch forward hook on a decoder layer for steering), each text alone
and unpadded.

Tolerances: the wrapped model runs eager attention on left-padded batches, the plain copy SDPA on single
texts (or one forward pass over a whole generated sequence instead of cached decoding steps), so results
agree to float32 rounding, not bit for bit; the bounds below are the ones ``tests/test_steering.py``
uses (1e-5) scaled to each quantity's size where noted.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
from jinja2.exceptions import TemplateError

from scripts.activation_caching import cache_activations, position_ids_from_mask
from scripts.eval import run_condition
from scripts.hooked_model import HookedModel, wrap_model
from scripts.judge import TokenJudge
from scripts.linear_probe import LinearProbe
from scripts.low_rank_combination import fit_whitening, steering_basis
from scripts.low_rank_combination_steering import LowRankCombinationSteering
from scripts.model import format_chat, generate_ids, stop_token_ids, template_takes_system_role
from scripts.records import PromptRecord, read_jsonl
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES as CATEGORIES
from scripts.steering import (
    fixed_category,
    per_row_batch_hook,
    probe_router,
    refusal_token_ids,
    refusal_token_probabilities,
    steer,
)
from scripts.train_low_rank_combination_steering import TrainingConfig, evaluate_loss, train_low_rank_combination
from tests.tiny import FAMILIES, GEMMA3_CHAT_TEMPLATE, GEMMA3_SLIDING_WINDOW, build_tiny_family
from tests.tiny_steering import PROMPTS, build_tiny_with_refusal_tokens, tiny_texts

LAYER = 1
SYSTEM_PROMPT = "Answer in one sentence."
END_OF_TURN = {"llama": "<|im_end|>", "qwen2": "<|im_end|>", "gemma3": "<end_of_turn>"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def models(family) -> tuple[HookedModel, torch.nn.Module]:
    """``(hooked, plain)``: the family's tiny model wrapped by TransformerLens, and a copy with the same
    weights that was never wrapped (the bridge replaces the model's modules in place)."""
    model, tokenizer = build_tiny_with_refusal_tokens(family=family)
    plain = copy.deepcopy(model)
    return wrap_model(model, tokenizer), plain


@pytest.fixture(scope="module")
def hooked(models) -> HookedModel:
    return models[0]


@pytest.fixture(scope="module")
def plain(models) -> torch.nn.Module:
    return models[1]


@pytest.fixture(scope="module")
def texts(hooked) -> list[str]:
    return tiny_texts(hooked)


def _single(tokenizer, text: str) -> dict[str, torch.Tensor]:
    return tokenizer([text], return_tensors="pt", add_special_tokens=False)


def _plain_hidden_states(plain, tokenizer, text: str) -> tuple[torch.Tensor, ...]:
    """The plain model's ``output_hidden_states`` of one unpadded text, ``[pos, d_model]`` each; entry
    ``L + 1`` is block ``L``'s output (the last entry has the final norm applied)."""
    with torch.no_grad():
        output = plain(**_single(tokenizer, text), output_hidden_states=True)
    return tuple(state[0] for state in output.hidden_states)


@contextlib.contextmanager
def _plain_steering(plain, layer: int, deltas: torch.Tensor, start: int) -> Iterator[None]:
    """Add ``deltas`` (``[d_model]`` or ``[batch, d_model]``) to decoder layer ``layer``'s output at every
    position from ``start`` on: steering written with a plain PyTorch hook, no TransformerLens."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        steered = torch.cat([hidden[:, :start], hidden[:, start:] + deltas.reshape(-1, 1, hidden.shape[-1])], dim=1)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handle = plain.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _plain_next_token_logits(plain, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return plain(**_single(tokenizer, text)).logits[0, -1]


def _unembedding(hooked: HookedModel, token_id: int) -> torch.Tensor:
    """The unit unembedding row of ``token_id``: steering along it at the last layer raises that token."""
    row = hooked.model.get_output_embeddings().weight[token_id].detach().clone()
    return row / row.norm()


def _residual_norm(hooked: HookedModel, texts: list[str], layer: int) -> float:
    """Mean last-position residual norm at ``layer``: the scale steering strengths are set against (it
    differs between families, e.g. Gemma scales its embeddings by sqrt(d_model))."""
    return cache_activations(hooked, texts, layer, progress=False).mean_norm(layer)


def _texts_of(tokenizer) -> list[str]:
    return format_chat(tokenizer, list(PROMPTS))


def _random_rows(n: int, d_model: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d_model, generator=torch.Generator().manual_seed(seed))


# --- activation caching -----------------------------------------------------------------------------


def test_batched_last_token_activations_equal_the_plain_models_hidden_states(family, hooked, plain, texts):
    lengths = [len(ids) for ids in hooked.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert len(set(lengths)) > 1  # the batch below is left-padded
    if family == "gemma3":
        assert min(lengths) > GEMMA3_SLIDING_WINDOW  # so the sliding-window layers mask part of every text
    layers = list(range(hooked.n_layers))
    batched = cache_activations(hooked, texts, layers, batch_size=len(texts), progress=False)
    alone = cache_activations(hooked, texts, layers, batch_size=1, progress=False)
    for row, text in enumerate(texts):
        states = _plain_hidden_states(plain, hooked.tokenizer, text)
        for layer in layers:
            # The padded batch and the lone text take different kernels: equal to rounding, not bitwise.
            torch.testing.assert_close(batched.layer(layer)[row], alone.layer(layer)[row], atol=1e-5, rtol=1e-5)
            if layer < hooked.n_layers - 1:  # the plain model's last hidden state is after the final norm
                torch.testing.assert_close(batched.layer(layer)[row], states[layer + 1][-1], atol=1e-5, rtol=1e-5)


# --- steering ---------------------------------------------------------------------------------------


def test_per_row_steering_of_a_batch_equals_each_row_steered_alone(hooked, plain, texts):
    vectors = _random_rows(len(texts), hooked.d_model, seed=0)
    strengths = torch.tensor([3.0, 0.0, -2.0, 5.0, 1.5]) * _residual_norm(hooked, texts, LAYER) / vectors.norm(dim=-1)
    factory = per_row_batch_hook(hooked, LAYER, vectors, strengths)
    order = [3, 0, 4, 1, 2]  # a batch is any subset of rows, in any order
    encoded = hooked.tokenizer([texts[i] for i in order], return_tensors="pt", padding=True, add_special_tokens=False)
    assert encoded["attention_mask"].min() == 0
    encoded["position_ids"] = position_ids_from_mask(encoded["attention_mask"])
    with factory(order), torch.no_grad():
        batched = hooked.model(**encoded).logits[:, -1]
    for row, index in enumerate(order):
        with _plain_steering(plain, LAYER, strengths[index] * vectors[index], start=-1):
            alone = _plain_next_token_logits(plain, hooked.tokenizer, texts[index])
        torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)


def test_steering_along_a_refusal_token_moves_its_probability_that_way(hooked, texts):
    column = 2
    token_id = refusal_token_ids(hooked.tokenizer, CATEGORIES)[column]
    last = hooked.n_layers - 1
    direction = _unembedding(hooked, token_id)
    norm = _residual_norm(hooked, texts, last)
    unsteered = refusal_token_probabilities(hooked, texts, CATEGORIES)[:, column]
    previous = unsteered
    for fraction in (0.25, 0.5, 1.0, 2.0, 4.0):
        with steer(hooked, last, direction, fraction * norm):
            steered = refusal_token_probabilities(hooked, texts, CATEGORIES)[:, column]
        assert (steered > previous).all()
        previous = steered
    assert (previous > 0.9).all()
    with steer(hooked, last, direction, -norm):
        away = refusal_token_probabilities(hooked, texts, CATEGORIES)[:, column]
    assert (away < unsteered).all()


# --- generation -------------------------------------------------------------------------------------


def test_steered_cached_generation_equals_a_full_forward_pass_without_the_cache(hooked, plain, texts):
    """Greedy steered generation with the KV cache, step by step, equals one uncached forward pass of the plain
    model over the generated sequence, steered at the last prompt position and every generated one (what the
    default positions mode does under the cache)."""
    batch = [1, 4, 2]
    vectors = _random_rows(len(texts), hooked.d_model, seed=1)
    strengths = torch.tensor([2.0, -3.0, 0.0, 4.0, 1.0]) * _residual_norm(hooked, texts, LAYER) / vectors.norm(dim=-1)
    factory = per_row_batch_hook(hooked, LAYER, vectors, strengths)
    encoded = hooked.tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
    width, steps = encoded["input_ids"].shape[1], 6
    with factory(batch), torch.no_grad():
        out = hooked.model.generate(**encoded, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=hooked.tokenizer.pad_token_id)
    cached = torch.stack(out.logits, dim=1)  # [batch, steps, vocab]
    mask = torch.cat([encoded["attention_mask"], torch.ones(len(batch), steps, dtype=torch.long)], dim=1)
    deltas = strengths[batch, None] * vectors[batch]
    with _plain_steering(plain, LAYER, deltas, start=width - 1), torch.no_grad():
        full = plain(input_ids=out.sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     use_cache=False).logits[:, width - 1 : width - 1 + steps]
    # Logits are O(1) here; cached and uncached attention sum in different orders.
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        unsteered = plain(input_ids=out.sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False).logits[:, width - 1 : width - 1 + steps]
    steered_rows = [row for row, index in enumerate(batch) if strengths[index] != 0]
    assert (cached[steered_rows] - unsteered[steered_rows]).abs().amax(dim=(1, 2)).min() > 1e-2


@pytest.mark.parametrize("positions", ["last_and_generated", "prompt"])
def test_steered_generation_runs_the_shared_prefix_once_with_the_same_tokens(hooked, texts, positions):
    """The system turn every row shares runs once, its cache repeated over the batch, under per-row steering
    of the last prompt position (and of generated ones): the same greedy tokens as the plain batch."""
    vectors = _random_rows(len(texts), hooked.d_model, seed=3)
    strengths = torch.tensor([3.0, -4.0, 0.0, 5.0, 2.0]) * _residual_norm(hooked, texts, LAYER) / vectors.norm(dim=-1)
    factory = per_row_batch_hook(hooked, LAYER, vectors, strengths, positions=positions)
    kwargs = dict(batch_size=3, max_new_tokens=5, batch_hook=factory, progress=False)
    prefix_lengths = []
    handle = hooked.model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: prefix_lengths.append(tuple(args[0].shape)))
    try:
        reused = generate_ids(hooked.model, hooked.tokenizer, texts, reuse_prefix=True, **kwargs)
    finally:
        handle.remove()
    assert reused == generate_ids(hooked.model, hooked.tokenizer, texts, **kwargs)
    # The first pass of each batch is the one-row prefix (Gemma 3 folds the system turn into the user turn,
    # so its shared prefix is its template's few opening tokens).
    assert prefix_lengths[0][0] == 1 and prefix_lengths[0][1] >= 3
    unsteered = generate_ids(hooked.model, hooked.tokenizer, texts, batch_size=3, max_new_tokens=5, progress=False)
    assert reused != unsteered  # the steering really acted


def test_generation_stops_at_the_families_end_of_turn_token(family):
    # A fresh model without refusal tokens: their large unembeddings would outbid every other token.
    model, tokenizer = build_tiny_family(family)
    texts = _texts_of(tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    assert end_of_turn in stop_token_ids(tokenizer)
    free = generate_ids(model, tokenizer, texts, batch_size=3, max_new_tokens=3, progress=False)
    assert all(len(ids) == 3 for ids in free)  # the random model does not end its turn by itself
    last = model.config.num_hidden_layers - 1
    norm = _plain_hidden_states(model, tokenizer, texts[0])[last][-1].norm()
    row = model.get_output_embeddings().weight[end_of_turn].detach()
    # Made to open with its end-of-turn token, the model's answer is empty.
    with _plain_steering(model, last, 8 * norm * row / row.norm(), start=-1):
        ended = generate_ids(model, tokenizer, texts, batch_size=3, max_new_tokens=3, progress=False)
    assert ended == [[] for _ in texts]


# --- routing ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_probe(hooked, plain, texts) -> tuple[LinearProbe, torch.Tensor]:
    """``(probe, reference)``: a probe with a category head fitted on the plain model's layer-``LAYER``
    activations ``reference`` [N, d_model] of ``texts`` (each alone), its threshold between two rows."""
    reference = torch.stack([_plain_hidden_states(plain, hooked.tokenizer, t)[LAYER + 1][-1] for t in texts])
    labels = torch.tensor([0, 1, 0, 1, 0])
    categories = [None, CATEGORIES.categories[1], None, CATEGORIES.categories[3], None]
    probe = LinearProbe(hooked.d_model, layer=LAYER, hook_kind="resid_post", categories=CATEGORIES.categories)
    # Five separable points: a few L-BFGS steps fit them (the default 500 only sharpen the margins).
    probe.fit(reference, labels, categories=categories, max_iter=50, progress=False)
    ordered = probe.decision_function(reference).sort().values
    probe.set_threshold_logit(float(ordered[2] + ordered[3]) / 2)  # between two rows: rounding cannot flip one
    return probe, reference


@pytest.mark.parametrize("category_source", ["token", "probe_head"])
def test_probe_router_routes_as_its_probe_decides(hooked, plain, texts, fitted_probe, category_source):
    probe, reference = fitted_probe
    routes = probe_router(probe, None, CATEGORIES, category_source=category_source).route(hooked, texts)
    if category_source == "token":
        token_ids = refusal_token_ids(hooked.tokenizer, CATEGORIES)[:-1]
        first = torch.stack([_plain_next_token_logits(plain, hooked.tokenizer, t)[token_ids] for t in texts])
        expected_categories = [CATEGORIES.categories[int(i)] for i in first.argmax(dim=-1)]
    else:
        expected_categories = probe.predict_category(reference)
        assert len(set(expected_categories)) > 1
    harmful = (probe.decision_function(reference) >= float(probe.threshold_logit)).tolist()
    assert [r.route for r in routes] == ["harmful" if h else "benign" for h in harmful]
    assert [r.strength for r in routes] == [4.0 if h else -6.0 for h in harmful]
    assert [r.category for r in routes] == expected_categories
    assert {r.route for r in routes} == {"harmful", "benign"}


# --- low-rank combination ---------------------------------------------------------------------------


def test_low_rank_training_runs_and_lowers_its_loss(hooked):
    harmful, benign = tiny_texts(hooked, (PROMPTS[1], PROMPTS[3])), tiny_texts(hooked, (PROMPTS[0], PROMPTS[2]))
    activations = cache_activations(hooked, harmful + benign, LAYER, progress=False).layer(LAYER)
    generator = torch.Generator().manual_seed(0)
    vectors = {c: torch.randn(hooked.d_model, generator=generator) for c in CATEGORIES.categories}
    operator = LowRankCombinationSteering.from_basis(steering_basis(vectors, fit_whitening(activations, eps=1e-2)))
    # One batch per epoch: three optimiser steps, enough for a clear drop on every family.
    config = TrainingConfig(layer=LAYER, epochs=3, batch_size=2, lr=1e-1, kl_weight=0.5, seed=3)
    before = evaluate_loss(hooked, operator, harmful, benign, CATEGORIES, config)
    result = train_low_rank_combination(hooked, operator, harmful, benign, CATEGORIES, config, progress=False)
    after = evaluate_loss(hooked, result.operator, harmful, benign, CATEGORIES, config)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert after["loss"] < before["loss"] - 0.3  # about 1 on every family
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert all(p.grad is None for p in hooked.model.parameters())  # the model itself is never trained


# --- the token judge --------------------------------------------------------------------------------


def test_token_judge_reads_the_first_generated_token_on_each_tokenizer(hooked, texts, tmp_path):
    """Rows generated by a model made to open with a refusal token (or ``[respond]``) are judged by their first
    token's category, and the decoded response text, read without that field, gives the same verdict."""
    last = hooked.n_layers - 1
    strength = 8 * _residual_norm(hooked, texts, last)
    ids = refusal_token_ids(hooked.tokenizer, CATEGORIES)
    category = CATEGORIES.categories[3]
    records = [PromptRecord(prompt=p, label="harmful", category=category, source="t") for p in PROMPTS[:3]]
    judge = TokenJudge(CATEGORIES)
    for target, expected_first, is_refusal in ((ids[3], category, True), (ids[-1], "respond", False)):
        # Every category's vector is the target token's direction, so the fixed category steers toward it.
        vectors = {c: _unembedding(hooked, target) for c in CATEGORIES.categories}
        condition = fixed_category(vectors, strength, category, last, name=f"to_{expected_first}")
        rows = read_jsonl(run_condition(hooked, records, condition, tmp_path / f"{expected_first}.jsonl",
                                        batch_size=2, max_new_tokens=3, progress=False))
        token = hooked.tokenizer.convert_ids_to_tokens(target)
        assert [row["first_token_category"] for row in rows] == [expected_first] * len(records)
        assert all(row["response"].startswith(token) for row in rows)
        for row in rows:
            from_field = judge.judge(row)
            from_text = judge.judge({k: v for k, v in row.items() if k != "first_token_category"})
            assert from_field.is_refusal is from_text.is_refusal is is_refusal
            assert from_field.detail["token_category"] == from_text.detail["token_category"] == expected_first


# --- chat templates ---------------------------------------------------------------------------------


def test_format_chat_with_a_system_prompt(family):
    tokenizer = build_tiny_family(family)[1]
    prompt = "What is the capital of France?"
    text = format_chat(tokenizer, [prompt], system_prompt=SYSTEM_PROMPT)[0]
    if family == "gemma3":
        # Gemma 3's template has no system role and folds the message into the first user turn itself.
        assert template_takes_system_role(tokenizer)
        assert text == f"<bos><start_of_turn>user\n{SYSTEM_PROMPT}\n\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
    else:
        assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>")
    default = format_chat(tokenizer, [prompt])[0]
    assert SYSTEM_PROMPT not in default and default.endswith(text[text.index(prompt) + len(prompt) :])
    if family == "qwen2":
        assert "You are a helpful assistant." in default and "You are a helpful assistant." not in text


def test_format_chat_folds_a_system_prompt_for_a_template_that_rejects_one():
    """Gemma 2's template (like early Mistral's) raises on a system message; the library then folds it into the
    first user turn exactly as Gemma 3's template does itself."""
    gemma3 = build_tiny_family("gemma3")[1]
    gemma2 = copy.deepcopy(gemma3)
    gemma2.chat_template = (
        "{%- if messages[0]['role'] == 'system' -%}{{ raise_exception('System role not supported') }}{%- endif -%}"
        + GEMMA3_CHAT_TEMPLATE
    )
    prompts = ["Write a poem.", "How do I bake bread at home?"]
    assert not template_takes_system_role(gemma2)
    with pytest.raises(TemplateError, match="System role not supported"):
        gemma2.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                    {"role": "user", "content": prompts[0]}], tokenize=False)
    assert format_chat(gemma2, prompts, system_prompt=SYSTEM_PROMPT) == format_chat(gemma3, prompts, SYSTEM_PROMPT)
    assert format_chat(gemma2, prompts) == format_chat(gemma3, prompts)
    broken = copy.deepcopy(gemma3)
    broken.chat_template = "{{ raise_exception('this template renders nothing') }}"
    with pytest.raises(TemplateError, match="renders nothing"):
        format_chat(broken, prompts, system_prompt=SYSTEM_PROMPT)


def test_unknown_family_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid families"):
        build_tiny_family("mistral")


def test_the_families_differ_where_they_should():
    """The tiny models really carry their family's traits (a wrong builder would make the tests above vacuous)."""
    llama, _ = build_tiny_family("llama")
    qwen2, _ = build_tiny_family("qwen2")
    gemma3, gemma_tokenizer = build_tiny_family("gemma3")
    assert llama.get_output_embeddings().weight.data_ptr() == llama.get_input_embeddings().weight.data_ptr()
    assert qwen2.get_output_embeddings().weight.data_ptr() != qwen2.get_input_embeddings().weight.data_ptr()
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert gemma3.get_output_embeddings().weight.data_ptr() == gemma3.get_input_embeddings().weight.data_ptr()
    assert float(gemma3.model.embed_tokens.embed_scale) == pytest.approx(gemma3.config.hidden_size ** 0.5)
    assert {"sliding_attention", "full_attention"} == set(gemma3.config.layer_types)
    assert hasattr(gemma3.model.layers[0].self_attn, "q_norm")
    assert gemma_tokenizer.bos_token == "<bos>"
