"""server.py: the real `openai` client against the server in a subprocess on a tiny checkpoint (loopback only),
and the drawing page in a real headless Chromium. Every answer is compared with the library's own answer
for the same conversation and image."""
import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import server
import tiny_checkpoint
from processor import SYSTEM_PROMPT, VipLlavaProcessor, load_image
from visual_prompts import draw_visual_prompt
from vipllava import VipLlava

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "tests" / "images" / "chelsea.png"  # 451x300
CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by .ci/run
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def data_url(raw: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


CAT_URL = data_url(CAT.read_bytes())
BOX = {"shape": "box", "coords": [125, 75, 215, 155], "color": "red"}
MODEL = "tiny-random-vipllava"  # the short name of the served checkpoint folder (see `checkpoint`)
SLOTS = 4  # the server's --max-slots: conversations in its engine at once


def image_part(url=CAT_URL, marks=(BOX,)):
    return {"type": "image_url", "image_url": {"url": url}, "visual_prompts": list(marks)}


def ask(question, part=None):
    return {"role": "user", "content": ([part or image_part()] if part is not False else []) + [{"type": "text", "text": question}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # named so that the README's screenshot says what answered: random weights, gibberish answers
    return tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("server") / MODEL, dtype="float32")


@pytest.fixture(scope="module")
def library(checkpoint):
    return VipLlava.from_pretrained(checkpoint, verbose=False), VipLlavaProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def url(checkpoint, tmp_path_factory):
    """The server in a subprocess; its stderr goes to a file, checked at the end for tracebacks."""
    port, log = free_port(), tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--model", str(checkpoint), "--port", str(port),
                                 "--max-slots", str(SLOTS)], cwd=ROOT, stdout=err, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 60 s to start and load
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"the server did not become ready:\n{log.read_text()}")
        yield base
        assert "Traceback" not in log.read_text(), log.read_text()  # no request took the bug path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def library_answer(library, messages, images, n, stop=(), **sampling):
    """The library's answer for the same conversation: the system line the server adds, then generate."""
    model, processor = library
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}] + messages
    inputs = processor(processor.apply_chat_template(conversation, add_generation_prompt=True), images=images)
    new = model.generate(inputs["input_ids"], inputs.get("pixel_values"), max_new_tokens=n, stop_strings=["###", *stop],
                         tokenizer=processor, **sampling)
    return processor.decode(new[0], skip_special_tokens=True), inputs["input_ids"].shape[1], new.shape[1]


def template_user(text, image=True):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def cat_with_box():
    return draw_visual_prompt(load_image(CAT), "box", BOX["coords"], "red")


def prompt_ids(library, messages, images) -> list[int]:
    """The ids the server submits for this conversation (the system line it adds, each <image> expanded)."""
    _, processor = library
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}] + messages
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(prompt, images=images)["input_ids"][0].tolist()


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def metrics(url) -> dict:
    """GET /metrics parsed: {(sample name, labels as a sorted tuple): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def wait_for(condition, what: str):
    """Poll until condition() holds (the engine's thread gets there on its own time); no timing is checked."""
    for _ in range(1200):
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"still waiting for {what}")


def new_tokens(library, messages, images, n) -> list[int]:
    """generate's answer tokens for the conversation (greedy, with the server's stop string)."""
    model, processor = library
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}] + messages
    inputs = processor(processor.apply_chat_template(conversation, add_generation_prompt=True), images=images)
    new = model.generate(inputs["input_ids"], inputs.get("pixel_values"), max_new_tokens=n, stop_strings=["###"],
                         tokenizer=processor)
    return new[0].tolist()


def test_answer_and_stream_equal_the_library_greedy_answer(client, library):
    expected, n_prompt, n_new = library_answer(library, [template_user("What is in the red box?")], [cat_with_box()], 24)
    assert expected.strip()
    r = client.chat.completions.create(model=MODEL, messages=[ask("What is in the red box?")], max_tokens=24)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == ("length" if n_new == 24 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, n_new, n_prompt + n_new)

    chunks = list(client.chat.completions.create(model=MODEL, messages=[ask("What is in the red box?")],
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it did stream, in pieces
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_new


def test_stream_is_server_sent_events_ending_with_done(url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_follow_up_question_sends_the_whole_conversation(client, library):
    first, _, _ = library_answer(library, [template_user("What is in the red box?")], [cat_with_box()], 12)
    history = [template_user("What is in the red box?"), {"role": "assistant", "content": [{"type": "text", "text": first}]},
               template_user("And what colour is it?", image=False)]
    expected, _, _ = library_answer(library, history, [cat_with_box()], 12)
    r = client.chat.completions.create(model=MODEL, max_tokens=12, messages=[
        ask("What is in the red box?"), {"role": "assistant", "content": first}, ask("And what colour is it?", False)])
    assert r.choices[0].message.content == expected


def test_text_only_string_content_and_seeded_sampling(client, library):
    expected, _, _ = library_answer(library, [template_user("Tell me a story.", image=False)], None, 16,
                                    temperature=1.0, top_p=0.9, seed=7)
    answers = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                              max_tokens=16, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
               for _ in range(2)]
    assert answers == [expected, expected]


def test_stop_strings_end_the_answer(client, library):
    full, _, _ = library_answer(library, [template_user("What is in the red box?")], [cat_with_box()], 24)
    stop = full.strip()[4:6]  # two characters from inside the answer
    expected, _, _ = library_answer(library, [template_user("What is in the red box?")], [cat_with_box()], 24, [stop])
    r = client.chat.completions.create(model=MODEL, messages=[ask("What is in the red box?")], max_tokens=24, stop=stop)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert len(expected) < len(full) and stop not in expected


def test_visual_prompts_give_the_pixels_of_draw_visual_prompt(url):
    marks = [BOX, {"shape": "arrow", "coords": [400, 250, 300, 160], "color": "lime"},
             {"shape": "scribble", "coords": [20, 20, 60, 80, 120, 40], "color": "0,0,255", "width": 6},
             {"shape": "mask", "coords": [300, 20, 440, 30, 380, 120]}, {"shape": "point", "coords": [451, 300]}]
    r = httpx.post(f"{url}/v1/draw", json=image_part(marks=marks), timeout=60)
    assert r.status_code == 200, r.text
    drawn = Image.open(io.BytesIO(base64.b64decode(r.json()["url"].split(",", 1)[1])))
    expected = load_image(CAT)
    for m in marks:
        expected = draw_visual_prompt(expected, m["shape"], m["coords"], m.get("color", "red"), m.get("width"))
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))
    assert not np.array_equal(np.asarray(drawn), np.asarray(load_image(CAT).convert("RGB")))


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb's header, without its data."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, format="PNG")
    raw = bytearray(out.getvalue())
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(raw[24:29])  # chunk type, size, then depth etc.
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(raw)


def chat(*messages, **extra):
    return {"model": MODEL, "messages": list(messages), "max_tokens": 4, **extra}


LONG = " ".join(["word"] * 3000)  # more than the tiny model's context of 2048 tokens
ERRORS = {  # name: (body as JSON or raw bytes, status)
    "bad JSON": (b'{"model": "m", "messages": [', 400),
    "body not an object": ([1, 2], 400),
    "no messages": ({"model": MODEL, "messages": []}, 400),
    "unknown role": (chat({"role": "robot", "content": "hi"}), 400),
    "image that does not decode": (chat(ask("hi", image_part(data_url(b"not an image at all"), []))), 400),
    "image data that is not base64": (chat(ask("hi", image_part("data:image/png;base64,@@@@", []))), 400),
    "URL without --allow-urls": (chat(ask("hi", image_part("http://127.0.0.1:9/cat.png", []))), 400),
    "more images than <image> slots": (chat(ask("<image> and <image>: what is here?")), 400),
    "an image in an assistant message": (chat(ask("hi"), {"role": "assistant", "content": [image_part()]}), 400),
    "coordinates outside the image": (chat(ask("hi", image_part(marks=[{"shape": "box", "coords": [0, 0, 500, 100]}]))), 400),
    "unknown shape": (chat(ask("hi", image_part(marks=[{"shape": "star", "coords": [1, 1, 9, 9]}]))), 400),
    "unknown colour": (chat(ask("hi", image_part(marks=[{**BOX, "color": "mauve"}]))), 400),
    "line width below 1 pixel": (chat(ask("hi", image_part(marks=[{**BOX, "width": 0}]))), 400),
    "coordinates that are not numbers": (chat(ask("hi", image_part(marks=[{"shape": "box", "coords": "1,2,3,4"}]))), 400),
    "prompt longer than the context": (chat({"role": "user", "content": LONG}), 400),
    "prompt plus max_tokens over the context": (chat(ask("hi"), max_tokens=2000), 400),
    "max_tokens < 1": (chat(ask("hi"), max_tokens=0), 400),
    "temperature out of range": (chat(ask("hi"), temperature=5), 400),
    "n > 1": (chat(ask("hi"), n=2), 400),
    "response_format json_object": (chat(ask("hi"), response_format={"type": "json_object"}), 400),
    "a model this server does not serve": ({**chat(ask("hi")), "model": "gpt-4o"}, 404),
    "body over 20 MB": (b'{"model": "m", "pad": "' + b"x" * (21 * 2**20) + b'"}', 413),
    "image over the pixel limit": (chat(ask("hi", image_part(data_url(png_claiming(10_000, 10_000)), []))), 413),
    "image over Pillow's bomb limit": (chat(ask("hi", image_part(data_url(png_claiming(30_000, 30_000)), []))), 413),
}


@pytest.mark.parametrize("name", ERRORS)
def test_errors_have_their_status_and_the_server_keeps_serving(url, client, name):
    body, status = ERRORS[name]
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    for stream in (False, True) if isinstance(body, dict) else (False,):  # a stream request fails the same way, before it starts
        r = httpx.post(f"{url}/v1/chat/completions", **kwargs if not stream else {"json": {**body, "stream": True}}, timeout=60)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["message"] and "Traceback" not in r.text and error["type"]
    ok = client.chat.completions.create(model=MODEL, messages=[ask("What is in the red box?")], max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_unknown_path_is_a_json_404(url):
    r = httpx.get(f"{url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_unknown_model_is_openais_404_and_the_served_id_and_short_name_answer(url, checkpoint):
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat(ask("hi", False)), "model": "gpt-4o"}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 404 and error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert "'gpt-4o'" in error["message"] and MODEL in error["message"] and error["param"] == "model"
    for name in (str(checkpoint), MODEL, None):  # the id /v1/models lists, its short name, or none at all
        body = {**chat(ask("hi", False)), "model": name}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_response_format_other_than_text_is_refused_and_text_accepted(url):
    r = httpx.post(f"{url}/v1/chat/completions", json=chat(ask("hi", False), response_format={"type": "json_object"}),
                   timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and "is not supported" in error["message"] and error["param"] == "response_format"
    ok = httpx.post(f"{url}/v1/chat/completions", json=chat(ask("hi", False), response_format={"type": "text"}),
                    timeout=60)
    assert ok.status_code == 200


def test_get_on_the_chat_endpoint_is_405_invalid_request(url):
    r = httpx.get(f"{url}/v1/chat/completions", timeout=10)
    error = r.json()["error"]
    assert r.status_code == 405 and error["type"] == "invalid_request_error"
    assert error["message"] == "GET is not allowed on /v1/chat/completions: use POST" and r.headers["allow"] == "POST"


def test_an_image_in_an_assistant_message_is_refused_in_english(url):
    body = chat(ask("hi"), {"role": "assistant", "content": [image_part()]})
    message = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["error"]["message"]
    assert "(an assistant message has no images)" in message


def test_group_size_reaches_the_int4_model(checkpoint):
    args = server.parse_args(["--model", str(checkpoint), "--quantize", "int4", "--group-size", "32"])
    model, _ = server.load(args)
    assert model.quantization == {"weights": "int4", "group_size": 32}
    assert server.parse_args(["--quantize", "int4"]).group_size is None  # from_pretrained's default, as cli.py


def test_max_slots_defaults_to_the_engines_choice_and_max_queue_to_64():
    args = server.parse_args([])
    assert (args.max_slots, args.max_queue) == (None, 64)  # None: Engine sizes the slots from free memory
    args = server.parse_args(["--max-slots", "3", "--max-queue", "5"])
    assert (args.max_slots, args.max_queue) == (3, 5)
    with pytest.raises(SystemExit):
        server.parse_args(["--max-queue", "0"])


def test_models_lists_the_served_model(client, checkpoint):
    assert [m.id for m in client.models.list()] == [str(checkpoint)]


def test_concurrent_requests_all_complete_with_the_same_answer(client, library):
    expected, _, _ = library_answer(library, [template_user("What is in the red box?")], [cat_with_box()], 16)
    results, errors = [None] * 4, []

    def one(i):
        try:
            messages = [ask("What is in the red box?")]
            if i % 2:
                stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stream=True)
                results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            else:
                answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
                results[i] = answer.choices[0].message.content
        except Exception as e:  # reported below, so that a failure names its request
            errors.append((i, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and results == [expected] * 4


def test_503_while_the_model_loads_then_answers(library):
    """In process, with a load that waits for the test: deterministic, unlike racing a real load."""
    from fastapi.testclient import TestClient

    go = threading.Event()

    def load():
        assert go.wait(60)
        return library

    backend = server.Backend(load)
    body = chat({"role": "user", "content": "Hello"})
    with TestClient(server.make_app(backend, MODEL)) as http:
        for path in ("/v1/chat/completions", "/health"):
            r = http.post(path, json=body) if "chat" in path else http.get(path)
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert http.get("/v1/models").status_code == 200  # the rest answers while loading
        go.set()
        assert backend.ready.wait(60)
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_a_model_that_does_not_load_ends_the_server_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "server.py"), "--model", str(tmp_path / "missing"),
                        "--port", str(free_port())], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "server.py: error: the model did not load: no checkpoint folder" in r.stderr
    assert "Traceback" not in r.stderr


def canvas_pixels(page):  # (300, 451, 3): what the page's canvas shows, in the photo's pixels
    shown = page.evaluate("() => Array.from($('canvas').getContext('2d').getImageData(0, 0, 451, 300).data)")
    return np.array(shown, dtype=np.uint8).reshape(300, 451, 4)[..., :3]


def test_page_draw_a_box_ask_and_see_the_streamed_answer(url, library, tmp_path):
    """The page in headless Chromium: open a photo, drag a box with the mouse, ask, read the streamed answer.

    Its screenshot goes to a temporary folder; the README's picture is made on purpose with
    SCREENSHOT=docs/server_page.png python -m pytest tests/test_server.py -k page"""
    if not CHROMIUM.exists():
        missing = f"no browser: {CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("REQUIRE_BROWSER"):  # set by .ci/run: in CI this test runs or fails
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 720})
            offsite = []  # the page must work offline: nothing but the server may be asked for
            page.on("request", lambda req: None if req.url.startswith(url) or req.url.startswith("data:")
                    else offsite.append(req.url))
            page.goto(url)
            page.wait_for_selector("#status:has-text('model:')", timeout=30_000)
            page.set_input_files("#file", str(CAT))
            page.wait_for_selector("#canvas", state="visible")
            box = page.locator("#canvas").bounding_box()
            assert box["width"] > 500  # shown larger than its 451 pixels: the page must scale the mouse back
            start, end = (0.27, 0.25), (0.48, 0.52)  # fractions of the canvas
            with page.expect_response("**/v1/draw", timeout=30_000):
                page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
                page.mouse.down()
                page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=8)
                page.mouse.up()
            coords = [round(f * size) for f, size in zip(start + end, (451, 300, 451, 300))]
            page.fill("#max_tokens", "16")
            page.fill("#question", "What is inside the red box?")
            with page.expect_request("**/v1/chat/completions") as sent:
                page.click("#send")
            request = sent.value.post_data_json
            part = request["messages"][0]["content"][0]
            assert request["stream"] is True and part["image_url"]["url"] == CAT_URL  # the photo's own bytes
            (mark,) = part["visual_prompts"]
            assert mark["shape"] == "box" and mark["color"] == "red"
            assert max(abs(a - b) for a, b in zip(mark["coords"], coords)) <= 1, (mark["coords"], coords)  # image pixels
            answer = page.wait_for_selector(".assistant[data-done=true]", timeout=120_000)
            image = draw_visual_prompt(load_image(CAT), "box", mark["coords"], "red")
            expected, _, _ = library_answer(library, [template_user("What is inside the red box?")], [image], 16)
            assert expected.strip() and answer.text_content() == expected
            # The canvas shows the image the server drew (the box in the photo's pixels), not a local sketch.
            assert np.array_equal(canvas_pixels(page), np.asarray(image))

            # A follow-up continues the conversation: the page resends it whole, the photo in the first turn.
            page.fill("#question", "And what colour is it?")
            with page.expect_request("**/v1/chat/completions") as sent:
                page.click("#send")
            messages = sent.value.post_data_json["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant", "user"]
            assert messages[0]["content"][0] == part and messages[1]["content"] == expected
            assert messages[2]["content"] == "And what colour is it?"
            page.wait_for_function("document.querySelectorAll('.assistant[data-done=true]').length == 2", timeout=120_000)
            # Its earlier turn (the photo included) came from the server's prefix cache: the answer's tooltip says so.
            first_turn = prompt_ids(library, [template_user("What is inside the red box?")], [image])
            follow_up = page.query_selector_all(".assistant[data-done=true]")[1]
            assert int(follow_up.get_attribute("data-cached")) >= len(first_turn) - 3
            assert "from the cache" in follow_up.get_attribute("title")
            shot = Path(os.environ.get("SCREENSHOT") or tmp_path / "server_page.png")
            page.screenshot(path=str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

            # A second mark (an arrow), then undo: the canvas is back to the server's image with the box alone.
            page.click("button[data-shape=arrow]")
            with page.expect_response("**/v1/draw", timeout=30_000):
                page.mouse.move(box["x"] + 0.9 * box["width"], box["y"] + 0.9 * box["height"])
                page.mouse.down()
                page.mouse.move(box["x"] + 0.7 * box["width"], box["y"] + 0.6 * box["height"], steps=5)
                page.mouse.up()
            assert "red arrow" in page.text_content("#marks")
            with page.expect_response("**/v1/draw", timeout=30_000):
                page.click("#undo")
            page.wait_for_function("!document.getElementById('marks').textContent.includes('arrow')")
            page.wait_for_timeout(300)  # the returned image's onload repaints the canvas
            assert np.array_equal(canvas_pixels(page), np.asarray(image))
            assert not offsite, offsite
        finally:
            browser.close()


# ---------------------------------------------------------------------------- the engine behind the server
ARROW = {"shape": "arrow", "coords": [400, 250, 300, 160], "color": "lime"}
BLUE_BOX = {**BOX, "color": "blue"}


def test_concurrent_requests_with_different_images_each_equal_generate_alone(client, library):
    """Four conversations in the engine at once (different images, questions and lengths): each answer is the
    one `generate` gives for it alone."""
    def marked(marks):
        image = load_image(CAT)
        for m in marks:
            image = draw_visual_prompt(image, m["shape"], m["coords"], m["color"])
        return image

    cases = [([BOX], "What is in the red box?", 12), ([ARROW], "Where does the green arrow point?", 20),
             ([], "What animal is this?", 6), (None, "Tell me a story about a cat.", 16)]
    expected = []
    for marks, question, n in cases:
        images = None if marks is None else [marked(marks)]
        text, n_prompt, n_new = library_answer(library, [template_user(question, marks is not None)], images, n)
        expected.append((text, n_prompt, n_new))
    results, errors = [None] * len(cases), []

    def one(i):
        marks, question, n = cases[i]
        try:
            part = False if marks is None else image_part(marks=marks)
            r = client.chat.completions.create(model=MODEL, messages=[ask(question, part)], max_tokens=n)
            results[i] = (r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens)
        except Exception as e:  # reported below, so that a failure names its request
            errors.append((i, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and results == expected


def test_follow_up_reuses_the_cached_conversation_and_another_image_does_not(client, library):
    """A follow-up resends the first turn: its prompt up to the first answer comes from the slot's cache
    (usage.prompt_tokens_details.cached_tokens), and the answer is still generate's for the whole prompt. The
    same words about another image share only the text before the image."""
    question = "Which colour is the box? (the prefix cache test)"
    turn1 = [template_user(question)]
    first, n1, n_new = library_answer(library, turn1, [cat_with_box()], 8)
    assert n_new == 8  # ran to its length: the slot holds the prompt and the first 7 answer tokens (fed back)
    first_ids = prompt_ids(library, turn1, [cat_with_box()])
    _, processor = library
    r1 = client.chat.completions.create(model=MODEL, max_tokens=8, messages=[ask(question)])
    assert r1.choices[0].message.content == first and r1.choices[0].finish_reason == "length"

    history = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": first}]},
                       template_user("And what is next to it?", image=False)]
    follow_ids = prompt_ids(library, history, [cat_with_box()])
    expected, n2, _ = library_answer(library, history, [cat_with_box()], 8)
    messages = [ask(question), {"role": "assistant", "content": first}, ask("And what is next to it?", False)]
    r2 = client.chat.completions.create(model=MODEL, max_tokens=8, messages=messages)
    assert r2.choices[0].message.content == expected and r2.usage.prompt_tokens == n2 == len(follow_ids)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    new = new_tokens(library, turn1, [cat_with_box()], 8)
    assert cached == common_prefix(follow_ids, first_ids + new[:7])  # what the first request left in its slot
    assert n1 - 3 <= cached < n2  # the whole first turn, give or take where the answer's text re-tokenizes

    # The same follow-up once more, streamed: the slot now holds all of it, and only its last token is prefilled.
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=8, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == n2 - 1

    # Another image (a blue box), the same words: nothing past the text before the image can be reused.
    blue = draw_visual_prompt(load_image(CAT), "box", BOX["coords"], "blue")
    other, _, _ = library_answer(library, history, [blue], 8)
    before_image = prompt_ids(library, history, [blue]).index(processor.image_token_id)
    r3 = client.chat.completions.create(model=MODEL, max_tokens=8, messages=[
        ask(question, image_part(marks=[BLUE_BOX])), {"role": "assistant", "content": first},
        ask("And what is next to it?", False)])
    assert r3.choices[0].message.content == other
    assert 0 < r3.usage.prompt_tokens_details.cached_tokens <= before_image


def test_a_stream_the_client_leaves_is_cancelled_and_the_server_goes_on(url, client, library):
    cancelled = ("vipllava_requests_finished_total", (("reason", "cancelled"),))
    before = metrics(url).get(cancelled, 0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
            "max_tokens": 1900}  # greedy, this runs past 1500 tokens without a stop (text-only, tiny checkpoint)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # one piece of the answer, then the client goes away
    wait_for(lambda: metrics(url).get(cancelled, 0) == before + 1, "the request to be cancelled")
    wait_for(lambda: metrics(url)[("vipllava_requests_running", ())] == 0, "no request running")
    expected, _, _ = library_answer(library, [template_user("What is in the red box?")], [cat_with_box()], 10)
    r = client.chat.completions.create(model=MODEL, messages=[ask("What is in the red box?")], max_tokens=10)
    assert r.choices[0].message.content == expected


def test_metrics_name_the_engines_counters_and_count_a_request(url, client):
    r = httpx.get(f"{url}/metrics", timeout=10)
    for name in ("vipllava_requests_running", "vipllava_requests_waiting", "vipllava_generated_tokens_total",
                 "vipllava_prefix_cached_tokens_total", "vipllava_prompt_tokens_total",
                 "vipllava_time_to_first_token_seconds_bucket"):
        assert f"\n{name}" in r.text, name
    before = metrics(url)
    assert before[("vipllava_slots", ())] == SLOTS  # --max-slots reached the engine
    answer = client.chat.completions.create(model=MODEL, messages=[ask("How many cats?")], max_tokens=5)
    after = metrics(url)
    grown = after[("vipllava_generated_tokens_total", ())] - before[("vipllava_generated_tokens_total", ())]
    assert grown >= answer.usage.completion_tokens > 0  # tokens a stop string cut off were generated too
    count = ("vipllava_time_to_first_token_seconds_count", ())
    assert after[count] == before[count] + 1
    prompt = ("vipllava_prompt_tokens_total", ())
    assert after[prompt] - before[prompt] == answer.usage.prompt_tokens


def test_a_full_queue_is_429_with_retry_after_and_the_waiting_request_is_answered(library):
    """In process, one slot and a queue of one: a request whose stream holds the engine's thread (so nothing
    moves), one waiting, then the next is refused with 429 before any stream starts."""
    from fastapi.testclient import TestClient

    story, _, _ = library_answer(library, [template_user("Tell me a story.", image=False)], None, 12)
    expected, _, _ = library_answer(library, [template_user("What is in the red box?")], [cat_with_box()], 6)
    blocked, release, results = threading.Event(), threading.Event(), {}

    def hold(piece):  # called from the engine's thread: while it waits, the engine does not step
        blocked.set()
        release.wait(120)

    backend = server.Backend(lambda: library, max_slots=1, max_queue=1)
    with TestClient(server.make_app(backend, MODEL)) as http:
        try:
            assert backend.ready.wait(60) and backend.engine.max_slots == 1
            story_chat = server.parse_request(chat({"role": "user", "content": "Tell me a story."}, max_tokens=12),
                                              server.MAX_IMAGE_PIXELS, False)
            first = threading.Thread(target=lambda: results.update(story=backend.answer(story_chat, hold)))
            first.start()
            assert blocked.wait(60)
            waiting = threading.Thread(target=lambda: results.update(waiting=http.post(
                "/v1/chat/completions", json=chat(ask("What is in the red box?"), max_tokens=6))))
            waiting.start()
            wait_for(lambda: backend.engine.n_waiting == 1, "a request waiting")
            for stream in (False, True):
                r = http.post("/v1/chat/completions", json=chat(ask("hi", False), stream=stream))
                assert r.status_code == 429, r.text
                assert int(r.headers["retry-after"]) > 0
                error = r.json()["error"]
                assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
                assert "try again" in error["message"]
        finally:
            release.set()
        first.join(120)
        waiting.join(120)
        assert results["story"]["text"] == story
        assert results["waiting"].status_code == 200
        assert results["waiting"].json()["choices"][0]["message"]["content"] == expected
