"""The serving engine (engine.py): many requests at once give exactly what `generate` gives each one alone;
a resent conversation reuses its cached prefix, a different image never does; cancels and errors stay local."""
import threading
import time
from pathlib import Path

import pytest
import torch

import tiny_checkpoint
from engine import Cancelled, Engine, QueueFull, Request, common_prefix
from processor import SYSTEM_PROMPT, VipLlavaProcessor, load_image
from vipllava import VipLlava

IMAGES = Path(__file__).resolve().parent / "images"
QUESTIONS = ["What is in the image?", "Describe the image in more details.", "Is the dog to the left or right?",
             "What colour is the object inside the red rectangle?"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("engine"), vision=dict(image_size=42),
                                              dtype="float32", seed=1)
    return VipLlava.from_pretrained(folder, verbose=False), VipLlavaProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    return [load_image(IMAGES / f"{name}.png") for name in ("chelsea", "coffee", "horse", "camera")]


def conversation(*turns, image=True):
    """system line, then user/assistant turns alternating; the image in the first user turn."""
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
    for i, text in enumerate(turns):
        content = [{"type": "image"}] * (i == 0 and image) + [{"type": "text", "text": text}]
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return messages


def inputs(processor, messages, image):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(prompt, images=None if image is None else [image])


def alone(model, processor, inp, **kw):
    """What generate gives for one request: its new ids, the padding after a stop cut off."""
    new = model.generate(inp["input_ids"], inp.get("pixel_values"), tokenizer=processor, **kw)[0].tolist()
    while new and new[-1] == model.config.pad_token_id:
        new.pop()
    return new


def request(inp, **kw):
    return Request(inp["input_ids"][0].tolist(), inp.get("pixel_values"), **kw)


@pytest.fixture
def engine(pair):
    engines = []

    def make(**kw):
        engines.append(Engine(*pair, **kw))
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def eight(processor, images):
    """8 requests with different images, prompts, lengths and stop strings (one without an image)."""
    out = []
    for i in range(8):
        image = None if i == 5 else images[i % len(images)]
        inp = inputs(processor, conversation(QUESTIONS[(i * 3) % 4], image=image is not None), image)
        out.append((inp, dict(max_new_tokens=4 + 9 * i, stop_strings=["###"] if i % 2 else [])))
    return out


def test_greedy_answers_equal_generate_alone_at_staggered_times(pair, images, engine):
    model, processor = pair
    requests = eight(processor, images)
    want = [alone(model, processor, inp, **kw) for inp, kw in requests]
    e = engine(max_slots=3)  # fewer slots than requests: slots are reused as rows finish
    submitted = []
    for inp, kw in requests:
        submitted.append(e.submit(request(inp, **kw)))
        time.sleep(0.02)  # they arrive while others are prefilled or decoded
    got = [r.result(timeout=120).tokens for r in submitted]
    assert got == want
    for r, (inp, kw) in zip(submitted, requests):
        assert r.text == processor.decode(r.tokens, skip_special_tokens=True)
        assert r.finish_reason == ("length" if len(r.tokens) == kw["max_new_tokens"] else "stop")
    assert e.n_running == e.n_waiting == 0 and all(s.request is None for s in e.slots)


def test_chunked_prefill_never_splits_an_image_and_gives_the_same_answers(pair, images, engine):
    model, processor = pair
    requests = eight(processor, images)[:4]
    want = [alone(model, processor, inp, **kw) for inp, kw in requests]
    e = engine(max_slots=2, prefill_chunk=5)  # 9 image positions: a chunk boundary would fall inside each image
    assert [e.submit(request(inp, **kw)).result(timeout=120).tokens for inp, kw in requests] == want


def test_seeded_sampling_gives_the_same_text_at_any_concurrency(pair, images, engine):
    model, processor = pair
    requests = eight(processor, images)[:5]
    settings = dict(temperature=0.9, top_p=0.95)
    want = [alone(model, processor, inp, seed=i, **settings, **kw) for i, (inp, kw) in enumerate(requests)]
    for slots in (1, 4):
        e = engine(max_slots=slots)
        submitted = [e.submit(request(inp, seed=i, **settings, **kw)) for i, (inp, kw) in enumerate(requests)]
        assert [r.result(timeout=120).tokens for r in submitted] == want, f"{slots} slot(s)"
        e.close()


def test_a_follow_up_reuses_the_cached_prefix_and_a_new_image_does_not(pair, images, engine):
    model, processor = pair
    cat, coffee = images[:2]
    first = inputs(processor, conversation(QUESTIONS[0]), cat)
    e = engine(max_slots=2)
    r1 = e.submit(request(first, max_new_tokens=12, stop_strings=["###"])).result(timeout=120)
    assert r1.cached_tokens == 0
    follow = conversation(QUESTIONS[0], r1.text.strip(), QUESTIONS[1])
    again = inputs(processor, follow, cat)
    r2 = e.submit(request(again, max_new_tokens=12, stop_strings=["###"])).result(timeout=120)
    ids, cached = again["input_ids"][0].tolist(), first["input_ids"][0].tolist() + r1.tokens[:-1]
    assert r2.cached_tokens == common_prefix(cached, ids)  # all that is the same as the first turn's cache
    assert r2.cached_tokens >= len(first["input_ids"][0]) - 2  # at most the "ASSISTANT:" join tokenizes anew
    e.close()
    assert r2.tokens == alone(model, processor, again, max_new_tokens=12, stop_strings=["###"])

    # The same text about another photo: a miss from the image on, and the answer a fresh one gives.
    e = engine(max_slots=2)
    e.submit(request(again, max_new_tokens=12, stop_strings=["###"])).result(timeout=120)
    other = inputs(processor, follow, coffee)
    r3 = e.submit(request(other, max_new_tokens=12, stop_strings=["###"])).result(timeout=120)
    image_at = other["input_ids"][0].tolist().index(processor.image_token_id)
    assert r3.cached_tokens == image_at  # the system line only
    e.close()
    assert r3.tokens == alone(model, processor, other, max_new_tokens=12, stop_strings=["###"])


def test_a_resent_image_is_not_encoded_again(pair, images, engine, monkeypatch):
    model, processor = pair
    calls = []
    encode = model.get_image_features
    monkeypatch.setattr(model, "get_image_features", lambda pv: calls.append(len(pv)) or encode(pv))
    e = engine(max_slots=1)
    for question in QUESTIONS[:3]:  # different questions (no common prefix past the image's start)...
        e.submit(request(inputs(processor, conversation(question), images[2]), max_new_tokens=3)).result(timeout=60)
    assert calls == [1]  # ...the same photo: encoded once
    e.submit(request(inputs(processor, conversation(QUESTIONS[0]), images[3]), max_new_tokens=3)).result(timeout=60)
    assert calls == [1, 1]


def test_a_cancelled_request_frees_its_slot(pair, images, engine):
    model, processor = pair
    e = engine(max_slots=1)
    first_piece = threading.Event()
    long = e.submit(request(inputs(processor, conversation(QUESTIONS[1]), images[0]), max_new_tokens=200,
                            stream=lambda piece: first_piece.set()))
    assert first_piece.wait(60)
    waiting = inputs(processor, conversation(QUESTIONS[2]), images[1])
    after = e.submit(request(waiting, max_new_tokens=6))  # waits for the only slot
    with pytest.raises(TimeoutError, match="not complete"):  # never a half answer as if it were whole
        long.result(timeout=0.01)
    long.cancel()
    with pytest.raises(Cancelled):
        long.result(timeout=60)
    assert len(long.tokens) < 200
    got = after.result(timeout=60).tokens
    e.close()
    assert got == alone(model, processor, waiting, max_new_tokens=6)


def test_an_error_in_one_request_leaves_the_others_alone(pair, images, engine):
    model, processor = pair
    requests = eight(processor, images)[:3]
    want = [alone(model, processor, inp, **kw) for inp, kw in requests]

    def broken(piece):
        raise RuntimeError("the client's stream broke")

    e = engine(max_slots=4)
    bad = e.submit(request(requests[2][0], max_new_tokens=20, stream=broken))
    good = [e.submit(request(inp, **kw)) for inp, kw in requests]
    with pytest.raises(RuntimeError, match="stream broke"):
        bad.result(timeout=60)
    assert [r.result(timeout=120).tokens for r in good] == want
    # and the engine goes on serving
    assert e.submit(request(requests[0][0], **requests[0][1])).result(timeout=60).tokens == want[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_whose_thread_dies_fails_its_requests_instead_of_hanging(pair, images, engine):
    """Not even a bug outside a step's error handling may leave a caller (a server's request) waiting forever."""
    model, processor = pair
    e = engine(max_slots=1)

    class Broken(BaseException):
        pass

    def die(rows):
        raise Broken("the engine's thread broke")

    e.decode = die
    inp = inputs(processor, conversation(QUESTIONS[0]), images[0])
    running, waiting = e.submit(request(inp, max_new_tokens=5)), e.submit(request(inp, max_new_tokens=5))
    for r in (running, waiting):
        with pytest.raises(Cancelled, match="closed"):
            r.result(timeout=60)
    e.thread.join(60)
    assert not e.thread.is_alive()
    with pytest.raises(Cancelled, match="closed"):
        e.submit(request(inp, max_new_tokens=5))


def test_a_full_queue_refuses_and_bad_requests_fail_in_the_caller(pair, images, engine):
    model, processor = pair
    e = engine(max_slots=1, max_queue=1)
    started = threading.Event()
    inp = inputs(processor, conversation(QUESTIONS[0]), images[0])
    running = e.submit(request(inp, max_new_tokens=200, stream=lambda piece: started.set()))
    assert started.wait(60)
    e.submit(request(inp, max_new_tokens=2))  # waits: the queue holds 1
    with pytest.raises(QueueFull, match="already waiting"):
        e.submit(request(inp, max_new_tokens=2))
    running.cancel()
    context = model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="more than the model's context"):
        e.submit(request(inp, max_new_tokens=context))
    with pytest.raises(ValueError, match="<image> ids but 0 image"):
        e.submit(Request(inp["input_ids"][0].tolist(), None, max_new_tokens=2))
    with pytest.raises(ValueError, match="temperature"):
        e.submit(request(inp, temperature=-1.0))


def test_a_prompt_that_ends_in_its_image_is_prefilled_from_the_image_start(pair, images, engine):
    model, processor = pair
    inp = processor("<image>", images=[images[0]])  # <s> and the image's positions: nothing after them
    want = alone(model, processor, inp, max_new_tokens=4)
    e = engine(max_slots=1)
    e.submit(request(inp, max_new_tokens=4)).result(timeout=60)
    again = e.submit(request(inp, max_new_tokens=4)).result(timeout=60)  # all cached, but one token must be fed
    assert again.cached_tokens == 1 and again.tokens == want  # the whole image again, never its middle


def test_generate_and_chat_refuse_a_model_whose_cache_an_engine_holds(pair, images, engine):
    from generate import ChatSession

    model, processor = pair
    inp = inputs(processor, conversation(QUESTIONS[0]), images[0])
    e = engine(max_slots=1)
    with pytest.raises(RuntimeError, match="engine.close"):
        model.generate(inp["input_ids"], inp["pixel_values"], max_new_tokens=2)
    with pytest.raises(RuntimeError, match="engine.close"):
        ChatSession(model, processor, images[0]).ask("What is it?", max_new_tokens=2)
    e.close()
    assert len(model.generate(inp["input_ids"], inp["pixel_values"], max_new_tokens=2)[0]) == 2
