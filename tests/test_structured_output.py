"""Structured output: response_format compiled to a grammar whose token masks keep
every output valid: random JSON schemas (nested objects, enums, arrays, required
fields) give outputs that parse and validate; bad schemas are refused in one line;
the mask bits select exactly the tokens they name."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine import GlmEngineError
from glm_engine.text.tokenizer import ChatGLMTokenizer

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from glm_engine.runtime.structured_output import (  # noqa: E402
    GrammarTokenizer, allowed_tokens, fill_masks, mask_logits, response_format_grammar)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of nested objects, arrays, enums and scalars with bounded sizes."""
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "object":
        names = rng.sample(["id", "name", "tags", "score", "ok", "kind", "items", "city"], rng.randint(1, 3))
        properties = {name: random_schema(rng, depth + 1) for name in names}
        return {"type": "object", "properties": properties, "additionalProperties": False,
                "required": rng.sample(names, rng.randint(1, len(names)))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": 3}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "a b", "北京"], rng.randint(1, 3))}
    if kind == "string":
        return {"type": "string", "maxLength": 12}
    if kind == "integer":
        return {"type": "integer", "minimum": -50, "maximum": 10**6}
    return {"type": kind}


def top_schema(rng: random.Random) -> dict:
    schema = random_schema(rng)
    if schema.get("type") != "object":  # response formats describe an object
        schema = {"type": "object", "properties": {"value": schema}, "required": ["value"],
                  "additionalProperties": False}
    return schema


@pytest.fixture(scope="module")
def grammars(tiny_tokenizer_dir) -> tuple[ChatGLMTokenizer, GrammarTokenizer]:
    tokenizer = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)
    return tokenizer, GrammarTokenizer(tokenizer, tokenizer.vocab_size + 19)  # a padded engine vocabulary


def walk(tokenizer: ChatGLMTokenizer, grammar_tokenizer: GrammarTokenizer, grammar: str, seed: int,
         limit: int = 400) -> str:
    """The text of random tokens drawn under the grammar's masks until the end token."""
    matcher = grammar_tokenizer.matcher(grammar)
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(limit):
        words = fill_masks([matcher], grammar_tokenizer.vocab_size, [tokenizer.eos_token_id])
        logits = mask_logits(torch.randn(1, grammar_tokenizer.vocab_size, generator=generator), words)
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if token == tokenizer.eos_token_id:
            break
        tokens.append(token)
        matcher.consume_token(token)
    return tokenizer.decode(tokens)


def test_random_schemas_give_outputs_that_validate(grammars):
    tokenizer, grammar_tokenizer = grammars
    rng = random.Random(0)
    for case in range(25):
        schema = top_schema(rng)
        grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        text = walk(tokenizer, grammar_tokenizer, grammar, seed=case)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_gives_an_object(grammars):
    tokenizer, grammar_tokenizer = grammars
    grammar = response_format_grammar({"type": "json_object"})
    for seed in range(3):
        assert isinstance(json.loads(walk(tokenizer, grammar_tokenizer, grammar, seed=seed)), dict)
    assert response_format_grammar({"type": "text"}) is None


@pytest.mark.parametrize("response_format, fragment", [
    ({"type": "xml"}, 'response_format.type must be "text", "json_object" or "json_schema"'),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}, "Invalid type"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/missing"}}}, "does not exist"),
    ({"type": "json_schema", "json_schema": "x"}, 'must be an object with a "schema" object'),
])
def test_bad_response_formats_are_refused_in_one_line(response_format, fragment):
    with pytest.raises(GlmEngineError, match=fragment) as caught:
        response_format_grammar(response_format)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("rows, vocab", [(1, 32), (3, 1005), (5, 65024), (2, 70)])
def test_mask_bits_name_exactly_the_allowed_tokens(rows, vocab):
    generator = torch.Generator().manual_seed(vocab)
    words = torch.randint(-2**31, 2**31, (rows, (vocab + 31) // 32), dtype=torch.int64, generator=generator)
    words = words.to(torch.int32)
    expected = torch.tensor([[bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(vocab)]
                             for r in range(rows)])
    assert torch.equal(allowed_tokens(words, vocab), expected)
    logits = torch.randn(rows, vocab, generator=generator)
    masked = mask_logits(logits, words)
    assert torch.equal(masked[expected], logits[expected]) and bool((masked[~expected] == float("-inf")).all())


def test_ids_past_the_tokenizer_are_never_allowed(grammars):
    tokenizer, grammar_tokenizer = grammars
    matcher = grammar_tokenizer.matcher(response_format_grammar({"type": "json_object"}))
    words = fill_masks([matcher], grammar_tokenizer.vocab_size, [tokenizer.eos_token_id])
    allowed = allowed_tokens(words, grammar_tokenizer.vocab_size)[0]
    assert allowed.any() and not allowed[tokenizer.vocab_size:].any()


def test_text_encodes_within_text_without_a_leading_space(grammars):
    tokenizer, _ = grammars
    for text in ['{"a": 1}', "hello world", " leading", "北京"]:
        assert tokenizer.decode(tokenizer.encode_within_text(text), within_text=True) == text


def test_constrained_requests_in_flight_give_valid_json_greedy_and_sampled(tiny_engine_factory):
    """On a tiny random engine, in flight with unconstrained requests: every constrained
    output parses and validates, greedy and sampled; the unconstrained ones get the
    tokens they get alone."""
    from glm_engine.runtime.sampling import SamplingConfig
    from model import load_session

    engine = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "8",
                                 "--max_input_len", "16", "--max_output_len", "128", "--paged_kv_cache",
                                 "--remove_input_padding", "--random_seed", "3")
    session = load_session(engine, "cpu")
    rng = random.Random(5)
    schemas = [top_schema(rng) for _ in range(25)]
    free = SamplingConfig(max_new_tokens=12, end_id=-1)
    requests = [([7, 8, 9 + case], free) for case in range(4)]
    for case, schema in enumerate(schemas):
        response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        requests.append(([5 + case, 9, 11], SamplingConfig(max_new_tokens=128, top_k=0 if case % 2 else 1,
                                                          random_seed=case, response_format=response_format)))
    outputs: list[list[int]] = [[] for _ in requests]
    for index, (prompt, sampling) in enumerate(requests):
        session.add_request(prompt, sampling, index)
    while session.has_work:
        for index, token in session.step().tokens:
            outputs[index].append(token)
    for schema, output in zip(schemas, outputs[4:]):
        jsonschema.validate(json.loads(session.tokenizer.decode(output)), schema)
    for (prompt, _), output in zip(requests[:4], outputs[:4]):
        assert output == session.generate([prompt], free)[0].token_ids


def test_benchmark_response_format_serves_json_requests(tiny_engine_factory, tmp_path):
    """benchmark.py --response_format: every request constrained; a request ends when its
    JSON is complete, so it gets 1 to --output_len tokens; bad values are one-line errors."""
    engine = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "8",
                                 "--max_input_len", "16", "--max_output_len", "128", "--paged_kv_cache",
                                 "--remove_input_padding", "--random_seed", "3")
    common = ["--engine_dir", engine, "--mode", "throughput", "--num_requests", "6", "--input_len_range", "3", "9",
              "--output_len", "40", "--device", "cpu"]
    boolean = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}
    for response_format in ({"type": "json_object"}, boolean):
        result = run_tool("benchmark.py", *common, "--response_format", json.dumps(response_format),
                          "--output_json", tmp_path / "json.json")
        assert result.returncode == 0, result.stderr
        row = json.loads((tmp_path / "json.json").read_text())["rows"][0]
        assert 6 <= row["output_tokens"] <= 6 * 40
    assert row["output_tokens"] <= 6 * len("false")  # "true" or "false" ended each request
    assert_one_line_error(run_tool("benchmark.py", *common, "--response_format", "json_object"),
                          "is not a JSON object")
    assert_one_line_error(run_tool("benchmark.py", *common, "--response_format", '{"type": "json_object"}', "--hf"),
                          "drop --hf")
