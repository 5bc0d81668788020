"""Function calling on /v1/chat/completions, in GLM-4's format (GLM-4-9B-chat's chat
template): the tools are listed in a system message; the model calls a function by
answering "name\\n" then the arguments' JSON after <|assistant|> (a plain answer starts
with "\\n"), and ends with <|observation|>; a function's result comes back in the
observation role, an earlier call as an assistant message whose metadata is the name.

tool_choice "auto" leaves the choice to the model and reads its answer back as a call
when it has that form; "required" or a named function holds the answer to a call of
that function (of any listed one, for "required") through the structured-output
grammar (runtime/structured_output.tool_call_format); "none" lists no tools."""

from __future__ import annotations

import json
import uuid

from glm_engine import GlmEngineError
from glm_engine.runtime.structured_output import response_format_grammar, tool_call_format
from glm_engine.serving.protocol import ApiError, ChatRequest
from glm_engine.text.prompts import glm4_tools_message

ANY_ARGUMENTS = {"type": "object"}  # the schema of a function given no parameters


def chat_turns(body: ChatRequest, flavor: str) -> tuple[list[tuple[str, ...]], dict | None, list[str] | None]:
    """(the chat's (role, content[, metadata]) turns, the grammar of a required call or
    None, the names of the functions the answer may call or None when it may call none)."""
    turns = message_turns(body.messages)
    tools = body.tools if body.tool_choice != "none" else None
    if not tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice names a call but no tools are given; send tools", param="tool_choice")
        return turns, None, None
    if flavor != "glm4":
        raise ApiError(400, f"tools: function calling follows GLM-4's chat format, and this engine's tokenizer is "
                            f"{flavor}'s; send the request without tools", param="tools")
    if body.logprobs:
        raise ApiError(400, "logprobs with tools is not implemented; drop one of them", param="logprobs")
    functions = {tool.function.name: tool.function for tool in tools}
    listed = [function.model_dump(exclude_none=True) for function in functions.values()]
    return [("system", glm4_tools_message(listed)), *turns], _required_call(body, functions), list(functions)


def message_turns(messages: list) -> list[tuple[str, ...]]:
    """The (role, content[, metadata]) turns of a request's chat messages."""
    return [turn for message in messages for turn in _turn(message)]


def _turn(message) -> list[tuple[str, ...]]:
    """A message's turns: an assistant's function calls each as GLM-4 writes a call, a
    tool's result as an observation."""
    role = message.prompt_role
    if role == "tool":
        return [("observation", message.text)]
    calls = [("assistant", call.function.arguments, call.function.name) for call in message.tool_calls or []]
    if message.content is None and not calls:
        raise ApiError(400, f"a {message.role} message needs content", param="messages")
    return ([(role, message.text)] if message.content is not None else []) + calls


def _required_call(body: ChatRequest, functions: dict) -> dict | None:
    """The grammar of the call tool_choice requires (None for "auto")."""
    choice = body.tool_choice
    if choice in (None, "auto"):
        return None
    if body.response_format is not None:
        raise ApiError(400, "response_format and a required tool call both shape the answer; send one",
                       param="response_format")
    names = list(functions) if choice == "required" else [choice.function.name]
    if names[0] not in functions:
        raise ApiError(400, f"tool_choice names {names[0]!r}, which is not among the tools", param="tool_choice")
    calls = {name: functions[name].parameters or ANY_ARGUMENTS for name in names}
    grammar = tool_call_format(calls)
    try:
        response_format_grammar(grammar)
    except GlmEngineError as error:
        raise ApiError(400, f"{str(error)} (a function's parameters schema)", param="tools") from None
    return grammar


def read_call(text: str, names: list[str]) -> dict | None:
    """The tool call an answer's text holds ("name\\n" then a JSON object of arguments,
    the name one of `names`), in OpenAI's shape; None for a plain answer."""
    name, newline, arguments = text.partition("\n")
    if not newline or name.strip() not in names:
        return None
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name.strip(), "arguments": json.dumps(parsed, ensure_ascii=False)}}
