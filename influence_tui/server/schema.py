"""The OpenAPI 3.1 description served at /openapi.json, written by hand and checked against the routes.

Limits here are the server's real limits (GenerationParams.RANGES), so a fuzzer that follows the
schema exercises what a client may send; `openapi_schema` raises if a route is missing from it.
"""

from __future__ import annotations

from typing import Any, Iterable

import influence_tui
from influence_tui.params import RANGES


def _num(name: str, description: str = "") -> dict[str, Any]:
    kind, lo, hi = RANGES[name]
    out: dict[str, Any] = {"type": "integer" if kind is int else "number"}
    if lo is not None:
        out["minimum"], out["maximum"] = lo, hi
    if description:
        out["description"] = description
    return out


STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}], "description": "stop strings"}
ANY_OBJECT = {"type": "object", "additionalProperties": True}


def _sampling(names: Iterable[str]) -> dict[str, Any]:
    return {n: _num(n) for n in names}


def _body(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _responses(ok: str, media: str = "application/json", errors: Iterable[int] = (400, 404, 503),
               dialect: str = "openai") -> dict[str, Any]:
    error = "#/components/schemas/OllamaError" if dialect == "ollama" else "#/components/schemas/OpenAIError"
    out: dict[str, Any] = {"200": {"description": ok, "content": {media: {"schema": ANY_OBJECT if media == "application/json" else {"type": "string"}}}}}
    for code in (*errors, 401, 413):
        out[str(code)] = {"description": _REASONS.get(code, "error"), "content": {"application/json": {"schema": {"$ref": error}}}}
    return out


_REASONS = {400: "bad request (malformed JSON, wrong type, out-of-range value)", 401: "missing or wrong API key",
            403: "the model is not in the models folder", 404: "unknown model", 413: "body too large",
            502: "the Hub download failed", 503: "queue full or model loading (see Retry-After)"}

TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1},
        "arguments": {"oneOf": [{"type": "object"}, {"type": "string", "description": "OpenAI's: the object as JSON"}]}}}}}
MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {"type": "object", "properties": {
        "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}, "required": ["type", "text"]}}]},
    "tool_calls": {"type": "array", "items": TOOL_CALL, "description": "an assistant's calls"},
    "tool_call_id": {"type": "string", "description": "a tool message: the call it answers (OpenAI)"},
    "tool_name": {"type": "string", "description": "a tool message: the tool's name (Ollama)"},
    "name": {"type": "string"},
}}


def _tool(type_required: bool) -> dict[str, Any]:
    return {"type": "object", "required": ["type", "function"] if type_required else ["function"], "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
            "parameters": {"type": "object", "description": "JSON Schema of the arguments"}}}}}


TOOLS_DOC = "tools the model may call (a 400 where its chat template has no place for them)"
OPENAI_TOOLS = {
    "tools": {"type": "array", "items": _tool(True), "description": TOOLS_DOC},
    "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                              {"type": "object", "required": ["type", "function"], "properties": {
                                  "type": {"type": "string", "enum": ["function"]},
                                  "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}],
                    "description": "none: no tools; any other: tools sent, calls not forced"},
    "parallel_tool_calls": {"type": "boolean", "description": "accepted and ignored"},
}
OLLAMA_TOOLS = {"type": "array", "items": _tool(False), "description": TOOLS_DOC}

OPENAI_SAMPLING = {
    "model": {"type": "string", "description": "a name from /v1/models (default: the loaded model)"},
    "max_tokens": _num("max_tokens"), "max_completion_tokens": _num("max_tokens"),
    "temperature": _num("temperature"), "top_p": _num("top_p"), "top_k": _num("top_k"), "min_p": _num("min_p"),
    "repeat_penalty": _num("repeat_penalty"), "presence_penalty": _num("presence_penalty"),
    "frequency_penalty": _num("frequency_penalty"), "seed": {"type": "integer"}, "stop": STOP,
    "n": {"type": "integer", "enum": [1]}, "stream": {"type": "boolean"},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "description": "token id (a string) -> a value added to its logit"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}

OLLAMA_OPTIONS = {"type": "object", "properties": {
    "temperature": _num("temperature"), "top_k": _num("top_k"), "top_p": _num("top_p"), "min_p": _num("min_p"),
    "repeat_penalty": _num("repeat_penalty"), "presence_penalty": _num("presence_penalty"),
    "frequency_penalty": _num("frequency_penalty"), "repeat_last_n": _num("repeat_last_n"),
    "num_predict": {"type": "integer", "minimum": -2, "maximum": RANGES["max_tokens"][2],
                    "not": {"const": 0}, "description": "tokens to generate; -1/-2 = up to the context size"},
    "seed": {"type": "integer"}, "stop": {"type": "array", "items": {"type": "string"}},
    "num_ctx": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
}, "additionalProperties": True}

JSON_FORMAT = {"oneOf": [{"type": "string", "enum": ["json"], "description": "the answer is one JSON object"},
                         {"type": "object", "description": "a JSON schema the answer follows (structured outputs)"}]}
RESPONSE_FORMAT = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "description": "with type json_schema: the answer follows `schema`",
                    "properties": {"name": {"type": "string"}, "schema": {"type": "object"}, "strict": {"type": "boolean"}}}}}
ANTHROPIC_BLOCK = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["text", "tool_use", "tool_result", "thinking"]}, "text": {"type": "string"},
    "id": {"type": "string"}, "name": {"type": "string"}, "input": {"type": "object"},
    "tool_use_id": {"type": "string"}, "content": {"oneOf": [{"type": "string"}, {"type": "array"}]}}}
ANTHROPIC_BODY = {
    "model": {"type": "string"}, "max_tokens": _num("max_tokens"),
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": ANTHROPIC_BLOCK}]}}}},
    "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": ANTHROPIC_BLOCK}]},
    "stream": {"type": "boolean"}, "temperature": _num("temperature"), "top_p": _num("top_p"), "top_k": _num("top_k"),
    "stop_sequences": {"type": "array", "items": {"type": "string"}},
    "tools": {"type": "array", "items": {"type": "object", "required": ["name", "input_schema"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"}, "input_schema": {"type": "object"}}}},
    "tool_choice": {"type": "object", "properties": {"type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
                                                     "name": {"type": "string"}}},
    "thinking": {"type": "object", "properties": {"type": {"type": "string", "enum": ["enabled", "disabled", "adaptive"]},
                                                  "budget_tokens": {"type": "integer"}}},
    "output_config": {"type": "object", "properties": {"format": {"type": "object", "required": ["type", "schema"], "properties": {
        "type": {"type": "string", "enum": ["json_schema"]}, "schema": {"type": "object"}}}}},
}
RESPONSES_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"type": "string", "enum": ["input_text", "output_text"]}, "text": {"type": "string"}}}
RESPONSES_ITEM = {"oneOf": [
    {"type": "object", "required": ["role", "content"], "description": "a message", "properties": {
        "type": {"type": "string", "enum": ["message"]}, "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": RESPONSES_PART}]}}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "description": "an earlier call", "properties": {
        "type": {"type": "string", "enum": ["function_call"]}, "call_id": {"type": "string"}, "name": {"type": "string"},
        "arguments": {"type": "string", "description": "a JSON object, as text"}}},
    {"type": "object", "required": ["type", "call_id", "output"], "description": "a call's result", "properties": {
        "type": {"type": "string", "enum": ["function_call_output"]}, "call_id": {"type": "string"}, "output": {"type": "string"}}},
]}
RESPONSES_BODY = {
    "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": RESPONSES_ITEM, "minItems": 1}]},
    "instructions": {"type": "string", "description": "the system prompt"},
    "model": {"type": "string"}, "stream": {"type": "boolean"},
    "max_output_tokens": _num("max_tokens"), "temperature": _num("temperature"), "top_p": _num("top_p"),
    "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
        "type": {"type": "string", "enum": ["function"]}, "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"}, "parameters": {"type": "object"}}}, "description": "function tools only"},
    "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                              {"type": "object", "required": ["type", "name"], "properties": {
                                  "type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"}}}]},
    "text": {"type": "object", "properties": {"format": {"type": "object", "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]}, "name": {"type": "string"},
        "schema": {"type": "object"}, "strict": {"type": "boolean"}}}}},
    "reasoning": {"type": "object", "properties": {"effort": {"type": "string"}}},
    "store": {"type": "boolean", "description": "accepted; nothing is stored"},
}
SUFFIX = {"type": "string", "description": "fill-in-the-middle: the code after the gap (`prompt` is the code before); "
                                         "a model without fill-in-the-middle tokens answers 400"}
LOGPROBS = {"logprobs": {"type": "boolean", "description": "each token's log-probability"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "description": "alternatives per token (needs logprobs)"}}
THINK = {"type": "boolean", "description": "a reasoning model thinks first, its reasoning kept apart (default: the server's setting)"}
OLLAMA_THINK = {"oneOf": [THINK, {"type": "string", "enum": ["low", "medium", "high"], "description": "think (any level)"}]}
EFFORT = {"type": "string", "enum": ["none", "minimal", "low", "medium", "high", "xhigh"],
          "description": "none: a reasoning model answers without thinking; any other level: it thinks"}
OPENAI_REASONING = {
    "reasoning_effort": EFFORT,
    "reasoning": {"type": "object", "properties": {"effort": EFFORT}, "description": "Ollama's form of reasoning_effort"},
    "chat_template_kwargs": {"type": "object", "properties": {"enable_thinking": {"type": "boolean"}},
                             "description": "vLLM's and llama-server's: only enable_thinking is read"},
    "think": THINK,
}
KEEP_ALIVE = {"oneOf": [{"type": "number"}, {"type": "string", "pattern": r"^-?\d+(\.\d+)?(ns|us|ms|s|m|h)?$"}]}
MODEL = {"type": "string", "description": "a name from /api/tags (default: the loaded model)"}


def _paths() -> dict[str, Any]:
    json_ok = "the answer"
    return {
        "/health": {"get": {"summary": "server and model status (503 while a model loads)", "operationId": "health",
                            "responses": {"200": {"description": "ready or idle", "content": {"application/json": {"schema": ANY_OBJECT}}},
                                          "503": {"description": "a model is loading", "content": {"application/json": {"schema": ANY_OBJECT}}}}}},
        "/generate": {"post": {"summary": "generate text from a prompt (SSE when stream is true)", "operationId": "generate",
                               "requestBody": _body({"prompt": {"type": "string"}, "system": {"type": "string"},
                                                     "raw": {"type": "boolean"}, "stream": {"type": "boolean"},
                                                     "model": {"type": "string"},
                                                     **_sampling(("max_tokens", "temperature", "top_p", "top_k", "min_p",
                                                                  "repeat_penalty", "presence_penalty", "frequency_penalty",
                                                                  "repeat_last_n")),
                                                     "seed": {"type": "integer"}, "stop": STOP, "format": JSON_FORMAT,
                                                     "think": THINK}, ["prompt"]),
                               "responses": _responses(json_ok)}},
        "/chat/completions": {"post": {"summary": "chat (same wire format as /v1/chat/completions; streams unless stream is false or the client accepts only JSON)", "operationId": "nativeChat",
                                       "requestBody": _body({"messages": {"type": "array", "items": MESSAGE, "minItems": 1},
                                                             "response_format": RESPONSE_FORMAT, **OPENAI_SAMPLING, **OPENAI_REASONING,
                                                             **OPENAI_TOOLS}, ["messages"]),
                                       "responses": _responses(json_ok)}},
        "/v1/models": {"get": {"summary": "usable models", "operationId": "openaiModels", "responses": _responses("model list", errors=())}},
        "/v1/models/{model}": {"get": {"summary": "one model", "operationId": "openaiModel",
                                       "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                                       "responses": _responses("model", errors=(404,))}},
        "/v1/chat/completions": {"post": {"summary": "OpenAI chat completions (SSE when stream is true)", "operationId": "openaiChat",
                                          "requestBody": _body({"messages": {"type": "array", "items": MESSAGE, "minItems": 1},
                                                                "response_format": RESPONSE_FORMAT, **OPENAI_SAMPLING, **OPENAI_REASONING,
                                                             **OPENAI_TOOLS, **LOGPROBS}, ["messages"]),
                                          "responses": _responses(json_ok)}},
        "/v1/messages": {"post": {"summary": "Anthropic Messages API (SSE events when stream is true)",
                                  "operationId": "anthropicMessages",
                                  "requestBody": _body(ANTHROPIC_BODY, ["messages", "max_tokens"]), "responses": _responses(json_ok)}},
        "/v1/messages/count_tokens": {"post": {"summary": "the prompt's tokens (chat template and tools included)",
                                               "operationId": "anthropicCountTokens",
                                               "requestBody": _body({k: v for k, v in ANTHROPIC_BODY.items() if k != "max_tokens"},
                                                                    ["messages"]),
                                               "responses": _responses("token count")}},
        "/v1/responses": {"post": {"summary": "OpenAI Responses API, stateless (SSE events when stream is true)",
                                   "operationId": "openaiResponses",
                                   "requestBody": _body(RESPONSES_BODY, ["input"]), "responses": _responses(json_ok)}},
        "/v1/completions": {"post": {"summary": "OpenAI text completions (no chat template)", "operationId": "openaiCompletions",
                                     "requestBody": _body({"prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]},
                                                           "echo": {"type": "boolean"}, **OPENAI_SAMPLING, "suffix": SUFFIX,
                                                           "logprobs": {"type": "integer", "minimum": 0, "maximum": 5,
                                                                        "description": "alternatives per token (legacy form)"}}, ["prompt"]),
                                     "responses": _responses(json_ok)}},
        "/v1/embeddings": {"post": {"summary": "OpenAI embeddings (default model: all-MiniLM-L6-v2)", "operationId": "openaiEmbeddings",
                                    "requestBody": _body({"input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
                                                          "model": {"type": "string"},
                                                          "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                                                          "dimensions": {"type": "integer", "minimum": 1}}, ["input"]),
                                    "responses": _responses("embeddings")}},
        "/": {"get": {"summary": "Ollama's liveness probe", "operationId": "ollamaRoot",
                      "responses": {"200": {"description": "Ollama is running", "content": {"text/plain": {"schema": {"type": "string"}}}}}},
              "head": {"summary": "Ollama's liveness probe", "operationId": "ollamaRootHead", "responses": {"200": {"description": "running"}}}},
        "/api/version": {"get": {"summary": "server version", "operationId": "ollamaVersion", "responses": _responses("version", errors=(), dialect="ollama")}},
        "/api/generate": {"post": {"summary": "Ollama generate (NDJSON stream by default; empty prompt loads, keep_alive 0 unloads)",
                                   "operationId": "ollamaGenerate",
                                   "requestBody": _body({"model": MODEL, "prompt": {"type": "string"}, "system": {"type": "string"},
                                                         "raw": {"type": "boolean"}, "stream": {"type": "boolean"},
                                                         "context": {"type": "array", "items": {"type": "integer"}},
                                                         "format": JSON_FORMAT, "think": OLLAMA_THINK, **LOGPROBS, "suffix": SUFFIX,
                                                         "keep_alive": KEEP_ALIVE, "options": OLLAMA_OPTIONS}),
                                   "responses": _responses(json_ok, dialect="ollama")}},
        "/api/chat": {"post": {"summary": "Ollama chat (NDJSON stream by default; empty messages loads, keep_alive 0 unloads)",
                               "operationId": "ollamaChat",
                               "requestBody": _body({"model": MODEL, "messages": {"type": "array", "items": MESSAGE},
                                                     "stream": {"type": "boolean"}, "keep_alive": KEEP_ALIVE, "format": JSON_FORMAT,
                                                     "think": OLLAMA_THINK, "options": OLLAMA_OPTIONS, "tools": OLLAMA_TOOLS,
                                                     **LOGPROBS}),
                               "responses": _responses(json_ok, dialect="ollama")}},
        "/api/tags": {"get": {"summary": "every usable model in the library", "operationId": "ollamaTags",
                              "responses": _responses("models", errors=(), dialect="ollama")},
                      "post": {"summary": "same as GET (as the original tool answered)", "operationId": "ollamaTagsPost",
                               "responses": _responses("models", errors=(), dialect="ollama")}},
        "/api/show": {"post": {"summary": "details of a model", "operationId": "ollamaShow",
                               "requestBody": _body({"model": {"type": "string"}, "verbose": {"type": "boolean"}}, ["model"]),
                               "responses": _responses("model details", errors=(400, 404), dialect="ollama")}},
        "/api/ps": {"get": {"summary": "the loaded model", "operationId": "ollamaPs", "responses": _responses("loaded models", errors=(), dialect="ollama")}},
        "/api/embed": {"post": {"summary": "embeddings of one or more inputs", "operationId": "ollamaEmbed",
                                "requestBody": _body({"model": MODEL, "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                                                      "truncate": {"type": "boolean"}, "keep_alive": KEEP_ALIVE,
                                                      "dimensions": {"type": "integer", "minimum": 1,
                                                                     "description": "the first N values, scaled to length 1"},
                                                      "options": ANY_OBJECT}, ["input"]),
                                "responses": _responses("embeddings", dialect="ollama")}},
        "/api/embeddings": {"post": {"summary": "embedding of one prompt (superseded by /api/embed)", "operationId": "ollamaEmbeddings",
                                     "requestBody": _body({"model": MODEL, "prompt": {"type": "string"},
                                                           "keep_alive": KEEP_ALIVE, "options": ANY_OBJECT}),
                                     "responses": _responses("embedding", dialect="ollama")}},
        "/api/pull": {"post": {"summary": "download a model from the Hugging Face Hub (org/repo or hf.co/org/repo:QUANT) with NDJSON progress",
                               "operationId": "ollamaPull",
                               "requestBody": _body({"model": {"type": "string"}, "insecure": {"type": "boolean"},
                                                     "stream": {"type": "boolean"}}, ["model"]),
                               "responses": _responses("status lines", media="application/x-ndjson", errors=(400, 404, 502), dialect="ollama")}},
        "/api/delete": {"delete": {"summary": "delete a model from the models folder", "operationId": "ollamaDelete",
                                   "requestBody": _body({"model": {"type": "string"}}, ["model"]),
                                   "responses": _responses("deleted", errors=(400, 403, 404), dialect="ollama")}},
        "/openapi.json": {"get": {"summary": "this description", "operationId": "openapi",
                                  "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": ANY_OBJECT}}}}}},
    }


def openapi_schema(routes: Iterable[Any] = ()) -> dict[str, Any]:
    paths = _paths()
    for route in routes:  # keep the description true: every route and method must be in it
        path = route.path.replace("{model:path}", "{model}")
        for method in route.methods or ():
            if method != "HEAD" or path == "/":
                assert method.lower() in paths.get(path, {}), f"/openapi.json lacks {method} {path}"
    return {
        "openapi": "3.1.0",
        "info": {"title": "Influence local API", "version": influence_tui.__version__,
                 "description": "Native, OpenAI-compatible and Ollama-compatible routes over one local engine."},
        "paths": paths,
        "components": {
            "schemas": {
                "OllamaError": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "integer", "null"]}}}}},
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
