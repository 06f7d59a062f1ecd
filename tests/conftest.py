"""Shared fixtures: the tiny random Llama (with the offline category set's refusal tokens) and its tokenizer."""

from __future__ import annotations

import pytest

from scripts.precision import cpu_bfloat16_support, cpu_description
from scripts.refusal_tokens import DONOTANSWER_CATEGORIES, add_refusal_tokens
from tests.tiny import build_tiny_model, build_tiny_tokenizer


def pytest_report_header(config) -> list[str]:
    """The CPU the suite ran on and whether it computes bfloat16 natively (kernel paths differ between the two)."""
    cpu = cpu_description()
    native, reason = cpu_bfloat16_support()
    return [f"cpu: {cpu['cpu']} ({cpu['machine']}), torch capability {cpu['cpu_capability']}",
            f"native bfloat16: {native} ({reason})"]


@pytest.fixture(scope="session")
def tiny_tokenizer_plain():
    """The tiny tokenizer without refusal tokens."""
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model():
    """``(model, tokenizer)``: a fresh 4-layer, width-64 random Llama with the refusal tokens added."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    add_refusal_tokens(tokenizer, DONOTANSWER_CATEGORIES, model=model)
    return model, tokenizer


@pytest.fixture()
def category_set():
    """The offline category set used by the tiny model."""
    return DONOTANSWER_CATEGORIES
