"""What the client asked for: the request body, read, checked and changed.

``read_request`` is the one step of the proxy that looks inside a request
(README, "Request body"): refusals by route (management, Ollama cloud
models), the body read under MAX_BODY_BYTES and decoded if it came
compressed, an inference body parsed as strictly as Ollama's Go decoder
reads it, and the gateway's two changes (the default model, ``keep_alive``).
It returns a ``ProxiedRequest``: values only, nothing to release.
"""

import dataclasses
import email.parser
import email.policy
import email.utils
import io
import json
import quopri
import re
import urllib.parse
import zlib

from edgegate_errors import GatewayError, printable, short_message


# Every POST route that runs a model, and the kind of body it has: "json", or
# "multipart" (a form whose ``model`` field names the model). The next route
# Ollama adds is one line here.
INFERENCE_ROUTES = {
    "/api/generate": "json", "/api/chat": "json", "/api/embed": "json", "/api/embeddings": "json",
    "/v1/chat/completions": "json", "/v1/completions": "json", "/v1/responses": "json",
    "/v1/embeddings": "json", "/v1/messages": "json", "/v1/audio/transcriptions": "multipart",
}
EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/api/embed", "/api/embeddings"})
# Routes that change the box's models, or act for (and spend) the box
# owner's ollama.com account: refused unless ALLOW_MANAGEMENT=1. Every route
# under /api/experimental/ is one (Ollama's are web_search, web_fetch and
# model-recommendations, and each calls ollama.com: server/routes.go).
MANAGEMENT_PATHS = frozenset({
    "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
    "/api/me", "/api/signout", "/api/experimental", "/api/blobs",
})
MANAGEMENT_PREFIXES = ("/api/blobs/", "/api/user/keys", "/api/experimental/")
# What the gateway refuses as an Ollama cloud model unless ALLOW_OLLAMA_CLOUD=1
# (README, "Ollama cloud models"): Ollama's own rule (``ollama_runs_in_cloud``)
# and, to be safe, a name without a tag that ends in "-cloud" too.
OLLAMA_CLOUD_MODEL_RE = re.compile(r"(?:[-:]\s*cloud|:[^:/]*-cloud)\s*\Z", re.IGNORECASE)
# Tools that make Ollama search the web on ollama.com with the box's key, for
# local models too (README, "Ollama cloud models"): on /v1/messages any tool
# type that starts with "web_search" (middleware/anthropic.go hasWebSearchTool;
# server/cloud_proxy.go trims it first), on /v1/responses the type
# "web_search" (openai/responses.go isWebSearchTool).
WEB_SEARCH_TOOLS = {"/v1/messages": lambda kind: kind.startswith("web_search"),
                    "/v1/responses": lambda kind: kind == "web_search"}
@dataclasses.dataclass
class ProxiedRequest:
    """What the client asked for, checked: the body to send upstream (the
    bytes as they came unless a change was made) and, on an inference
    route, its document (the parsed JSON, or the form's model)."""

    path: str
    method: str
    body: bytes
    document: dict = None
    decoded: bool = False  # the body came compressed and is sent decoded
    model: str = None
    stream: bool = False

    @property
    def inference(self):
        return self.document is not None

    @property
    def to_cloud(self):
        return self.inference and is_cloud_model(self.document)

    @property
    def on_gpu(self):
        """Runs on this box's GPU: not the cloud route, not what Ollama runs on ollama.com."""
        model = self.document.get("model") if self.inference else None
        return self.inference and not self.to_cloud and not ollama_runs_in_cloud(model)


def read_request(config, environ, path, method, key):
    """Refusals first, then the body: decoded if it came compressed, parsed
    and adjusted on an inference route, passed on as it came elsewhere.
    ``key``: the ApiKey the request came with (None when keys are off)."""
    if path.rstrip("/") in MANAGEMENT_PATHS or path.startswith(MANAGEMENT_PREFIXES):
        if not config.allow_management:
            raise GatewayError(403, "management_disabled",
                               "%s is disabled on this gateway (set ALLOW_MANAGEMENT=1 to allow it)" % path)
        if key is not None and not key.admin:
            raise GatewayError(403, "management_disabled", "%s needs an admin key (GATEWAY_API_KEYS, "
                               "a line 'KEY NAME admin' in the key file)" % path)
    if path.startswith("/v1/models/") and method in ("GET", "HEAD"):  # Ollama asks ollama.com about a cloud model
        refuse_ollama_cloud(config, path[len("/v1/models/"):].strip())
    raw, decoded = decoded_body(environ, read_body(environ, config.max_body_bytes), config.max_body_bytes)
    kind = INFERENCE_ROUTES.get(path) if method == "POST" else None
    if path == "/api/show" and method == "POST":
        refuse_cloud_show(config, raw)
    if kind is None:
        return ProxiedRequest(path, method, raw, decoded=decoded)
    if kind == "multipart":
        models = form_models(environ, raw)
        for model in models[1:]:  # Ollama runs the first; none may be a refused one
            refuse_ollama_cloud(config, model)
        document, changed = {"model": models[0] if models else None}, False
    else:
        document = parse_json_object(raw)
        changed = False if is_cloud_model(document) else adjust_body(path, document, config)
        refuse_web_search(config, path, document)
    refuse_ollama_cloud(config, document.get("model"))
    stream = document.get("stream", path.startswith("/api/") and path not in EMBEDDING_PATHS)
    return ProxiedRequest(path, method, json.dumps(document).encode() if changed else raw, document, decoded,
                          model=document.get("model"), stream=bool(stream))
# The cloud route (README, "Cloud route"): a model named openai/<name> goes
# to OPENAI_BASE_URL (edgegate_cloud.py), never to this box's GPU.
CLOUD_PREFIX = "openai/"


def is_cloud_model(document):
    model = document.get("model") if document else None
    return isinstance(model, str) and model.startswith(CLOUD_PREFIX)


def ollama_runs_in_cloud(model):
    """Whether Ollama sends ``model`` to ollama.com, by its own rule
    (internal/modelref/modelref.go, parseSourceSuffix): the text after the
    last ":", trimmed and lower-cased, is "cloud", or ends in "-cloud" and
    has no "/"; ":local" forces local. So "foo-cloud" (no tag) is a local
    model to Ollama, and takes the GPU slot like one."""
    if not isinstance(model, str) or ":" not in model:
        return False
    suffix = model.strip().rpartition(":")[2].strip()
    return suffix.lower() == "cloud" or ("/" not in suffix and suffix.lower().endswith("-cloud"))


def refuse_ollama_cloud(config, model):
    if isinstance(model, str) and not config.allow_ollama_cloud and (
            OLLAMA_CLOUD_MODEL_RE.search(model) or ollama_runs_in_cloud(model)):
        raise GatewayError(403, "cloud_model_disabled",
                           "%s is an Ollama cloud model, run by ollama.com on this box owner's account; "
                           "it is disabled on this gateway (set ALLOW_OLLAMA_CLOUD=1 to allow it)" % printable(model))


def keys_read_as(document, name):
    """The values of every key of ``document`` that Go's encoding/json would
    read as the field ``name``: it matches keys without regard to case
    (Unicode simple folding: "Tools", "TOOLS", "toolſ"), the last one wins.
    All of them are returned, so that none goes unchecked."""
    return [value for key, value in document.items() if key.casefold() == name]


def refuse_web_search(config, path, document):
    """README, "Ollama cloud models": a web search tool makes Ollama itself
    search on ollama.com with the box's key, whatever the model."""
    wanted = WEB_SEARCH_TOOLS.get(path)
    if wanted is None or config.allow_ollama_cloud or is_cloud_model(document):
        return
    for tools in keys_read_as(document, "tools"):
        for tool in tools if isinstance(tools, list) else []:
            kinds = keys_read_as(tool, "type") if isinstance(tool, dict) else []
            if any(isinstance(kind, str) and wanted(kind.strip()) for kind in kinds):
                raise GatewayError(403, "cloud_tool_disabled",
                                   "the web search tool is run by ollama.com on this box owner's account; it is "
                                   "disabled on this gateway (set ALLOW_OLLAMA_CLOUD=1 to allow it)")


def refuse_cloud_show(config, raw):
    """POST /api/show of a cloud model makes Ollama ask ollama.com; it reads
    ``model``, or ``name`` when model is empty (server/routes.go ShowHandler).
    A body the gateway cannot read as Ollama does is refused."""
    if config.allow_ollama_cloud:
        return
    document = parse_json_object(raw)
    for model in keys_read_as(document, "model") + keys_read_as(document, "name"):
        refuse_ollama_cloud(config, model)


def form_models(environ, body):
    """The models a multipart request (a transcription) names, in the order
    Ollama reads them (Go's ``FormValue``: the query string first, then the
    form's values; it runs the first), without changing the body, which
    goes upstream as it came. A part is read as Go's mime/multipart reads
    it: its raw bytes, whatever its ``charset``; only a quoted-printable
    Content-Transfer-Encoding is decoded (multipart.go, newPart). A part
    with a filename is a file to Go, never the model; such parts named
    ``model`` come last, so that they are checked too but never taken for
    the model Ollama runs. A part that is itself a multipart or a message
    is refused."""
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get("model", [])
    try:
        message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
            b"Content-Type: " + environ.get("CONTENT_TYPE", "").encode("latin-1") + b"\r\n\r\n" + body)
        parts = message.get_payload() if message.is_multipart() else []
        named = [model for model in (_form_model(part) for part in parts) if model is not None]
    except GatewayError:
        raise
    except Exception as error:  # the email package's errors on a form it cannot take apart
        raise GatewayError(400, "invalid_request", "the multipart form cannot be read: %s" % short_message(error))
    form = [raw for raw, is_file in named if not is_file] + [raw for raw, is_file in named if is_file]
    return [m.strip() for m in query] + [m.decode("utf-8", "replace").strip() for m in form]


def _form_model(part):
    """(raw value, whether Go takes it for a file) of a part named ``model``, else None."""
    if part.is_multipart() or part.get_content_maintype() in ("multipart", "message"):
        raise GatewayError(400, "invalid_request", "a form part must not be a multipart or a message "
                           "(Ollama does not read nested parts)")
    name = part.get_param("name", header="content-disposition")
    if name is None or email.utils.collapse_rfc2231_value(name) != "model":
        return None
    raw = part.get_payload(decode=False)
    raw = raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
    if part.get("content-transfer-encoding", "").strip().lower() == "quoted-printable":
        raw = quopri.decodestring(raw)
    return raw, bool(part.get_filename())


def read_body(environ, limit):
    """The request body, refused with 413 before reading when too large."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length:
        try:
            declared = int(length)
        except ValueError:
            raise GatewayError(400, "invalid_request", "Content-Length is not a number")
        if declared > limit:
            raise GatewayError(413, "body_too_large",
                               "request body of %d bytes is over MAX_BODY_BYTES (%d)" % (declared, limit))
        return environ["wsgi.input"].read(declared) if declared else b""
    # No length: a chunked request body (gunicorn decodes it). Read one byte
    # past the limit to know whether it is over, never more.
    body = environ["wsgi.input"].read(limit + 1)
    if len(body) > limit:
        raise GatewayError(413, "body_too_large", "request body is over MAX_BODY_BYTES (%d)" % limit)
    return body


def decoded_body(environ, raw, limit):
    """A body sent compressed (``Content-Encoding`` gzip, deflate or zstd;
    coding agents send zstd), decoded a piece at a time, so that a small bomb
    is refused once its output passes MAX_BODY_BYTES, never inflated whole.
    Returns the body and whether it was decoded."""
    encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if encoding in ("", "identity"):
        return raw, False
    if encoding not in BODY_DECODERS:
        raise GatewayError(415, "unsupported_encoding", "Content-Encoding %s is not supported; send the body "
                           "plain or as gzip, deflate or zstd" % printable(encoding))
    pieces, size = [], 0
    try:
        for piece in BODY_DECODERS[encoding](raw):
            size += len(piece)
            if size > limit:
                raise GatewayError(413, "body_too_large", "request body is over MAX_BODY_BYTES (%d) once "
                                   "decoded from %s" % (limit, encoding))
            pieces.append(piece)
    except GatewayError:
        raise
    except Exception as error:  # zlib.error, EOFError, zstd's own errors: all mean a broken body
        raise GatewayError(400, "invalid_request", "the body is not valid %s: %s" % (encoding, short_message(error)))
    return b"".join(pieces), True


def _inflate(raw, wbits):
    decompressor = zlib.decompressobj(wbits)
    data = raw
    while data:
        yield decompressor.decompress(data, 65536)
        data = decompressor.unconsumed_tail
    yield decompressor.flush()
    if not decompressor.eof:
        raise EOFError("the compressed body ends early")


def _unzstd(raw):
    if zstd_reader is None:
        raise GatewayError(415, "unsupported_encoding", "zstd needs the zstandard package on Python < 3.14")
    reader = zstd_reader(io.BytesIO(raw))
    while True:
        piece = reader.read(65536)
        if not piece:
            return
        yield piece


try:  # zstd: in the standard library from Python 3.14, else the zstandard wheel (README, "Dependencies")
    from compression.zstd import ZstdFile as zstd_reader
except ImportError:
    try:
        import zstandard

        zstd_reader = zstandard.ZstdDecompressor().stream_reader
    except ImportError:
        zstd_reader = None

BODY_DECODERS = {
    "gzip": lambda raw: _inflate(raw, 16 + zlib.MAX_WBITS), "x-gzip": lambda raw: _inflate(raw, 16 + zlib.MAX_WBITS),
    "deflate": lambda raw: _inflate(raw, zlib.MAX_WBITS), "zstd": _unzstd,
}


def parse_json_object(raw):
    """The body as a JSON object, read as strictly as Ollama's decoder: UTF-8
    only, no NaN or Infinity, no lone surrogates; a ``model`` is a string."""
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_one_key_each)
        if b"\\u" in raw and re.search(rb"\\u[dD][89a-fA-F]", raw):  # encoded surrogates: all must pair up
            json.dumps(document, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and UnicodeEncodeError are ValueErrors
        raise GatewayError(400, "invalid_json", "request body is not valid JSON: %s" % str(e)[:200])
    if not isinstance(document, dict):
        raise GatewayError(400, "invalid_json", "request body must be a JSON object, not %s"
                           % type(document).__name__)
    if "model" in document and not isinstance(document["model"], str):
        raise GatewayError(400, "invalid_request", "model must be a string, not %s"
                           % type(document["model"]).__name__, )
    return document


def _refuse_constant(name):
    raise ValueError("%s is not JSON" % name)


def _one_key_each(pairs):
    """A JSON object whose keys Ollama reads as Python does. Go's decoder
    matches keys without regard to case and keeps the last of repeated ones,
    so {"model": "a", "MODEL": "b"} would run "b" there while this gateway
    checked "a": such bodies are refused."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a key appears twice in one object")
    for key in document:
        if key != "model" and key.casefold() == "model":
            raise ValueError("%r: the key is \"model\", in lower case" % key[:20])
    return document


def adjust_body(path, document, config):
    """The two changes the gateway makes to an inference body (README,
    "Request body"): the default model, and ``keep_alive`` on Ollama's
    native API. True when the document changed (else the original bytes go
    upstream)."""
    changed = False
    if config.default_model and (document.get("model") in config.model_aliases or "model" not in document):
        document["model"] = config.default_model
        changed = True
    if path.startswith("/api/") and config.keep_alive_default and "keep_alive" not in document:
        document["keep_alive"] = config.keep_alive_default
        changed = True
    return changed


