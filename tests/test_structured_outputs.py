"""Structured outputs: JSON schemas, regexes, grammars and choices enforced token by token (llguidance),
in the sampler, the engine core (sync and overlapped steps) and through the OpenAI API."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from llmserve.grammar.compiler import GrammarCompiler
from llmserve.sampling_params import SamplingParams, StructuredOutputs
from llmserve.ops.token_bitmask import apply_token_bitmask

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
ORDER = {"type": "object", "required": ["items", "express"], "additionalProperties": False,
         "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
             "type": "object", "required": ["sku", "qty"], "additionalProperties": False,
             "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}},
             "express": {"type": "boolean"}}}
WEATHER = {"type": "object", "required": ["city", "unit", "temperature"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "unit": {"enum": ["celsius", "fahrenheit"]},
                          "temperature": {"type": "integer", "minimum": -60, "maximum": 60}}}
ACCOUNT = {"type": "object", "required": ["user", "active"], "additionalProperties": False,
           "properties": {"user": {"type": "object", "required": ["id", "roles"], "additionalProperties": False,
                                   "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99999},
                                                  "roles": {"type": "array", "maxItems": 3,
                                                            "items": {"enum": ["admin", "dev", "ops"]}}}},
                          "active": {"type": "boolean"}}}
REVIEW = {"type": "object", "required": ["title", "stars", "pros"], "additionalProperties": False,
          "properties": {"title": {"type": "string", "maxLength": 30},
                         "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                         "pros": {"type": "array", "minItems": 1, "maxItems": 2,
                                  "items": {"type": "string", "maxLength": 20}}}}
SCHEMAS = {"person": PERSON, "order": ORDER, "weather": WEATHER, "account": ACCOUNT, "review": REVIEW}
ASKS = {"person": "Describe a person.", "order": "Place an order for some items.",
        "weather": "What is the weather like in Paris?", "account": "Create a user account.",
        "review": "Review a film you like."}


def json_spec(schema: dict) -> StructuredOutputs:
    return StructuredOutputs("json", json.dumps(schema))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(lambda: tokenizer, len(tokenizer), [tokenizer.eos_token_id])


# ---- compiling ----------------------------------------------------------------------
@pytest.mark.parametrize("spec, error", [
    (StructuredOutputs("json", "{not json"), "not valid JSON"),
    (StructuredOutputs("json", "[1, 2]"), "must be an object"),
    (json_spec({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}), "Unimplemented keys"),
    (json_spec({"type": "colour"}), "colour"),
    (json_spec({"$ref": "#/definitions/missing"}), "missing"),
    (StructuredOutputs("regex", "(unclosed"), "unclosed"),
    (StructuredOutputs("grammar", "start: undefined_rule"), "undefined_rule"),
    (StructuredOutputs("choice", "[]"), "non-empty list"),
])
def test_compiler_refuses_what_it_cannot_enforce(compiler, spec, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        compiler.check(spec)


def test_choice_matcher_allows_exactly_the_choices(compiler, tokenizer):
    choices = ['yes', 'no', 'say "maybe"', 'café']
    for choice in choices:  # each choice's own tokens are accepted to the end
        matcher = compiler.matcher(StructuredOutputs("choice", json.dumps(choices)))
        assert all(matcher.consume_token(t) for t in tokenizer.encode(choice, add_special_tokens=False))
        assert matcher.is_accepting()
    matcher = compiler.matcher(StructuredOutputs("choice", json.dumps(choices)))
    assert not matcher.consume_token(tokenizer.encode("blue", add_special_tokens=False)[0])


def test_matchers_of_one_spec_are_independent(compiler, tokenizer):
    """Each request's matcher is a copy of one compiled per spec: advancing one leaves the others at the start."""
    spec = StructuredOutputs("choice", json.dumps(["yes", "no"]))
    first, second = compiler.matcher(spec), compiler.matcher(spec)
    assert all(first.consume_token(t) for t in tokenizer.encode("no", add_special_tokens=False))
    assert first.is_accepting() and not second.is_accepting()
    assert all(second.consume_token(t) for t in tokenizer.encode("yes", add_special_tokens=False))
    assert not compiler.matcher(spec).is_accepting()


def test_unknown_structured_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        StructuredOutputs("xml", "<a/>")


# ---- the sampler's mask -----------------------------------------------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bitmask_masks_exactly_the_cleared_bits_of_the_constrained_rows(device):
    generator = torch.Generator().manual_seed(0)
    vocab = 1100  # past one kernel block, and not a multiple of 32: the last word has bits beyond V
    allowed = torch.rand(4, vocab, generator=generator) < 0.3
    padded = torch.zeros(4, 1120, dtype=torch.int64)
    padded[:, :vocab] = allowed
    padded[:, vocab:] = 1
    weights = (1 << torch.arange(32, dtype=torch.int64))
    words = (padded.view(4, 35, 32) * weights).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # as signed int32
    # masks for batch rows 2 and 0, and one for a request not sampled this step (row 4, past the batch)
    masks = torch.cat([words[[2, 0, 3]], torch.tensor([[2], [0], [4]], dtype=torch.int32)], dim=1)
    logits = torch.randn(4, vocab, generator=generator).to(device)
    masked = apply_token_bitmask(logits, masks.to(device)).cpu()
    want = allowed.clone()
    want[[1, 3]] = True  # unconstrained rows keep every token
    assert torch.equal(torch.isfinite(masked), want)
    assert torch.equal(masked[want], logits.cpu()[want])
    assert torch.isfinite(logits).all()  # the input is left as it was


@pytest.mark.parametrize("device", DEVICES)
def test_the_step_bitmask_carries_each_requests_batch_row(device):
    """The runner tags each constrained row (any order, some not sampled this step) with its batch row."""
    from llmserve.core.scheduler_output import GrammarBitmask
    from llmserve.worker.model_runner import grammar_masks
    from llmserve.worker.request_state import RequestState

    states = [RequestState(f"r{i}", [1], [], SamplingParams(), [], 0) for i in range(4)]
    rows = torch.arange(3 * 2, dtype=torch.int32).view(3, 2) + 7  # request r2, r0 and one not in the batch
    bitmask = GrammarBitmask(["r2", "r0", "gone"], rows.numpy().tobytes())
    masks = grammar_masks(bitmask, states, torch.zeros(4, 60, device=device))
    assert masks.device.type == torch.device(device).type
    assert masks.cpu().tolist() == [[7, 8, 2], [9, 10, 0], [11, 12, 4]]


# ---- the engine -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_llm():
    from llmserve.llm import LLM

    with LLM("default", max_num_seqs=16) as llm:
        yield llm


def _greedy(max_tokens: int = 40, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


@pytest.mark.slow
def test_constrained_and_free_requests_share_a_batch(default_llm):
    prompts = [default_llm.apply_chat_template([{"role": "user", "content": ask}]) for ask in ASKS.values()]
    free_alone = default_llm.generate(prompts, _greedy(24))
    mixed_params = [_greedy(160, structured_outputs=json_spec(schema)) for schema in SCHEMAS.values()]
    mixed = default_llm.generate(prompts + prompts, mixed_params + [_greedy(24)] * len(prompts))
    for result, schema in zip(mixed[:len(prompts)], SCHEMAS.values()):
        output = result.outputs[0]
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), schema)
    # the masks of the constrained rows leave the free rows' tokens exactly as when they ran alone
    assert [r.outputs[0].token_ids for r in mixed[len(prompts):]] == [r.outputs[0].token_ids for r in free_alone]
    assert len(default_llm.engine.core.grammars) == 0  # every finished request dropped its matcher


@pytest.mark.slow
def test_overlapped_steps_sample_the_same_constrained_tokens(default_llm):
    """Async scheduling computes a step's masks after the previous step's tokens arrive, while the
    forward pass runs: the tokens must equal those of one step at a time."""
    from dataclasses import replace

    from llmserve.engine.engine import Engine
    from llmserve.llm import LLM

    config = default_llm.engine.core.config
    overlapped = replace(config, scheduler=replace(config.scheduler, async_scheduling=True))
    with LLM(engine=Engine.from_config(overlapped, progress=lambda message: None)) as llm:
        assert llm.engine.core.async_scheduling
        prompts = [llm.apply_chat_template([{"role": "user", "content": ask}]) for ask in ASKS.values()]
        params = [_greedy(160, structured_outputs=json_spec(schema)) for schema in SCHEMAS.values()]
        params += [_greedy(30, structured_outputs=StructuredOutputs("regex", r"[A-Z][a-z]+( [a-z]+){2,5}\."))]
        prompts += [prompts[0]]
        got = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
        assert len(llm.engine.core.grammars) == 0
    want = [r.outputs[0].token_ids for r in default_llm.generate(prompts, params)]
    assert got == want
    assert re.fullmatch(r"[A-Z][a-z]+( [a-z]+){2,5}\.", default_llm.tokenizer.decode(got[-1]))


@pytest.mark.slow
def test_a_completed_grammar_ends_the_request_without_eos(default_llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=50,
                            structured_outputs=StructuredOutputs("choice", json.dumps(["red", "green", "blue"])))
    outputs = [r.outputs[0] for r in default_llm.generate(["My favourite colour is"] * 6, params)]
    assert all(o.text in ("red", "green", "blue") and o.finish_reason == "stop" for o in outputs)
    assert all(o.stop_reason is None for o in outputs)  # no stop token ended them


@pytest.mark.slow
def test_an_aborted_constrained_request_frees_its_matcher_and_blocks(default_llm):
    engine = default_llm.engine
    prompt = default_llm.apply_chat_template([{"role": "user", "content": ASKS["review"]}])
    engine.add_request("leaving", prompt, _greedy(100, structured_outputs=json_spec(REVIEW)))
    for _ in range(3):
        engine.step()
    assert "leaving" in engine.core.grammars
    engine.abort_request("leaving")
    while engine.has_unfinished_requests():
        engine.step()
    assert len(engine.core.grammars) == 0 and engine.kv.num_used_blocks == 0


def test_an_engine_without_tokenizer_refuses_constrained_requests(tiny_hf_llama):
    from tests.conftest import make_engine

    engine = make_engine(tiny_hf_llama)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("r", [1, 2, 3], SamplingParams(structured_outputs=StructuredOutputs("regex", "a+")))
    assert not engine.core.requests and not engine.core.grammars


# ---- through the API --------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_server():
    from llmserve.config import EngineConfig
    from llmserve.engine.engine import Engine
    from tests.server_helpers import start_server

    server = start_server(Engine.from_config(EngineConfig(model="default"), progress=lambda m: None))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(default_server):
    import openai

    return openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="unused", max_retries=0)


def _ask_json(client, name: str, index: int, stream: bool) -> str:
    body = dict(model="default", messages=[{"role": "user", "content": ASKS[name]}], max_tokens=200,
                temperature=0.8, seed=index,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}})
    if not stream:
        return client.chat.completions.create(**body).choices[0].message.content
    chunks = client.chat.completions.create(**body, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.slow
def test_fifty_json_schema_requests_validate_streamed_and_not(client):
    jobs = [(name, i, i % 2 == 1) for name in SCHEMAS for i in range(10)]
    with ThreadPoolExecutor(max_workers=25) as pool:
        texts = list(pool.map(lambda job: _ask_json(client, *job), jobs))
    for (name, _, _), text in zip(jobs, texts):
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.slow
def test_openai_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)
        size: Literal["small", "medium", "large"]

    completion = client.beta.chat.completions.parse(
        model="default", messages=[{"role": "user", "content": "Tell me about a city."}], response_format=City,
        max_tokens=100, temperature=0.5, seed=1)
    city = completion.choices[0].message.parsed
    assert isinstance(city, City) and city.size in ("small", "medium", "large")


@pytest.mark.slow
def test_json_object_mode_returns_an_object(client):
    for stream in (False, True):
        body = dict(model="default", messages=[{"role": "user", "content": "List two fruits as JSON."}],
                    response_format={"type": "json_object"}, max_tokens=120, temperature=0)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                           if c.choices)
        else:
            text = client.chat.completions.create(**body).choices[0].message.content
        assert isinstance(json.loads(text), dict)


@pytest.mark.slow
@pytest.mark.parametrize("extension, check", [
    ({"structured_outputs": {"regex": r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)"}},
     lambda text: re.fullmatch(r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)", text)),
    ({"guided_regex": r"\d{3}-\d{4}"}, lambda text: re.fullmatch(r"\d{3}-\d{4}", text)),
    ({"structured_outputs": {"choice": ["Paris", "London", "Rome"]}}, lambda text: text in ("Paris", "London", "Rome")),
    ({"guided_choice": ["up", "down"]}, lambda text: text in ("up", "down")),
    ({"structured_outputs": {"grammar": 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'}},
     lambda text: re.fullmatch(r"The answer is [0-9]{1,3}\.", text)),
    ({"guided_grammar": 'root ::= "yes" | "no"'}, lambda text: text in ("yes", "no")),  # GBNF
    ({"guided_json": PERSON}, lambda text: jsonschema.validate(json.loads(text), PERSON) is None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}},
     lambda text: jsonschema.validate(json.loads(text), WEATHER) is None),
])
def test_completions_extensions(client, extension, check):
    completion = client.completions.create(model="default", prompt="Answer:", max_tokens=80, temperature=1.0,
                                           seed=1, extra_body=extension)
    text = completion.choices[0].text
    assert check(text), text
    assert completion.choices[0].finish_reason == "stop"
