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
import json
import math
import quopri
import re
import urllib.parse
import zlib

from edgegate_errors import GatewayError, printable, short_message
from edgegate_spool import PIECE, SpoolFailed, take_given_share


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
    """What the client asked for, checked: the body to send upstream (a
    Spool: the bytes as they came unless a change was made) and, on an
    inference route, its document (the fields the exchange reads; whole
    for the cloud route, which builds its own body). ``close`` lets go of
    the body and of the budget share it may hold."""

    path: str
    method: str
    body: object  # edgegate_spool.Spool
    document: dict = None
    decoded: bool = False  # the body came compressed and is sent decoded
    model: str = None
    stream: bool = False
    share: object = None  # the worker's body budget, held while a whole document is kept

    def let_go_of_document(self):
        """The cloud route's body is built: keep only what the exchange reads."""
        if self.document is not None:
            self.document = {k: self.document[k] for k in ("model", "keep_alive", "stream") if k in self.document}
        self.give_back_share()

    def give_back_share(self):
        share, self.share = self.share, None
        if share is not None:
            share.release()

    def close(self):
        self.let_go_of_document()
        self.body.close()

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


def read_request(config, room, environ, path, method, key):
    """Refusals first, then the body: decoded if it came compressed, parsed
    and adjusted on an inference route, passed on as it came elsewhere.
    ``room``: the worker's BodyRoom (edgegate_spool.py), where the body is
    kept; ``key``: the ApiKey the request came with (None when keys are off).
    The ProxiedRequest it returns holds the body until its ``close``."""
    if path.rstrip("/") in MANAGEMENT_PATHS or path.startswith(MANAGEMENT_PREFIXES):
        if not config.allow_management:
            raise GatewayError(403, "management_disabled",
                               "%s is disabled on this gateway (set ALLOW_MANAGEMENT=1 to allow it)" % path)
        if key is not None and not key.admin:
            raise GatewayError(403, "management_disabled", "%s needs an admin key (GATEWAY_API_KEYS, "
                               "a line 'KEY NAME admin' in the key file)" % path)
    if path.startswith("/v1/models/") and method in ("GET", "HEAD"):  # Ollama asks ollama.com about a cloud model
        refuse_ollama_cloud(config, path[len("/v1/models/"):].strip())
    given = take_given_share()  # the budget the worker took for a large body before this thread had it
    request = None
    try:
        body, decoded = decoded_body(environ, read_body(environ, config.max_body_bytes, room),
                                     config.max_body_bytes, room)
        request, given = ProxiedRequest(path, method, body, decoded=decoded, share=given), None
        kind = INFERENCE_ROUTES.get(path) if method == "POST" else None
        if path == "/api/show" and method == "POST":
            refuse_cloud_show(config, room, request)
        if kind is not None:
            read_document(config, room, environ, request, kind)
        else:
            request.give_back_share()  # passed on as it came: never whole in memory
    except BaseException as error:
        if given is not None:
            given.release()
        if request is not None:
            request.close()
        if isinstance(error, SpoolFailed):
            raise GatewayError(503, "body_not_stored", str(error), headers=[("Retry-After", "5")])
        raise
    return request


def read_document(config, room, environ, request, kind):
    """An inference body, read whole under the worker's budget: the model
    checked, the gateway's changes made (the body re-written to a new spool
    when changed). Only the few fields the rest of the exchange reads are
    kept afterwards, and the budget is given back -- but for the cloud
    route, which builds its own body from the document later."""
    share, request.share = take_share(room, request.body, kind, request.share), None
    try:
        if kind == "multipart":
            models = form_models(environ, request.body.read_all())
            for model in models[1:]:  # Ollama runs the first; none may be a refused one
                refuse_ollama_cloud(config, model)
            document, changed, replaced = {"model": models[0] if models else None}, {}, []
        else:
            document = parse_json_object(request.body)
            changed, replaced = ({}, []) if is_cloud_model(document) else adjust_body(request.path, document, config)
            refuse_web_search(config, request.path, document)
        refuse_ollama_cloud(config, document.get("model"))
        request.model = document.get("model")
        request.stream = bool(document.get("stream", request.path.startswith("/api/")
                                            and request.path not in EMBEDDING_PATHS))
        was_empty = len(document) == len(changed)
        if replaced:  # a field the client sent is changed: the document is written again, whole
            rewrite(request, json_spool(document, room))
        request.document, request.share, share = document, share, None
        del document  # the request's is now the one reference: let_go_of_document frees it
        if not request.to_cloud:
            request.let_go_of_document()  # the budget is free for the next body before this one is copied
    finally:
        if share is not None:
            share.release()
    if changed and not replaced:
        rewrite(request, with_fields_added(request.body, changed, room, was_empty))
    request.body.written()


def rewrite(request, body):
    request.body.close()
    request.body = body


def take_share(room, body, kind, given=None):
    """The budget a body needs to be read whole (None for a small one,
    which stays in memory anyway): its text's size in memory. ``given``:
    the share the worker took before the request had a thread, made exact
    now (a compressed body that decodes to more than the worker guessed
    takes its turn again here, in its thread); without one (a batch item, another server
    than gunicorn) the turn is waited for here. Past BODY_WAIT_S it is 503
    with Retry-After (README, "Large request bodies")."""
    if not body.on_disk:
        if given is not None:
            given.release()
        return None
    # A form is parsed by the email package, which keeps the whole body as
    # text with escaped bytes (2 bytes a byte) beside the bytes: 4 per byte, counted.
    cost = len(body) * (4 if kind == "multipart" else body.width)
    if given is not None:  # the worker's estimate, made exact: a compressed body's size is known now
        if cost <= given.cost:
            given.shrink(cost)
            return given
        given.release()  # not held while the rest is waited for: two such waits would hold each other up
    share = room.budget.take(cost, room.wait_s)
    if share is None:
        raise GatewayError(503, "body_memory_busy", "this worker is reading as many large request bodies as "
                           "BODY_MEMORY_BYTES allows; retry shortly", headers=[("Retry-After", "1")])
    return share


def with_fields_added(body, fields, room, was_empty):
    """The body as it came, with ``fields`` (new keys) put first in its
    object: the client's bytes are copied, not parsed and written again,
    so that a large body is never held twice (README, "Large request
    bodies"). The object's first byte that is not white space is its ``{``."""
    added = ", ".join(json.dumps(key) + ": " + json.dumps(value, allow_nan=False) for key, value in fields.items())
    spool, inserted = room.spool(), False
    for piece in body.pieces():
        at = -1 if inserted else piece.find(b"{")
        if at >= 0:
            separator = b"" if was_empty else b", "  # {} becomes {"keep_alive": "30s"}
            piece = piece[:at + 1] + added.encode("utf-8") + separator + piece[at + 1:]
            inserted = True
        spool.write(piece)
    return spool


def json_spool(document, room):
    """The document as the JSON body sent upstream, in a spool. Never
    anything that is not JSON: ``allow_nan=False`` (a number Python reads
    as infinite is refused before, in ``parse_json_object``)."""
    text = json.dumps(document, allow_nan=False, ensure_ascii=False)
    spool = room.spool()
    for at in range(0, len(text), PIECE):
        spool.write(text[at:at + PIECE].encode("utf-8"))
    return spool


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


def refuse_cloud_show(config, room, request):
    """POST /api/show of a cloud model makes Ollama ask ollama.com; it reads
    ``model``, or ``name`` when model is empty (server/routes.go ShowHandler).
    A body the gateway cannot read as Ollama does is refused."""
    if config.allow_ollama_cloud:
        return
    share, request.share = take_share(room, request.body, "json", request.share), None
    try:
        document = parse_json_object(request.body)
    finally:
        request.body.written()  # read again from its start when it is sent
        if share is not None:
            share.release()
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


def read_json_body(environ, room, limit, setting="MAX_BODY_BYTES"):
    """The JSON object of a body the gateway answers itself (a batch's):
    read as every body is -- spooled, decoded, within the worker's budget
    for parsing, as strictly as Ollama reads JSON."""
    given = take_given_share()
    try:
        body, _ = decoded_body(environ, read_body(environ, limit, room, setting), limit, room, setting)
    except BaseException:
        if given is not None:
            given.release()
        raise
    try:
        share = take_share(room, body, "json", given)
        try:
            return parse_json_object(body)
        finally:
            if share is not None:
                share.release()
    finally:
        body.close()


def read_body(environ, limit, room, setting="MAX_BODY_BYTES"):
    """The request body, in a Spool; refused with 413 before reading when
    too large (over ``limit``, the value of ``setting``)."""
    length = environ.get("CONTENT_LENGTH") or ""
    if length:
        try:
            declared = int(length)
        except ValueError:
            raise GatewayError(400, "invalid_request", "Content-Length is not a number")
        if declared > limit:
            raise GatewayError(413, "body_too_large",
                               "request body of %d bytes is over %s (%d)" % (declared, setting, limit))
    # No length: a chunked request body (gunicorn decodes it). Read one byte
    # past the limit to know whether it is over, never more.
    left = declared if length else limit + 1
    spool = room.spool()
    try:
        while left > 0:
            piece = environ["wsgi.input"].read(min(PIECE, left))
            if not piece:
                break
            spool.write(piece)
            left -= len(piece)
        if len(spool) > limit:
            raise GatewayError(413, "body_too_large", "request body is over %s (%d)" % (setting, limit))
    except BaseException:
        spool.close()
        raise
    return spool.written()


def decoded_body(environ, raw, limit, room, setting="MAX_BODY_BYTES"):
    """A body sent compressed (``Content-Encoding`` gzip, deflate or zstd;
    coding agents send zstd), decoded a piece at a time into a new spool,
    so that a small bomb is refused once its output passes MAX_BODY_BYTES,
    never inflated whole. Every body has decoders of its own (a zstd
    decompressor shared by threads gives wrong answers and can crash the
    process). Returns the body and whether it was decoded."""
    encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if encoding in ("", "identity") or not raw:  # no body (a GET with a stray header): nothing to decode
        return raw, False
    decoded = None
    try:
        if encoding not in BODY_DECODERS:
            raise GatewayError(415, "unsupported_encoding", "Content-Encoding %s is not supported; send the body "
                               "plain or as gzip, deflate or zstd" % printable(encoding))
        decoded = room.spool()
        for piece in BODY_DECODERS[encoding](raw):
            decoded.write(piece)
            if len(decoded) > limit:
                raise GatewayError(413, "body_too_large", "request body is over %s (%d) once "
                                   "decoded from %s" % (setting, limit, encoding))
        return decoded.written(), True
    except BaseException as error:
        if decoded is not None:
            decoded.close()
        if isinstance(error, Exception) and not isinstance(error, GatewayError):
            # zlib.error, EOFError, zstd's own errors: all mean a broken body
            error = GatewayError(400, "invalid_request", "the body is not valid %s: %s"
                                 % (encoding, short_message(error)))
        raise error
    finally:
        raw.close()


def _inflate(raw, wbits):
    """gzip (wbits 16 + 15) or deflate (zlib's format, RFC 9110 8.4.1.2).
    Several gzip members one after the other are one body (RFC 9110 8.4.1.3
    names RFC 1952, whose 2.2 allows them); anything else after the end is
    refused, never dropped."""
    decompressor = zlib.decompressobj(wbits)
    carry = b""  # the start of what follows a gzip member, too short yet to be judged
    for data in raw.pieces():
        data, carry = carry + data, b""
        while data:
            if decompressor.eof:  # a stream ended, and more came after it
                if wbits != zlib.MAX_WBITS and len(data) < 2:
                    carry = data
                    break
                if wbits == zlib.MAX_WBITS or data[:2] != b"\x1f\x8b":
                    raise ValueError("data after the end of the compressed stream")
                decompressor = zlib.decompressobj(wbits)
            yield decompressor.decompress(data, PIECE)
            data = decompressor.unconsumed_tail or decompressor.unused_data
    if carry:
        raise ValueError("data after the end of the compressed stream")
    yield decompressor.flush()
    if not decompressor.eof:
        raise EOFError("the compressed body ends early")


# zstd input fed at a time: one zstd block (at most 128 KiB of output) takes
# at least 4 bytes of input, so a call's output stays under 1 MiB.
ZSTD_STEP = 32


def _unzstd(raw):
    """zstd, frames one after the other (RFC 8878 3.1), each decoded by a
    decoder of this body's own and known to end (zstandard's stream reader
    ends quietly on a frame cut short; a frame decoder says ``eof``).
    Input goes in small steps, since one call decodes all it is given: so
    a bomb is stopped as it grows."""
    if zstd_frame_decoder is None:
        raise GatewayError(415, "unsupported_encoding", "zstd needs the zstandard package on Python < 3.14")
    frame = None
    for data in raw.pieces():
        view, at = memoryview(data), 0
        while at < len(view):
            if frame is None or frame.eof:
                frame = zstd_frame_decoder()
            step = view[at:at + ZSTD_STEP]
            at += len(step)
            yield frame.decompress(step)
            if frame.eof:
                at -= len(frame.unused_data)  # the next frame's first bytes: fed again to its own decoder
    if frame is None or not frame.eof:
        raise EOFError("the zstd frame ends early")


# A decoder for one zstd frame, with ``decompress``, ``eof`` and
# ``unused_data``: the standard library's from Python 3.14, else the
# zstandard wheel's (README, "Dependencies"). Never shared: one per frame.
try:
    from compression.zstd import ZstdDecompressor as zstd_frame_decoder
except ImportError:
    try:
        import zstandard

        def zstd_frame_decoder():
            return zstandard.ZstdDecompressor().decompressobj(read_across_frames=False)
    except ImportError:
        zstd_frame_decoder = None

BODY_DECODERS = {
    "gzip": lambda raw: _inflate(raw, 16 + zlib.MAX_WBITS), "x-gzip": lambda raw: _inflate(raw, 16 + zlib.MAX_WBITS),
    "deflate": lambda raw: _inflate(raw, zlib.MAX_WBITS), "zstd": _unzstd,
}


def parse_json_object(body):
    """The body (a Spool) as a JSON object, read as strictly as Ollama's
    decoder: UTF-8 only, no NaN or Infinity, no number out of float64's
    range (Python would read 1e400 as infinity, which is not JSON), no lone
    surrogates; a ``model`` is a string."""
    try:
        text = body.read_all().decode("utf-8")  # the bytes go at once: only the text stays while parsing
        document = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                              object_pairs_hook=_one_key_each)
        if "\\u" in text and re.search(r"\\u[dD][89a-fA-F]", text):  # encoded surrogates: all must pair up
            del text
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


def _finite_float(text):
    number = float(text)
    if math.isinf(number):
        raise ValueError("the number %s is out of range" % text[:40])
    return number


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
    native API. Returns the fields set, {} when none (then the original
    bytes go upstream); the document is changed too."""
    changes = {}
    if config.default_model and (document.get("model") in config.model_aliases or "model" not in document):
        changes["model"] = config.default_model
    if path.startswith("/api/") and config.keep_alive_default and "keep_alive" not in document:
        changes["keep_alive"] = config.keep_alive_default
    replaced = [key for key in changes if key in document]
    document.update(changes)
    return changes, replaced


