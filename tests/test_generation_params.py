"""Sampling settings: 0 means 0 (never "unset"), and values that cannot work are refused before generating."""

from __future__ import annotations

import pytest
from test_predict import small_model_dir  # noqa: F401  (a fixture: a small random Llama with smollm2's tokenizer)

from peftkit.errors import ConfigError
from peftkit.models import load_model_and_tokenizer
from peftkit.serve import ChatEngine, GenerationParams

QUESTION = [{"role": "user", "content": "Write one short sentence about the sea."}]


@pytest.fixture(scope="module")
def engine(small_model_dir) -> ChatEngine:  # noqa: F811
    return ChatEngine(*load_model_and_tokenizer(str(small_model_dir)))


def texts(engine: ChatEngine, seeds: range, **settings) -> set[str]:
    prompt = [engine.prompt_ids(QUESTION)]
    return {engine.generate(prompt, GenerationParams(max_new_tokens=12, seed=s, **settings))[0].text for s in seeds}


def test_top_p_0_keeps_only_the_most_likely_token(engine) -> None:
    """Sampling at temperature 1 with top_p 0 is greedy whatever the seed (it used to be read as top_p 1)."""
    greedy = texts(engine, range(1))
    assert texts(engine, range(5), temperature=1.0, top_p=0) == greedy
    assert len(texts(engine, range(5), temperature=1.0, top_p=1.0)) > 1  # the seeds do change a sampled text
    assert texts(engine, range(5), temperature=1.0, top_k=1) == greedy


def test_temperature_0_is_greedy_and_seed_0_is_a_seed(engine) -> None:
    assert texts(engine, range(3), temperature=0.0, do_sample=True) == texts(engine, range(1))
    first, again, other = (texts(engine, range(s, s + 1), temperature=1.0) for s in (0, 0, 1))
    assert first == again != other  # seed 0 is applied, not read as "no seed"


@pytest.mark.parametrize("settings, name", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"), ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_values_that_cannot_work_are_refused(settings, name) -> None:
    """repetition_penalty 0 used to be dropped silently (read as unset); now every bad value is a one-line error."""
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        GenerationParams(**settings)


def test_zero_values_that_can_work_are_kept(engine) -> None:
    params = GenerationParams(temperature=0.0, top_p=0.0, top_k=0, seed=0, do_sample=True)
    assert not params.sampling  # temperature 0: greedy
    sampled = engine._generate_kwargs(GenerationParams(temperature=1.0, top_k=0))
    assert sampled["do_sample"] and sampled["top_k"] == 0 and sampled["temperature"] == 1.0
    # exactly one token: transformers' top-p cut at 0 would keep several on a 150k-token vocabulary now and then
    assert engine._generate_kwargs(GenerationParams(temperature=1.0, top_p=0.0))["top_k"] == 1
