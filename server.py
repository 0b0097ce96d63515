"""ViP-LLaVA behind the OpenAI chat API, and a page to draw on a photo: `python server.py --model ID_OR_PATH`.

- `POST /v1/chat/completions`: OpenAI's chat format (text and `image_url` parts with data: URLs; `stream`,
  `max_tokens`, `temperature`, `top_p`, `seed`, `stop`), plus a vendor extension: a `visual_prompts` list on
  an image part, `[{"shape": "box", "coords": [x1, y1, x2, y2], "color": "red"}]` in the image's pixels,
  drawn with `visual_prompts.draw_visual_prompt` exactly as the command line draws it.
- `GET /v1/models`, `GET /health` (503 while the model loads), `POST /v1/draw` (an image part in, the marked
  image the model will see out, as a PNG data URL), `GET /` (server_page.html: draw, ask, watch the answer),
  `GET /metrics` (Prometheus' text format: requests running and waiting, tokens generated and reused, time to
  the first token; zeros while the model loads).

Glue, not model: it imports the library and adds HTTP. The model loads in a background thread once the
server listens (503 until then); then `engine.Engine` owns it and answers every request at once (continuous
batching over --max-slots cache slots): no lock, a short answer never waits for a long one, and a follow-up
that resends the conversation prefills only its new turn (`usage.prompt_tokens_details.cached_tokens` says how
many prompt tokens came from the cache). A streaming client that goes away cancels its request. Errors are
OpenAI-style JSON: 400 for a bad request, 413 over the body or pixel limit, 429 (with Retry-After) while
--max-queue requests already wait for a slot, 503 while loading, 500 (with no traceback) for a bug; one
request's error never touches the others, and the server keeps serving after each.
"""

import argparse
import asyncio
import base64
import binascii
import io
import json
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import weights
from engine import Cancelled, Engine, QueueFull, Request as EngineRequest
from processor import SYSTEM_PROMPT, fetch, load_image
from visual_prompts import draw_visual_prompt
from weights import log

PAGE = Path(__file__).resolve().parent / "server_page.html"
MAX_BODY_MB = 20  # a request body over this is refused (413): a 12 MP JPEG is ~5 MB, ~7 MB as base64
MAX_IMAGE_PIXELS = 50_000_000  # an image over this many pixels is refused (413) before it is decoded
DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (cut to what the context has left)
STOP = ["###"]  # the vipllava template's turn separator: the answer ends where the model starts a new turn
MAX_QUEUE = 64  # requests waiting for a cache slot before the next is refused with 429
RETRY_AFTER = 2  # seconds a 429 asks the client to wait: a slot frees whenever any answer ends


class APIError(Exception):
    """An error the client caused (or 503): becomes OpenAI's {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    # OpenAI's own 429 says type "requests" (a requests-per-minute limit), code "rate_limit_exceeded"
    kind = {413: "request_too_large", 429: "requests", 503: "service_unavailable"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_model(body, model_id: str):
    """OpenAI's 404 model_not_found for a `model` this server does not serve; its id and short name both answer."""
    name = body.get("model") if isinstance(body, dict) else None
    if name is not None and name not in (model_id, model_id.rstrip("/").rsplit("/", 1)[-1]):
        raise APIError(404, f"the model {name!r} does not exist here: this server serves {model_id!r} (GET /v1/models)",
                       "model", "model_not_found")


# ---------------------------------------------------------------------------- images
def decode_image(url: str, max_pixels: int, allow_urls: bool) -> Image.Image:
    """A data: URL (or, with --allow-urls, an http(s) URL) -> a decoded PIL image, upright (EXIF applied).

    The pixel count is checked from the header before decoding, so that a small file that expands to
    gigabytes (a decompression bomb) is refused with 413 instead of exhausting memory.
    """
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, "an image data URL must look like data:image/png;base64,<data>")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image data URL does not hold valid base64") from None
    elif url.startswith(("http://", "https://")):
        if not allow_urls:
            raise APIError(400, "this server does not fetch image URLs: send the image as a data: URL "
                           "(data:image/jpeg;base64,...), or start the server with --allow-urls")
        try:
            raw = fetch(url)
        except OSError as e:
            raise APIError(400, str(e)) from None
    else:
        raise APIError(400, f"image_url.url must be a data: URL (or http(s) with --allow-urls), got {url[:40]!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                raise APIError(413, f"the image is {image.width}x{image.height} = {image.width * image.height:,} "
                               f"pixels, more than this server's limit of {max_pixels:,}: send it smaller")
            image.load()
    except APIError:
        raise
    except Image.DecompressionBombError as e:  # over Pillow's own limit, when --max-image-pixels is above it
        raise APIError(413, f"the image is too large to decode safely ({e})") from None
    except Exception as e:  # Pillow raises many kinds on corrupt data; none may reach the client as a 500
        raise APIError(400, f"the image does not decode ({type(e).__name__}: {e}): send a PNG, JPEG, WebP "
                       f"or GIF file as a base64 data URL") from None
    return load_image(image)


def draw_marks(image: Image.Image, marks, where: str) -> Image.Image:
    """The image with each `visual_prompts` entry drawn on it, in order, as the command line draws them."""
    if not isinstance(marks, list):
        raise APIError(400, f"{where}.visual_prompts must be a list of {{'shape', 'coords', 'color'}} objects")
    for i, mark in enumerate(marks):
        name = f"{where}.visual_prompts[{i}]"
        if not isinstance(mark, dict) or not isinstance(mark.get("shape"), str):
            raise APIError(400, f"{name} must be an object like {{'shape': 'box', 'coords': [x1, y1, x2, y2], "
                           f"'color': 'red'}}", name)
        coords = mark.get("coords")
        if not isinstance(coords, list) or not all(is_number(c) for c in coords):
            raise APIError(400, f"{name}.coords must be a list of numbers (pixels of the image), got {coords!r}", name)
        width, alpha = mark.get("width"), mark.get("alpha")
        if not (width is None or is_number(width)) or not (alpha is None or is_number(alpha)):
            raise APIError(400, f"{name}: width and alpha must be numbers", name)
        try:
            image = draw_visual_prompt(image, mark["shape"], coords, mark.get("color", "red"), width, alpha)
        except (ValueError, TypeError) as e:  # unknown shape or colour, wrong count, outside the image
            raise APIError(400, f"{name}: {e}", name) from None
    return image


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def image_from_part(part: dict, where: str, max_pixels: int, allow_urls: bool) -> Image.Image:
    """An `{"type": "image_url", "image_url": {"url": ...}, "visual_prompts": [...]}` part -> the marked image."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url  # {"url": ...}, or the bare string some clients send
    if not isinstance(url, str):
        raise APIError(400, f"{where}.image_url must be {{'url': 'data:image/...;base64,...'}}", where)
    return draw_marks(decode_image(url, max_pixels, allow_urls), part.get("visual_prompts", []), where)


# ---------------------------------------------------------------------------- requests
@dataclass
class Chat:
    """A validated request: the conversation in `apply_chat_template`'s format, its images, the options."""
    conversation: list
    images: list
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def option(body: dict, name: str, default, lo, hi, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value) or integer and value != int(value) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return int(value) if integer else float(value)


def parse_request(body, max_pixels: int, allow_urls: bool) -> Chat:
    """OpenAI's request body -> Chat, or APIError(400) saying what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object like {'model': ..., 'messages': [...]}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {'role', 'content'} objects", "messages")
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1: this server gives one answer per request", "n")
    if body.get("tools"):
        raise APIError(400, "tools are not supported by this model", "tools")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise APIError(400, f"response_format {response_format!r} is not supported: this model answers in plain text "
                       f"(leave response_format out, or send {{'type': 'text'}})", "response_format")
    conversation, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system message
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role is {role!r}: use 'system', 'user' or 'assistant'", f"{where}.role")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise APIError(400, f"{where}.content must be a string or a list of text and image_url parts", where)
        items = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if "<image>" in part["text"]:  # it would be one more image slot than the images sent
                    raise APIError(400, f"{where}.content[{j}] contains '<image>': send each image as an "
                                   f"image_url part, which places its <image> token", where)
                items.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and role == "user":
                images.append(image_from_part(part, f"{where}.content[{j}]", max_pixels, allow_urls))
                items.append({"type": "image"})
            else:
                raise APIError(400, f"{where}.content[{j}] must be {{'type': 'text', 'text': ...}}"
                               + (" or an image_url part" if role == "user" else
                                  f" ({'an' if role == 'assistant' else 'a'} {role} message has no images)"),
                               where)
        conversation.append({"role": role, "content": items})
    if conversation[0]["role"] != "system":  # the system line the model was trained with, as the command line adds
        conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]})
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a string or a list of at most 4 non-empty strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise APIError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    stream_options = body.get("stream_options") or {}
    return Chat(conversation, images, max_tokens, option(body, "temperature", 0.0, 0, 2),
                option(body, "top_p", 1.0, 1e-9, 1), option(body, "seed", None, -2**63, 2**64 - 1, integer=True),
                stop, bool(body.get("stream")), isinstance(stream_options, dict) and bool(stream_options.get("include_usage")))


# ---------------------------------------------------------------------------- the model
class Metrics:
    """GET /metrics, in a registry of the backend's own (each app its own: tests make several). The engine's
    gauges and counters are read when scraped (zeros while the model loads); the rest the server observes."""

    def __init__(self, backend):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.backend, self.registry = backend, CollectorRegistry()
        self.registry.register(self)
        self.finished = Counter("vipllava_requests_finished", "Requests that left the engine, by finish reason "
                                "(stop, length, cancelled, error)", ["reason"], registry=self.registry)
        self.first_token = Histogram("vipllava_time_to_first_token_seconds", "From submitting a request to its "
                                     "first token (queueing and prefill)", registry=self.registry,
                                     buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, float("inf")))

    def collect(self):  # prometheus_client's custom collector: called on each scrape
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine = self.backend.engine
        read = (lambda name: getattr(engine, name)) if engine is not None else (lambda name: 0)
        yield GaugeMetricFamily("vipllava_requests_running", "Requests in a cache slot (prefilling or decoding)",
                                value=read("n_running"))
        yield GaugeMetricFamily("vipllava_requests_waiting", "Requests waiting for a free cache slot",
                                value=read("n_waiting"))
        yield GaugeMetricFamily("vipllava_slots", "Cache slots: conversations the engine holds at once",
                                value=engine.max_slots if engine is not None else 0)
        for name, attribute, text in [
                ("vipllava_generated_tokens", "tokens_generated", "Tokens sampled (stop strings' tokens included)"),
                ("vipllava_prompt_tokens", "prompt_tokens_total", "Prompt tokens of admitted requests"),
                ("vipllava_prefix_cached_tokens", "cached_tokens_total", "Prompt tokens whose keys and values "
                 "were reused from a slot's cache (not prefilled again)"),
                ("vipllava_requests", "requests_total", "Requests admitted into a cache slot")]:
            yield CounterMetricFamily(name, text, value=read(attribute))

    def done(self, request: EngineRequest, reason: str):
        self.finished.labels(reason).inc()
        if request.first_token_at is not None:
            self.first_token.observe(request.first_token_at - request.submitted)


class Backend:
    """The model and processor, loaded in a thread, then the engine that owns them; `answer` from any thread."""

    def __init__(self, load, on_failure=None, max_slots: int | None = None, max_queue: int = MAX_QUEUE):
        self.load, self.on_failure = load, on_failure
        self.max_slots, self.max_queue = max_slots, max_queue
        self.model = self.processor = self.engine = self.failure = None
        self.ready = threading.Event()
        self.metrics = Metrics(self)

    def start(self):
        threading.Thread(target=self._load, name="load-model", daemon=True).start()

    def _load(self):
        try:
            self.model, self.processor = self.load()
            self.engine = Engine(self.model, self.processor, self.max_slots, self.max_queue)  # logs its slots
            self.ready.set()
            log("model loaded: ready")
        except Exception as e:
            self.failure = f"the model did not load: {e}"
            log(f"server.py: error: {self.failure}")
            if self.on_failure:
                self.on_failure()

    def close(self):
        """Stop the engine (requests still in it fail with Cancelled): the model is free for `generate` again."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def check_ready(self):
        if not self.ready.is_set():
            raise APIError(503, self.failure or "the model is still loading: try again in a few seconds")

    def answer(self, chat: Chat, streamer=None, started=None) -> dict:
        """Where a request becomes an answer: the prompt for the whole conversation, submitted to the engine.

        The API is stateless: each request carries the conversation so far; the engine finds the longest cached
        prefix (the conversation's earlier turns, the same image) and prefills only the rest. `streamer` gets
        the answer's text piece by piece (from the engine's thread: it must not block). `started(request)` is
        called once the engine accepted the request (valid, the queue not full), before waiting for the answer:
        `request.cancel()` stops it at the engine's next step.
        """
        processor, model = self.processor, self.model
        context = model.config.text_config.max_position_embeddings
        prompt = processor.apply_chat_template(chat.conversation, add_generation_prompt=True)
        try:  # processor.encode (each <image> expanded) and the image preprocessing, with their checks
            inputs = processor(prompt, images=chat.images or None)
        except ValueError as e:  # a prompt longer than the context; image and <image> counts that differ
            raise APIError(400, str(e), "messages") from None
        n_prompt = inputs["input_ids"].shape[1]
        max_tokens = chat.max_tokens or min(DEFAULT_MAX_TOKENS, context - n_prompt)
        if n_prompt + max_tokens > context:
            raise APIError(400, f"the prompt is {n_prompt} tokens (each image is {processor.image_seq_length}) and "
                           f"max_tokens is {max_tokens}: together more than the model's context of {context} tokens. "
                           f"Shorten the conversation or lower max_tokens", "max_tokens")
        request = EngineRequest(inputs["input_ids"][0].tolist(), inputs.get("pixel_values"), max_new_tokens=max_tokens,
                                temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed,
                                stop_strings=STOP + chat.stop, stream=streamer)
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise APIError(429, f"the server is busy, {e}", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER)}) from None
        except ValueError as e:  # what the engine checks again (sampling settings, the context)
            raise APIError(400, str(e)) from None
        if started:
            started(request)
        try:
            request.result()
        except Cancelled:
            self.metrics.done(request, "cancelled")
            raise
        except Exception:
            self.metrics.done(request, "error")
            raise
        self.metrics.done(request, request.finish_reason)
        n_new = len(request.tokens)
        return {"text": request.text, "finish_reason": request.finish_reason,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new,
                          "prompt_tokens_details": {"cached_tokens": request.cached_tokens}}}


# ---------------------------------------------------------------------------- HTTP
def make_app(backend: Backend, model_id: str, max_body_mb: float = MAX_BODY_MB,
             max_pixels: int = MAX_IMAGE_PIXELS, allow_urls: bool = False):
    """The FastAPI app; `backend.start()` runs when it starts serving."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        backend.start()  # after the socket is bound: clients get 503 while it loads, not "connection refused"
        yield
        backend.close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)  # 404, 405: the same JSON shape
    async def http_error(request, e: HTTPException):
        message = str(e.detail)
        if e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: use {e.headers.get('Allow', 'POST')}"
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):  # the traceback goes to the server's log, never to the client
        log("".join(traceback.format_exception(e)))
        return JSONResponse(error_body(500, f"internal server error ({type(e).__name__}); see the server's log"),
                            status_code=500)

    async def read_json(request: Request):
        limit, size, body = max_body_mb * 2**20, 0, bytearray()
        async for chunk in request.stream():  # read to the end (so the client sees the answer), keep <= limit
            size += len(chunk)
            if size <= limit:
                body += chunk
        if size > limit:
            raise APIError(413, f"the request body is {size / 2**20:.1f} MB, more than this server's limit of "
                           f"{max_body_mb:g} MB: send smaller images")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    @app.get("/health")
    async def health():
        backend.check_ready()
        return {"status": "ready", "model": model_id}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(backend.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "vipllava"}]}

    @app.post("/v1/draw")
    async def draw(request: Request):
        part = await read_json(request)
        if not isinstance(part, dict):
            raise APIError(400, "the body must be an image part: {'image_url': {'url': ...}, 'visual_prompts': [...]}")

        def png():
            image = image_from_part(part, "body", max_pixels, allow_urls).convert("RGB")
            out = io.BytesIO()
            image.save(out, format="PNG", compress_level=1)
            return {"url": "data:image/png;base64," + base64.b64encode(out.getvalue()).decode(),
                    "width": image.width, "height": image.height}

        return await run_in_threadpool(png)

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        backend.check_ready()
        body = await read_json(request)
        check_model(body, model_id)
        chat = await run_in_threadpool(parse_request, body, max_pixels, allow_urls)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_id}
        events = await stream(backend, chat, head)  # an invalid request raises its APIError here
        if chat.stream:
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async for result in events:  # the non-streaming answer is the stream's last item: its result
            pass
        return {**head, "object": "chat.completion", "usage": result["usage"], "choices": [{
            "index": 0, "message": {"role": "assistant", "content": result["text"]},
            "finish_reason": result["finish_reason"], "logprobs": None}]}

    return app


async def stream(backend: Backend, chat: Chat, head: dict):
    """Start answering in a thread; once the engine accepted the request, the server-sent events of the answer
    (for a non-streaming request: nothing but, at the end, the answer's dict).

    An invalid request (or a full queue) raises its APIError here, so that it gets its status code instead of a
    200 stream. No thread waits for tokens: the engine's thread hands each piece to this event loop.
    """
    loop, events, accepted = asyncio.get_running_loop(), asyncio.Queue(), []

    def put(kind, value):  # from the engine's thread or the answering one
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def started(request):
        accepted.append(request)
        put("started", None)

    def work():
        try:
            text = (lambda piece: put("text", piece)) if chat.stream else None
            put("done", backend.answer(chat, text, started))
        except Exception as e:  # APIError before "started"; Cancelled or a bug after it
            put("error", e)

    threading.Thread(target=work, name="answer", daemon=True).start()
    kind, value = await events.get()
    if kind == "error":
        raise value

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def chunk(delta, finish_reason=None):
        return sse({**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]})

    async def generate_events():
        try:
            if chat.stream:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await events.get()
                if kind == "text" and value:
                    yield chunk({"content": value})
                elif kind == "done" and not chat.stream:
                    yield value
                    return
                elif kind == "done":
                    yield chunk({}, value["finish_reason"])
                    if chat.include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": value["usage"]})
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "error" and not chat.stream:
                    raise value  # the app's handler: 500, traceback to the log
                elif kind == "error":  # after the 200 header only an error event can say so
                    log("".join(traceback.format_exception(value)))
                    yield sse(error_body(500, f"internal server error ({type(value).__name__}); see the server's log"))
                    return
        finally:
            # The client has the whole answer (this does nothing), or went away (Starlette cancels this generator
            # at its await, or closes it): the engine drops the request at its next step and frees its slot.
            accepted[0].cancel()

    return generate_events()


# ---------------------------------------------------------------------------- command line
def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="server.py", description="Serve ViP-LLaVA with the OpenAI chat API, and a "
                                "page at / to draw on a photo and ask about it.")
    p.add_argument("--model", default="llava-hf/vip-llava-7b-hf", help="hub id or local checkpoint folder")
    p.add_argument("--adapter", help="a LoRA adapter folder (finetune.py's output, PEFT's format), merged into --model "
                   "(kept apart over --quantize: merging re-quantizes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="quantize the weights while loading")
    p.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128, 256],
                   help="with --quantize int4: inputs per scale and zero point (default 128, or the largest that "
                        "divides a small model's layer widths)")
    p.add_argument("--allow-urls", action="store_true", help="fetch http(s) image URLs (off: only data: URLs)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_MB, help="largest request body (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, help="largest image (413 above)")
    p.add_argument("--max-slots", type=positive, default=None, help="conversations answered at once, each a KV cache "
                   "row of the full context (default: as many as half the free memory holds, 1 to 16; printed)")
    p.add_argument("--max-queue", type=positive, default=MAX_QUEUE, help="requests waiting for a slot; more get 429")
    return p.parse_args(argv)


def load(args):
    """(model, processor) as the command line asks for them."""
    from processor import VipLlavaProcessor
    from vipllava import VipLlava

    processor = VipLlavaProcessor.from_pretrained(args.model)
    model = VipLlava.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                     group_size=args.group_size, adapter=args.adapter, merge=not args.quantize)
    return model, processor


def main(argv=None):
    args = parse_args(argv)
    import uvicorn

    try:
        weights.resolve_device(args.device)  # fail now, not in the loading thread
    except ValueError as e:
        log(f"server.py: error: {e}")
        sys.exit(2)

    config = uvicorn.Config(None, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)
    backend = Backend(lambda: load(args), on_failure=lambda: setattr(server, "should_exit", True),
                      max_slots=args.max_slots, max_queue=args.max_queue)
    config.app = make_app(backend, args.model, args.max_body_mb, args.max_image_pixels, args.allow_urls)
    log(f"serving on http://{args.host}:{args.port}/ (the page) and http://{args.host}:{args.port}/v1 (the API); "
        f"loading {args.model}")
    server.run()
    if backend.failure:
        sys.exit(2)


if __name__ == "__main__":
    main()
