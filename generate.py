"""Generation: from the model's logits to text. The model (vipllava.py) computes logits; this file decides
what to do with them.

    prompt ids -> prefill (one forward over the prompt, filling the KV cache) -> logits of the last position
      -> sample a token -> feed it back (one position through the cache) -> ... until EOS, a stop string
      or max_new_tokens

Pieces, small to large: `GenerationConfig` (generation_config.json, transformers' defaults), `check_sampling`
and `sample` (greedy, temperature, top-k, top-p; the repetition penalty), `StopStrings` (streams text
without ever printing part of a stop string), `generate` (the decode loop: prefill, then one token per step,
optionally through a torch.compile'd step), and `ChatSession` (a conversation about one image that keeps
its KV cache between turns).

Quirks worth knowing:
- `generate` returns only the new ids (transformers returns the prompt too); EOS stays in the output,
  a stop string and what follows it are cut (as transformers' stop_strings).
- The hub's chat template ends a turn with `###`, not `</s>`: a chat needs the stop string "###".
- A compiled decode step is specialised to the cache size, so the cache grows in steps of CACHE_STEP.
- On a GPU the next step is queued before the last token is read back (`queue_ahead`); on a CPU that
  would be a wasted step.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from dataclasses import dataclass

import torch

import weights
from processor import IMAGE_TOKEN, SYSTEM_PROMPT, refuse_image_token

CACHE_STEP = 256  # a kept KV cache grows by this many positions, so that a compiled decode step is reused


# ---------------------------------------------------------------------------- sampling
def check_sampling(temperature: float, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   do_sample: bool | None = None) -> float:
    """Check the sampling arguments; the temperature to sample at (0: greedy).

    do_sample as in transformers: False is greedy whatever the temperature; True with temperature 0 samples
    at temperature 1 (transformers' default); None leaves the choice to the temperature.
    """
    for name, value in [("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)]:
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}: below 0 the least likely "
                         f"tokens would be the most sampled")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1: off, above 1 discourages repeats), "
                         f"got {repetition_penalty}")
    if do_sample is False:
        return 0.0
    return 1.0 if do_sample and temperature == 0 else float(temperature)


@dataclass
class GenerationConfig:
    """`model.generation_config`: generation_config.json's settings, transformers' defaults for those it leaves
    out. `generate` takes the sampling settings, max_new_tokens and eos_token_id from here when not given
    (finished rows are padded with config.json's pad_token_id, as ChatSession expects)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # used when sampling: transformers samples from the 50 most likely tokens unless told otherwise
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None  # None: generate's own default, 256 (transformers' max_length 20 is not used)
    max_length: int = 20
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":  # unknown keys (num_beams, ...) are ignored
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def sampling_settings(config: GenerationConfig, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
                      do_sample=None) -> tuple:
    """(temperature (0: greedy), top_k, top_p, repetition_penalty) with each argument left None taken from the
    generation config. Without do_sample, a temperature > 0 given here samples, else the config decides."""
    if do_sample is None:
        do_sample = temperature > 0 if temperature is not None else config.do_sample
    if temperature is None or do_sample and temperature == 0:  # do_sample=True alone: the config's temperature
        temperature = config.temperature
    top_k, top_p = config.top_k if top_k is None else top_k, config.top_p if top_p is None else top_p
    repetition_penalty = config.repetition_penalty if repetition_penalty is None else repetition_penalty
    return check_sampling(temperature, top_k, top_p, repetition_penalty, do_sample), top_k, top_p, repetition_penalty


def penalize_repetition(logits, seen, penalty: float):
    """transformers' rule: scores of tokens already in the sequence are divided by penalty (x if < 0)."""
    score = logits.gather(1, seen)  # (B, S)
    return logits.scatter(1, seen, torch.where(score < 0, score * penalty, score / penalty))


def sample(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None):
    """(B, vocab) float32 logits -> (B,) token ids. temperature 0: greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:  # keep the k most likely
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p  # the tokens before this one already reach top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class StopStrings:
    """Follows each row's text with the processor's streaming decoder, finds stop strings, and streams
    row 0 without ever printing (part of) a stop string."""

    def __init__(self, tokenizer, stop_strings: list[str], batch: int):
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.decoders = [tokenizer.stream_decoder() for _ in range(batch)]
        self.ids, self.text = [[] for _ in range(batch)], [""] * batch
        self.cut_at = [None] * batch  # number of tokens kept where a stop string was found
        self.closed = [False] * batch  # rows that need no more decoding
        self.sent = 0  # how much of row 0 was streamed

    def update(self, tokens: list[int], done: list[bool], streamer=None) -> list[bool]:
        """Add one token per row (done: rows finished before or by this token); which rows hit a stop string."""
        hit = [False] * len(tokens)
        for b, token in enumerate(tokens):
            if self.closed[b] or not (self.stop_strings or b == 0 and streamer):
                continue
            self.closed[b] = done[b]
            self.ids[b].append(token)
            self.text[b] += self.decoders[b].push(token) + (self.decoders[b].flush() if done[b] else "")
            found = [self.text[b].find(s) for s in self.stop_strings if s in self.text[b]]
            if found:
                hit[b] = self.closed[b] = True
                self.text[b] = self.text[b][:min(found)]
                keep = len(self.ids[b])  # the longest prefix of tokens whose text ends before the stop string
                decode = self.tokenizer.decode
                while keep and len(decode(self.ids[b][:keep], skip_special_tokens=True)) > len(self.text[b]):
                    keep -= 1
                self.cut_at[b] = keep
            if b == 0 and streamer:
                final = len(self.text[0]) - (0 if self.closed[0] else self.partial_stop(self.text[0]))
                if final > self.sent:
                    streamer(self.text[0][self.sent:final])
                    self.sent = final
        return hit

    def partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that could be the start of a stop string: held back."""
        return max((k for s in self.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def flush(self) -> str:
        """Row 0's text not streamed yet (what the decoder held back included)."""
        self.text[0] += "" if self.closed[0] else self.decoders[0].flush()
        rest, self.sent = self.text[0][self.sent:], len(self.text[0])
        return rest

    def cut(self, new, pad: int):
        for b, keep in enumerate(self.cut_at):
            if keep is not None:
                new[b, keep:] = pad
        return new


# ---------------------------------------------------------------------------- the decode loop
def pad_id(config, eos=None, pad_token_id=None) -> int:
    """The id that finished rows are padded with: pad_token_id if given, the model's pad id, else the first EOS id."""
    if pad_token_id is not None:
        return pad_token_id
    if config.pad_token_id is not None:
        return config.pad_token_id
    return int(torch.tensor(config.text_config.eos_token_id if eos is None else eos).flatten()[0])


def queue_ahead(device: torch.device) -> bool:
    """Whether generate queues the next step before reading the last token back (not on a CPU)."""
    return device.type != "cpu"


@torch.inference_mode()
def generate(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, eos_token_id=None, stop_strings=None, seed=None, streamer=None,
             tokenizer=None, image_features=None, input_pos: int = 0, keep_cache: bool = False, do_sample=None,
             max_length: int | None = None, pad_token_id: int | None = None):
    """New token ids (B, N), the prompt not included (transformers returns both): one prefill, then one
    token per step through the KV cache.

    Arguments left None come from `model.generation_config` (see `sampling_settings`): greedy unless a
    temperature > 0 or `do_sample=True` is given; sampling keeps the config's top_k (50 by default, as
    transformers). max_new_tokens defaults to 256; `max_length` (prompt + new, as transformers) is the other
    way to say it. Without attention_mask, rows that start with the pad id are left padding (see
    `check_inputs`). Rows stop on their own (EOS, kept in the output as transformers does, or a stop string,
    cut from it); finished rows are padded (with pad_token_id if given). `stop_strings` and `streamer`
    (a callable fed row 0's text as it becomes final) need `tokenizer` (the processor).

    Continuing (what ChatSession does): `keep_cache=True` leaves the KV cache allocated and filled, and
    a later call with `input_pos=P` prefills only its input_ids, at positions P.., after the P positions
    already cached (attention_mask, if given, then covers all P + T). The cache grows in steps of
    CACHE_STEP positions. `image_features` (from get_image_features) replace pixel_values.
    The repetition penalty sees input_ids only, not the cached positions.
    """
    config = model.generation_config
    temperature, top_k, top_p, repetition_penalty = sampling_settings(config, temperature, top_k, top_p,
                                                                      repetition_penalty, do_sample)
    if input_pos:  # a continued cache: the mask (if any) covers the cached positions too
        model.check_inputs(input_ids, pixel_values)
    else:
        attention_mask = model.check_inputs(input_ids, pixel_values, attention_mask, generating=True)
    if (stop_strings or streamer) and tokenizer is None:
        raise ValueError("stop_strings and streamer need tokenizer= (a VipLlavaProcessor) to read the text")
    B, T = input_ids.shape
    P = input_pos + T  # positions in the cache once the prompt is in
    if max_new_tokens is None and max_length is not None:
        if max_length <= P:
            raise ValueError(f"max_length={max_length} counts the prompt's {P} tokens too (as in transformers) and "
                             f"leaves no room for new ones: raise it, or give max_new_tokens instead")
        max_new_tokens = max_length - P
    if max_new_tokens is None:
        max_new_tokens = config.max_new_tokens or 256
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    lm, context = model.language_model, model.config.text_config.max_position_embeddings
    if P + max_new_tokens > context:
        raise ValueError(f"the prompt has {P} tokens; with max_new_tokens={max_new_tokens} that is "
                         f"{P + max_new_tokens}, more than the model's context of {context}: shorten the prompt "
                         f"or lower max_new_tokens")
    if input_pos and lm.cache_length(B) < input_pos:
        raise ValueError(f"input_pos={input_pos} continues a KV cache of at least {input_pos} positions at batch {B}, "
                         f"but the model holds {lm.cache_length(B)}: call generate with keep_cache=True first")
    device = lm.model.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    eos = [e for e in (eos_token_id, config.eos_token_id, model.config.text_config.eos_token_id) if e is not None]
    eos = torch.tensor(eos[0] if eos else [], device=device).flatten()
    pad = pad_id(model.config, eos, pad_token_id)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    mask = None  # no padding: no mask tensor, so SDPA may take its flash path
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = torch.ones(B, P + max_new_tokens, dtype=torch.long, device=device)
        mask[:, :P] = attention_mask
    stops = StopStrings(tokenizer, stop_strings or [], B) if tokenizer is not None else None
    static = model.compiled_step is not None
    # A compiled step is specialised to the cache size: round it up so that most prompts (and a chat's
    # turns) share one graph. A continued cache never shrinks: it holds the positions before input_pos.
    max_len = P + max_new_tokens
    if static or keep_cache:
        max_len = min(-(-max_len // CACHE_STEP) * CACHE_STEP, context)
    max_len = max(max_len, lm.cache_length(B)) if input_pos else max_len

    lm.setup_cache(B, max_len)
    try:
        pv = None if pixel_values is None else pixel_values.to(device)
        x = model.embed(input_ids, pv, image_features)  # (B, T, C)
        logits = lm(inputs_embeds=x, attention_mask=None if mask is None else mask[:, :P], input_pos=input_pos,
                    last_only=True)[:, -1]  # (B, vocab)
        if static:  # the cache slots each row may attend to, and each row's count of real tokens
            visible = torch.zeros(B, max_len, dtype=torch.bool, device=device)
            visible[:, :P] = True if mask is None else mask[:, :P].bool()
            n_real = visible.sum(-1, keepdim=True)  # (B, 1): the position of each row's next token
            slots = torch.arange(max_len, device=device)

        def decode(token, step):  # logits (B, vocab) after the token at cache slot P + step
            if static:
                visible[:, P + step] = True
                return model.compiled_step(token[:, None], n_real + step, slots[P + step:P + step + 1],
                                          visible[:, None, None]).clone()  # cloned: the graph reuses its output
            return lm(token[:, None], attention_mask=None if mask is None else mask[:, :P + step + 1],
                      input_pos=P + step)[:, -1]

        seen, done, out = input_ids, torch.zeros(B, dtype=torch.bool, device=device), []
        for step in range(max_new_tokens):
            logits = logits.float()
            if repetition_penalty != 1.0:
                logits = penalize_repetition(logits, seen, repetition_penalty)
            token = torch.where(done, pad, sample(logits, temperature, top_k, top_p, generator))  # (B,)
            out.append(token)
            done |= torch.isin(token, eos)
            if repetition_penalty != 1.0:
                seen = torch.cat([seen, token[:, None]], dim=1)
            last = step == max_new_tokens - 1
            # On a GPU, queue the next step before reading anything back: it runs while the host checks
            # for stops (reading `token` waits for the sampling only). On a CPU that would be a wasted step.
            queued = not last and queue_ahead(device)
            if queued:
                logits = decode(token, step)
            if stops is not None:
                done |= torch.tensor(stops.update(token.tolist(), done.tolist(), streamer), device=device)
            if last or bool(done.all()):
                break
            if not queued:
                logits = decode(token, step)
    finally:
        if not (static or keep_cache):  # a compiled step keeps its cache: its CUDA graph replays on those buffers
            lm.remove_cache()
    new = torch.stack(out, dim=1)  # (B, N)
    if stops is not None:
        new = stops.cut(new, pad)
        if streamer:
            streamer(stops.flush())
    return new


# ---------------------------------------------------------------------------- conversations
class ChatSession:
    """A conversation about one image that keeps its KV cache from turn to turn.

    Each `ask` renders the whole conversation as a fresh prompt (apply_chat_template, then the processor's
    tokens), compares it with the token ids whose keys and values are cached, and prefills from the first
    difference only: the new question and the template's separators, plus the last tokens of the previous
    answer where its text tokenizes differently from how it was generated (the `###` stop string, a space).
    So a greedy answer is token for token what `generate` gives over the full prompt. The image is encoded
    once. When a turn would not fit the context, the oldest question/answer pairs after the first are dropped.

    After `ask`: `conversation` (the messages, system included), `last_prefill_tokens`, `last_new_tokens`,
    `last_token_ids` (generate's output), `last_time_to_first_token` (s until the first text of the answer),
    `last_seconds`, `last_dropped` (pairs dropped for the context). The session keeps its own cache, so
    several sessions may share a model (switching between them costs a full prefill); `close()` frees it.
    """

    def __init__(self, model, processor, image=None, system: str | None = None, template: str = "vipllava",
                 image_mode: str = "pad"):
        self.model, self.processor, self.image, self.template = model, processor, image, template
        processor.apply_chat_template([{"role": "user", "content": "?"}], template=template)  # an unknown one fails now
        system = SYSTEM_PROMPT if system is None else system  # "" : no system line
        self.system = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        self.conversation = list(self.system)
        self.pixel_values = None if image is None else \
            processor(IMAGE_TOKEN, images=[image], image_mode=image_mode)["pixel_values"]
        self.image_features = None  # (1, 576, C), computed on the first turn that needs them
        self.ids, self.cache = [], None  # token ids whose keys/values `cache` (one KVCache per layer) holds
        self.last_prefill_tokens = self.last_new_tokens = self.last_dropped = 0
        self.last_token_ids, self.last_time_to_first_token, self.last_seconds = [], 0.0, 0.0

    def ask(self, question: str, max_new_tokens: int = 256, temperature: float | None = None, top_k: int | None = None,
            top_p: float | None = None, seed=None, streamer=None) -> str:
        """The answer to `question` (stripped), streamed piece by piece to `streamer` if given. Sampling
        arguments left None come from the model's generation config, as in `generate` (greedy by default)."""
        refuse_image_token(question, "the question", "the session's image is given once, to ChatSession(image=...)")
        first = not any(m["role"] == "user" for m in self.conversation)
        content = [{"type": "image"}] * (first and self.image is not None) + [{"type": "text", "text": question}]
        question = {"role": "user", "content": content}
        conversation, prompt, dropped = self.fit(self.conversation + [question], max_new_tokens)
        t0, first_piece = time.perf_counter(), []

        def stream(piece):
            if piece and not first_piece:
                first_piece.append(time.perf_counter())
            if streamer:
                streamer(piece)

        stops = ["###"] if self.template == "vipllava" else None
        new = self.continue_with(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_strings=stops, streamer=stream)
        out = new[0].tolist()
        self.remember(prompt, out[:-1])  # the last token was sampled, not fed (on a GPU it may be: never mind)
        answer = self.processor.decode(out, skip_special_tokens=True).strip()
        self.conversation = conversation + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.last_seconds = time.perf_counter() - t0
        self.last_time_to_first_token = (first_piece[0] if first_piece else time.perf_counter()) - t0
        self.last_new_tokens, self.last_token_ids, self.last_dropped = len(out), out, dropped
        return answer

    def prefill(self) -> int:
        """Prefill the conversation as it stands (the image and system line, before a first question), so that
        the next `ask` starts sooner; also after editing `conversation`. Returns the tokens prefilled."""
        conversation = self.conversation
        if self.image is not None and not any(m["role"] == "user" for m in conversation):
            conversation = conversation + [{"role": "user", "content": [{"type": "image"}]}]
        if not conversation:
            return 0
        prompt = self.processor.encode(self.processor.apply_chat_template(conversation, template=self.template))
        self.continue_with(prompt, max_new_tokens=1)
        self.remember(prompt, [])
        return self.last_prefill_tokens

    def reset(self):
        """Forget the turns; keep the image, its features and the cache (the next prompt starts as the
        cached one did, with the system line and the image, and that part is not prefilled again)."""
        self.conversation = list(self.system)

    def close(self):
        """Free the KV cache (the session stays usable: its next turn prefills everything again)."""
        self.ids, self.cache = [], None

    def fit(self, conversation: list, max_new_tokens: int):
        """(conversation, its prompt ids, pairs dropped): the oldest question/answer pairs after the first are
        dropped until the prompt and max_new_tokens fit the context. The input list is left as it is."""
        context, dropped = self.model.config.text_config.max_position_embeddings, 0
        first_pair = len(self.system)  # the first user message: the image turn, kept
        while True:
            prompt = self.processor.encode(self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, template=self.template))
            if len(prompt) + max_new_tokens <= context:
                break
            if len(conversation) - first_pair < 5:  # first question, its answer, the new question: nothing to drop
                kept = "" if len(conversation) - first_pair == 1 else " with only the first question and answer kept"
                raise ValueError(f"this turn's prompt takes {len(prompt)} tokens{kept}; with "
                                 f"max_new_tokens={max_new_tokens} "
                                 f"that is {len(prompt) + max_new_tokens}, more than the model's context of {context}: "
                                 f"ask a shorter question, lower max_new_tokens, or start a new ChatSession")
            conversation = conversation[:first_pair + 2] + conversation[first_pair + 4:]
            dropped += 1
        if dropped:
            weights.log(f"[the conversation outgrew the context of {context} tokens: dropped the {dropped} oldest "
                        f"question/answer pair(s) after the first]")
        return conversation, prompt, dropped

    def continue_with(self, prompt: list[int], **generate_kw):
        """generate over `prompt`, prefilling only what follows the longest cached prefix."""
        start = 0
        for cached, new in zip(self.ids, prompt):
            if cached != new:
                break
            start += 1
        start = min(start, len(prompt) - 1)  # at least one token to prefill: its logits give the first new token
        image_id, features = self.processor.image_token_id, None
        if image_id in prompt[start:]:  # the image is prefilled whole, never from the middle of its positions
            start = min(start, prompt.index(image_id))
            if self.image_features is None:
                with torch.inference_mode():
                    device = self.model.device
                    self.image_features = self.model.get_image_features(self.pixel_values.to(device))
            features = self.image_features
        self.ids = self.ids[:start]  # generate overwrites the cache from `start` on
        self.model.language_model.check_no_engine()
        layers = self.model.language_model.model.layers
        for layer, cache in zip(layers, self.cache or [None] * len(layers)):  # this session's cache into the model
            layer.self_attn.kv_cache = cache
        try:
            new = generate(self.model, torch.tensor([prompt[start:]]), image_features=features, input_pos=start,
                           keep_cache=True, tokenizer=self.processor, **generate_kw)
        finally:  # and out again, so that nothing else writes into it
            self.cache = [layer.self_attn.kv_cache for layer in layers]
            self.model.language_model.remove_cache()
        self.last_prefill_tokens = len(prompt) - start
        return new

    def remember(self, prompt: list[int], fed: list[int]):
        """The ids now cached: the prompt and the generated tokens fed back. Tokens a stop string cut were
        replaced by padding in generate's output: trailing pad ids are left out (at worst re-prefilled)."""
        pad = pad_id(self.model.config)  # what generate pads with
        while fed and fed[-1] == pad:
            fed = fed[:-1]
        self.ids = prompt + fed
