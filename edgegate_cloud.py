"""The cloud route (README, "Cloud route"): ``openai/<model>`` goes to OPENAI_BASE_URL.

Its one seam with the core is ``cloud_forward``, which returns a Forward
(edgegate_upstream.py): /v1 as it came, /api/chat with a ``Translation``
of Ollama's chat into a chat completion and of the answer back.
"""

import json
import time

from edgegate_body import CLOUD_PREFIX
from edgegate_errors import GatewayError, short_message
from edgegate_upstream import Forward, forwarded_headers, upstream_target

CLOUD_PATHS = "/v1/* and /api/chat"


def cloud_forward(config, cloud, environ, request):
    """README, "Cloud route": ``openai/<model>`` goes to OPENAI_BASE_URL with
    the gateway's key and no GPU slot; /v1 as it is, /api/chat translated to
    a chat completion, and its answer back to Ollama's shape. This is the
    route's one seam with the core: a Forward, with a Translation or not."""
    document = request.document
    if not config.openai_api_key:
        raise GatewayError(503, "provider_not_configured",
                           "model %s needs the cloud route: set OPENAI_API_KEY" % document["model"],
                           provider="openai", stage="upstream_unreachable")
    if not (request.path.startswith("/v1/") or request.path == "/api/chat"):
        raise GatewayError(400, "invalid_request", "the cloud route (openai/...) serves %s" % CLOUD_PATHS)
    model = document["model"][len(CLOUD_PREFIX):]
    headers = forwarded_headers(environ, strip_keys=True)
    headers["Authorization"] = "Bearer " + config.openai_api_key
    headers["Content-Type"] = "application/json"
    if request.path != "/api/chat":
        body = json.dumps(dict(document, model=model), allow_nan=False).encode()
        return Forward(cloud, "openai", "the cloud (openai)", "POST",
                       upstream_target(environ, request.path), headers, body)
    chat = ollama_chat_to_openai(document, model)
    headers["Accept-Encoding"] = "identity"  # the translation reads the answer's bytes
    return Forward(cloud, "openai", "the cloud (openai)", "POST", "/v1/chat/completions", headers,
                   json.dumps(chat, allow_nan=False).encode(), Translation(document["model"], chat["stream"]))


class Translation:
    """The cloud's chat completion as Ollama's /api/chat answer: NDJSON lines
    when streaming, one JSON document otherwise."""

    def __init__(self, model, stream):
        self.model = model
        self.stream_format = "ndjson" if stream else None
        self.content_type = "application/x-ndjson" if stream else "application/json"

    def answer(self, chunks):
        return openai_stream_to_ollama(chunks, self.model)

    def whole(self, response, started):
        """A non-streamed answer, read whole (16 MiB at most) and translated
        before the client is answered: a broken one is a 502, never a 200.
        A failure to read it is the upstream's (requests' or urllib3's
        exception, named by the caller)."""
        raw = response.raw.read(16 * 1024 * 1024, decode_content=True)
        try:
            return openai_answer_to_ollama(json.loads(raw), self.model, started)
        except (ValueError, AttributeError, TypeError) as error:
            raise GatewayError(502, "upstream_error", "the cloud's answer is not a chat completion: %s"
                               % short_message(error), provider="openai", stage="upstream_error")


def _iso_now():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def ollama_chat_to_openai(document, model):
    """An Ollama /api/chat request as an OpenAI chat completion request."""
    request = {"model": model, "messages": [_openai_message(m, n) for n, m in enumerate(document.get("messages") or [])]}
    stream = document.get("stream", True) is not False  # Ollama streams unless told not to
    request["stream"] = stream
    if stream:
        request["stream_options"] = {"include_usage": True}
    options = document.get("options") or {}
    for ollama_name, openai_name in (("temperature", "temperature"), ("top_p", "top_p"), ("stop", "stop"),
                                     ("seed", "seed"), ("presence_penalty", "presence_penalty"),
                                     ("frequency_penalty", "frequency_penalty")):
        if options.get(ollama_name) is not None:
            request[openai_name] = options[ollama_name]
    if isinstance(options.get("num_predict"), int) and options["num_predict"] > 0:  # -1 and -2 mean no limit
        request["max_tokens"] = options["num_predict"]
    form = document.get("format")
    if form == "json":
        request["response_format"] = {"type": "json_object"}
    elif isinstance(form, dict):
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": form}}
    if document.get("tools"):
        request["tools"] = [dict(tool, type=tool.get("type", "function")) for tool in document["tools"]]
    return request


def _openai_message(message, position):
    converted = {"role": message.get("role", "user"), "content": message.get("content", "")}
    if message.get("images"):
        converted["content"] = [{"type": "text", "text": converted["content"]}] + [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}
            for image in message["images"]]
    if message.get("tool_calls"):
        converted["tool_calls"] = [
            {"id": "call_%d_%d" % (position, n), "type": "function",
             "function": {"name": call["function"]["name"],
                          "arguments": json.dumps(call["function"].get("arguments", {}))}}
            for n, call in enumerate(message["tool_calls"])]
    if converted["role"] == "tool":
        converted["tool_call_id"] = message.get("tool_call_id") or message.get("tool_name") or "call"
    return converted


def _ollama_tool_calls(calls):
    """OpenAI tool calls (arguments as a JSON string) in Ollama's shape (an object)."""
    converted = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {"_raw": function.get("arguments")}
        converted.append({"function": {"name": function.get("name"), "arguments": arguments}})
    return converted


def _ollama_final(model, finish_reason, usage, started):
    return {"model": model, "created_at": _iso_now(), "message": {"role": "assistant", "content": ""},
            "done": True, "done_reason": "length" if finish_reason == "length" else "stop",
            "total_duration": int((time.monotonic() - started) * 1e9),
            "prompt_eval_count": (usage or {}).get("prompt_tokens", 0),
            "eval_count": (usage or {}).get("completion_tokens", 0)}


def openai_answer_to_ollama(answer, model, started):
    """A non-streamed chat completion as Ollama's /api/chat answer."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    document = _ollama_final(model, choice.get("finish_reason"), answer.get("usage"), started)
    document["message"] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        document["message"]["tool_calls"] = _ollama_tool_calls(message["tool_calls"])
    return document


class CloudError(Exception):
    """An error event inside the cloud's stream."""


def openai_stream_to_ollama(chunks, model):
    """OpenAI's SSE chunks in, Ollama's NDJSON lines out: one line per
    content delta, tool calls (assembled from their fragments) in one line
    when complete, and a last ``done: true`` line with the token counts."""
    started = time.monotonic()
    pending, tool_calls, finish_reason, usage = b"", {}, None, None

    def line(document):
        return json.dumps(document).encode() + b"\n"

    def ending():
        out = b""
        if tool_calls:
            calls = [tool_calls[i] for i in sorted(tool_calls)]
            out += line({"model": model, "created_at": _iso_now(), "done": False,
                         "message": {"role": "assistant", "content": "", "tool_calls": _ollama_tool_calls(calls)}})
        return out + line(_ollama_final(model, finish_reason, usage, started))

    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b""
        for raw in lines:
            raw = raw.strip()
            if not raw.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = raw[5:].strip()
            if data == b"[DONE]":
                yield out + ending()
                return
            event = json.loads(data)
            if event.get("error"):
                error = event["error"]
                raise CloudError(error.get("message") if isinstance(error, dict) else str(error))
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                finish_reason = choice.get("finish_reason") or finish_reason
                for fragment in delta.get("tool_calls") or []:
                    call = tool_calls.setdefault(fragment.get("index", 0),
                                                 {"function": {"name": "", "arguments": ""}})
                    function = fragment.get("function") or {}
                    call["function"]["name"] += function.get("name") or ""
                    call["function"]["arguments"] += function.get("arguments") or ""
                if delta.get("content"):
                    out += line({"model": model, "created_at": _iso_now(), "done": False,
                                 "message": {"role": "assistant", "content": delta["content"]}})
        if out:
            yield out
    raise CloudError("the cloud stream ended without [DONE]")
