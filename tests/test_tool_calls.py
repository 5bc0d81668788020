"""Function calling in GLM-4's format through serve.py and the openai client: the
prompt with tools equals GLM-4-9B-chat's chat template; a required call is held to its
function's JSON schema and comes back as OpenAI's tool_calls, whole and streamed; the
call and its result go back in the next turn in the family's format; tool_choice
"auto" answers as the engine alone does; what cannot work is refused by name."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_SHAPE_FLAGS
from glm4_tokenizers import write_glm4_tokenizers
from test_server import Server

openai = pytest.importorskip("openai")
jinja2 = pytest.importorskip("jinja2")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# GLM-4-9B-chat's chat template, its function tools and messages (tokenizer_config.json).
TEMPLATE = ("[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n你是一个名为 ChatGLM 的"
            "人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
            "\n\n# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}"
            "\n\n## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 "
            "Json 格式表示调用的参数。{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>"
            "{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
            "<|assistant|>{% endif %}")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Beijing", "Paris"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 30}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <soon> & 'later'",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
QUESTION = [{"role": "user", "content": "北京天气"}]


@pytest.fixture(scope="module")
def glm4_dirs(tmp_path_factory):
    return write_glm4_tokenizers(tmp_path_factory.mktemp("glm4_tokenizers"))


@pytest.fixture(scope="module")
def engine(tiny_engine_factory, glm4_dirs):
    return tiny_engine_factory("--model_name", "glm_4_9b", *TINY_SHAPE_FLAGS, "--dtype", "float32",
                               "--tokenizer_dir", glm4_dirs[0], "--max_batch_size", "4", "--max_input_len", "1024",
                               "--max_output_len", "96", "--use_inflight_batching", "--random_seed", "4")


@pytest.fixture(scope="module")
def server(engine):
    running = Server(engine)
    yield running
    running.stop()


def test_the_prompt_with_tools_equals_the_chat_template(glm4_dirs):
    from tokenizers import Tokenizer

    from glm_engine.serving.protocol import ChatRequest
    from glm_engine.serving.tool_calls import chat_turns
    from glm_engine.text.prompts import chat_prompt_ids
    from glm_engine.text.tokenizer import load_tokenizer

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "system", "content": "be brief"}, *QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    body = ChatRequest.model_validate({"model": "tiny", "messages": messages, "tools": TOOLS})
    turns, required, names = chat_turns(body, "glm4")
    assert required is None and names == ["get_weather", "now"]
    rendered = jinja2.Template(TEMPLATE).render(add_generation_prompt=True, messages=[
        {"role": "system", "tools": TOOLS}, {"role": "system", "content": "be brief"}, {"role": "user", "content": "北京天气"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"temperature": 21}'}])
    reference = Tokenizer.from_file(str(glm4_dirs[1] / "tokenizer.json")).encode(rendered, add_special_tokens=False)
    assert chat_prompt_ids(load_tokenizer(glm4_dirs[0]), turns) == reference.ids


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_call_follows_its_schema_whole_and_streamed(server, choice):
    answer = server.client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, tool_choice=choice,
                                                   max_tokens=96, temperature=0)
    message = answer.choices[0]
    assert message.finish_reason == "tool_calls" and message.message.content is None
    call = message.message.tool_calls[0]
    if choice != "required":
        assert call.function.name == "get_weather"
    schema = WEATHER if call.function.name == "get_weather" else TOOLS[1]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS,
                                                        tool_choice=choice, max_tokens=96, temperature=0, stream=True))
    streamed = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].delta.tool_calls]
    assert len(streamed) == 1 and streamed[0].finish_reason == "tool_calls"
    assert streamed[0].delta.tool_calls[0].function.name == call.function.name
    assert streamed[0].delta.tool_calls[0].function.arguments == call.function.arguments


def test_the_call_and_its_result_make_the_next_turn(server, engine):
    """The answer after a tool's result is the engine's own answer to the family's prompt
    of that conversation."""
    from glm_engine.runtime.sampling import SamplingConfig
    from glm_engine.text.prompts import chat_prompt_ids, glm4_tools_message
    from glm_engine.text.tokenizer import load_tokenizer
    from model import load_session

    first = server.client.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS,
                                                  tool_choice="required", max_tokens=96, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    conversation = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = server.client.chat.completions.create(model="tiny", messages=conversation, tools=TOOLS, max_tokens=12,
                                                   temperature=0)
    tokenizer = load_tokenizer(engine)
    turns = [("system", glm4_tools_message([tool["function"] for tool in TOOLS])), ("user", "北京天气"),
             ("assistant", call.function.arguments, call.function.name), ("observation", '{"temperature": 21}')]
    own = load_session(engine, "cpu", tokenizer=tokenizer).generate(
        [chat_prompt_ids(tokenizer, turns)], SamplingConfig(max_new_tokens=12, end_id=-1))[0].token_ids
    assert second.choices[0].message.tool_calls is None  # "auto": random weights answer in plain text
    assert second.choices[0].message.content == tokenizer.decode(own)


@pytest.mark.parametrize("body, param, fragment", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice",
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "no tools are given"),
    ({"tools": TOOLS, "logprobs": True}, "logprobs", "logprobs with tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "send one"),
    ({"functions": [{"name": "f"}]}, "functions", "deprecated name of tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools", "a function's parameters schema"),
    ({"response_format": {"type": "lark", "lark": "start: \"a\""}}, "response_format", "got 'lark'"),
])
def test_bad_tool_requests_are_refused_by_name(server, body, param, fragment):
    import httpx

    response = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": QUESTION, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
