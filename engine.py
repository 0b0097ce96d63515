"""A serving engine: many conversations at once on one model, with continuous batching and prefix reuse.

`generate` answers one batch from start to end; a server meets requests that arrive at any time, and a
question file has answers of every length. Here one thread owns the model and, each iteration,

    1. drops cancelled requests and admits waiting ones (first come, first served) into free cache slots;
    2. prefills one chunk of one admitted request (a long prompt over several iterations, an image never split);
    3. runs one decode step for every running conversation at once: B rows, each at its own position.

A finished request leaves at once and its slot takes the next one (continuous batching), so a short answer
never waits for a long one. Slots over time, 3 slots, requests A..F (`=` prefill, `-` decode, `.` idle):

    slot 0  A==------- C=--- E====-------
    slot 1  B=====------------------      <- B's long answer holds one slot; the others keep turning over
    slot 2     D===-----.....F=-------       (F resends D's conversation: only its new turn is prefilled)

A finished conversation leaves its keys and values in its slot. A new request takes the idle slot whose
cache holds the longest common prefix of its prompt and prefills only the rest: a follow-up that resends the
whole conversation (the OpenAI API is stateless) prefills just its new turn, as `ChatSession` does. An image
is known by a hash of its pixels, not by its `<image>` ids, so two photos asked the same question never share
a cache; the vision tower's features are kept by the same hash (a small LRU). When no slot is free, the least
recently used idle slot is overwritten.

Greedy answers are token for token those of `generate` alone (tests/test_engine.py): sampling, repetition
penalty and stop strings are generate.py's pieces; each request samples with its own seeded generator.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from generate import StopStrings, pad_id, penalize_repetition, sample, sampling_settings
from weights import log

PREFILL_CHUNK = 512  # tokens prefilled per iteration: running rows wait at most one chunk for their next token
FEATURE_CACHE = 16  # images whose vision features are kept (by pixel hash)


class QueueFull(Exception):
    """More requests waiting than the engine's max_queue: try again later (the server answers 429)."""


class Cancelled(Exception):
    """The request was cancelled (a client that went away) before it finished."""


@dataclass(eq=False)  # compared by identity: the engine finds a request in its queues
class Request:
    """One prompt to answer. `ids` hold each <image> expanded (processor.encode); `pixel_values` (N, 3, H, W)
    the prompt's images in order. Sampling settings left None come from the model's generation config, as
    in `generate`. `stream` (called from the engine's thread) gets the answer's text piece by piece."""
    ids: list[int]
    pixel_values: torch.Tensor | None = None
    max_new_tokens: int = 256
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_strings: list = field(default_factory=list)
    stream: object = None
    # Filled in by the engine:
    tokens: list = field(default_factory=list)  # the answer's token ids (a stop string cut off)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    cached_tokens: int = 0  # prompt tokens whose keys/values came from a slot's cache
    error: BaseException | None = None
    submitted: float = 0.0
    first_token_at: float | None = None  # time.perf_counter() when the first token was sampled
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False

    def cancel(self):
        """Stop at the engine's next step (its slot is freed); `result()` then raises Cancelled."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> "Request":
        """Wait until the answer is complete; raises the request's error if it failed, TimeoutError if it is
        not complete after `timeout` seconds (it goes on: call again, or cancel it)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"the answer is not complete after {timeout} s ({len(self.tokens)} tokens so far)")
        if self.error is not None:
            raise self.error
        return self


@dataclass(eq=False)  # compared by identity: the engine finds a request in its queues
class Slot:
    """A row of the cache: the prompt keys of what it holds, and the request it serves (None: idle)."""
    row: int
    key: list = field(default_factory=list)  # one entry per cached position: a token id, or (image hash, i)
    request: Request | None = None
    used: int = -1  # when it last served a request (a counter): the least recent idle slot is taken first


def image_hashes(pixel_values) -> list[str]:
    """A content hash per image: what tells two photos apart in the prefix cache."""
    if pixel_values is None:
        return []
    return [hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()[:32] for p in pixel_values]


def prefix_key(ids: list[int], image_token: int, hashes: list[str], per_image: int) -> list:
    """The prompt as the cache sees it: token ids, with the k-th <image> position of image j as (hash_j, k)."""
    key, n = [], 0
    for t in ids:
        if t == image_token:
            key.append((hashes[n // per_image], n % per_image))
            n += 1
        else:
            key.append(t)
    return key


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def default_slots(model, context: int) -> int:
    """As many slots of `context` positions as half the free memory holds (1 to 16)."""
    c = model.config.text_config
    per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context * model.dtype.itemsize
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # not on this system: assume room for 4
            free = 8 * per_slot
    return max(1, min(16, free // 2 // per_slot))


class Engine:
    """One thread that owns the model; `submit` requests from any thread.

    max_slots: conversations held at once (each a cache row of `context` positions; default from free memory).
    max_queue: requests waiting for a slot before `submit` raises QueueFull.
    """

    def __init__(self, model, processor, max_slots: int | None = None, max_queue: int = 64,
                 context: int | None = None, prefill_chunk: int = PREFILL_CHUNK):
        self.model, self.processor = model, processor
        self.context = context or model.config.text_config.max_position_embeddings
        self.max_slots = max_slots or default_slots(model, self.context)
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.per_image = model.config.image_seq_length
        self.image_token = model.config.image_token_index
        eos = model.generation_config.eos_token_id or model.config.text_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.pad = pad_id(model.config)
        self.slots = [Slot(i) for i in range(self.max_slots)]
        self.features = OrderedDict()  # image hash -> (576, C) features, least recently used first
        self.inbox, self.waiting = queue.Queue(), deque()
        self.prefilling, self.running = deque(), []  # requests in slots: being prefilled; decoding
        self.clock = itertools.count()
        # Counters for /metrics (read from other threads: plain ints).
        self.tokens_generated = self.cached_tokens_total = self.prompt_tokens_total = self.requests_total = 0
        model.language_model.setup_slots(self.max_slots, self.context)
        gb = 2 * sum(c.k.numel() * c.k.element_size() for c in self.caches()) / 1e9
        log(f"engine: {self.max_slots} slot(s) of {self.context} positions ({gb:.2f} GB of KV cache)")
        self.thread = threading.Thread(target=self.loop, name="engine", daemon=True)
        self.stopping = False
        self.thread.start()

    @property
    def n_waiting(self) -> int:  # read from other threads (the server's 429, /metrics)
        return len(self.waiting) + self.inbox.qsize()

    @property
    def n_running(self) -> int:
        return len(self.prefilling) + len(self.running)

    def caches(self):
        return [layer.self_attn.kv_cache for layer in self.model.language_model.model.layers]

    # ------------------------------------------------------------------------ from other threads
    def submit(self, request: Request) -> Request:
        """Queue a request (checked here, so that a bad one fails in the caller's thread); returns it."""
        n = len(request.ids)
        if n == 0 or n + request.max_new_tokens > self.context:
            raise ValueError(f"the prompt has {n} tokens; with max_new_tokens={request.max_new_tokens} that is "
                             f"{n + request.max_new_tokens}, more than the model's context of {self.context}: "
                             f"shorten the prompt or lower max_new_tokens")
        n_images = 0 if request.pixel_values is None else len(request.pixel_values)
        if request.ids.count(self.image_token) != n_images * self.per_image:
            raise ValueError(f"the prompt has {request.ids.count(self.image_token)} <image> ids but {n_images} "
                             f"image(s) give {n_images * self.per_image}: expand each <image> with processor.encode")
        sampling = sampling_settings(self.model.generation_config, request.temperature, request.top_k,
                                     request.top_p, request.repetition_penalty)  # raises on bad values
        if self.stopping:
            raise Cancelled("the engine was closed")
        if self.n_waiting >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting: try again in a few seconds")
        request.key = prefix_key(request.ids, self.image_token, image_hashes(request.pixel_values), self.per_image)
        request.sampling = sampling
        request.submitted = time.perf_counter()
        self.inbox.put(request)
        return request

    def close(self):
        """Stop the engine's thread (requests still in it fail with Cancelled) and free the cache."""
        self.stopping = True
        self.inbox.put(None)
        self.thread.join()
        self.model.language_model.remove_cache()

    # ------------------------------------------------------------------------ the engine's thread
    def loop(self):
        try:
            while not self.stopping:
                self.take_inbox(block=not (self.waiting or self.prefilling or self.running))  # sleep while idle
                try:
                    with torch.inference_mode():
                        self.step()
                except Exception as e:  # a bug in a step fails the requests in it; the engine keeps serving
                    log(f"engine: {type(e).__name__}: {e}")
                    for r in [*self.prefilling, *self.running]:
                        self.finish(r, e)
        finally:  # closed, or the thread itself broke: nobody may wait for it forever
            self.stopping = True  # submit refuses from now on
            self.take_inbox(block=False)
            for r in [*self.waiting, *self.prefilling, *self.running]:
                self.finish(r, Cancelled("the engine was closed"))

    def take_inbox(self, block: bool):
        """Move submitted requests to `waiting` (up to close's None)."""
        try:
            item = self.inbox.get() if block else self.inbox.get_nowait()
            while item is not None:
                self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def step(self):
        for r in [r for r in [*self.waiting, *self.prefilling, *self.running] if r.cancelled]:
            self.finish(r, Cancelled("the request was cancelled"))
        while self.waiting and self.admit(self.waiting[0]):
            self.waiting.popleft()
        if self.prefilling:
            r = self.prefilling[0]
            try:
                logits = self.prefill_chunk_of(r)
                if logits is not None:
                    self.prefilling.popleft()
                    self.running.append(r)
                    self.emit(r, logits)
            except Exception as e:  # this request's fault (or its image's): the others go on
                self.finish(r, e)
        rows = [r for r in self.running if r.finish_reason is None]
        if rows:
            self.decode(rows)

    def admit(self, r: Request) -> bool:
        """Into the idle slot with the longest common prefix (ties: least recently used); False if none is idle."""
        idle = [s for s in self.slots if s.request is None]
        if not idle:
            return False
        slot = max(idle, key=lambda s: (common_prefix(s.key, r.key), -s.used))
        start = min(common_prefix(slot.key, r.key), len(r.key) - 1)  # at least one token: its logits come next
        if isinstance(r.key[start], tuple):  # never from the middle of an image: from its first position
            start -= r.key[start][1]
        slot.key, slot.request, slot.used = slot.key[:start], r, next(self.clock)
        r.slot, r.position, r.cached_tokens = slot, start, start
        t, k, p, penalty = r.sampling
        r.generator = None if r.seed is None else torch.Generator(self.model.device).manual_seed(r.seed)
        r.stops = StopStrings(self.processor, r.stop_strings, 1)
        self.prefilling.append(r)
        self.requests_total += 1
        self.cached_tokens_total += start
        self.prompt_tokens_total += len(r.ids)
        return True

    def prefill_chunk_of(self, r: Request):
        """Prefill the next chunk of r's prompt into its slot; the last position's logits (1, vocab) when done."""
        start, key = r.position, r.key
        end = min(start + self.prefill_chunk, len(key))
        if end < len(key) and isinstance(key[end], tuple) and key[end][1] > 0:  # an image is never split
            end += self.per_image - key[end][1]
        ids = torch.tensor([r.ids[start:end]], device=self.model.device)
        images = list(dict.fromkeys(k[0] for k in key[start:end] if isinstance(k, tuple)))  # hashes, in order
        features = torch.cat([self.image_features(r, h) for h in images]) if images else None
        x = self.model.embed(ids, image_features=features)  # (1, T, C)
        logits = self.model.language_model.forward_rows(x, [r.slot.row], [start])  # (1, vocab)
        r.slot.key = key[:end]
        r.position = end
        return logits if end == len(key) else None

    def image_features(self, r: Request, h: str):
        """(1, 576, C) features of the image with hash h, from the LRU or through the vision tower."""
        if h not in self.features:
            i = [k[0] for k in r.key if isinstance(k, tuple)][::self.per_image].index(h)
            self.features[h] = self.model.get_image_features(r.pixel_values[i:i + 1].to(self.model.device))
            while len(self.features) > FEATURE_CACHE:
                self.features.popitem(last=False)
        self.features.move_to_end(h)
        return self.features[h]

    def decode(self, rows: list[Request]):
        """Feed each row's last token at its own position, all rows in one forward; sample the next ones."""
        tokens = torch.tensor([[r.tokens[-1]] for r in rows], device=self.model.device)  # (B, 1)
        x = self.model.language_model.model.embed_tokens(tokens)  # (B, 1, C)
        logits = self.model.language_model.forward_rows(x, [r.slot.row for r in rows], [r.position for r in rows])
        for b, r in enumerate(rows):
            r.slot.key.append(r.tokens[-1])
            r.position += 1
            try:
                self.emit(r, logits[b:b + 1])
            except Exception as e:
                self.finish(r, e)

    def emit(self, r: Request, logits):
        """Sample r's next token from logits (1, vocab) as generate does; finish r on EOS, a stop string or length."""
        temperature, top_k, top_p, penalty = r.sampling
        logits = logits.float()
        if penalty != 1.0:
            seen = torch.tensor([r.ids + r.tokens], device=logits.device)
            logits = penalize_repetition(logits, seen, penalty)
        token = int(sample(logits, temperature, top_k, top_p, r.generator))
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        r.tokens.append(token)
        self.tokens_generated += 1
        eos = token in self.eos
        hit = r.stops.update([token], [eos], r.stream)[0]
        if eos or hit or len(r.tokens) == r.max_new_tokens:
            r.finish_reason = "stop" if eos or hit else "length"
            self.finish(r)

    def finish(self, r: Request, error: BaseException | None = None):
        """Out of the engine: its slot keeps the cache (unless it failed mid-way) and takes the next request."""
        for q in (self.waiting, self.prefilling):
            if r in q:
                q.remove(r)
        if r in self.running:
            self.running.remove(r)
        slot = getattr(r, "slot", None)
        if slot is not None and slot.request is r:
            slot.request = None
            if error is not None and not isinstance(error, Cancelled):
                slot.key = []  # what a failed step wrote is not to be trusted
        if error is None:
            if r.stops.cut_at[0] is not None:
                r.tokens = r.tokens[:r.stops.cut_at[0]]
            r.text = self.processor.decode(r.tokens, skip_special_tokens=True)
            if r.stream:
                r.stream(r.stops.flush())
        else:
            r.error, r.finish_reason = error, r.finish_reason or "error"
        r.done.set()
