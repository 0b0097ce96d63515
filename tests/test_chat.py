"""ChatSession: turns that reuse the KV cache give exactly what a fresh generate over the full prompt gives."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_checkpoint
import generate
from processor import SYSTEM_PROMPT, VipLlavaProcessor, load_image
from generate import ChatSession
from vipllava import VipLlava

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "tests" / "images" / "chelsea.png"
QUESTIONS = ["What is in the image?", "What colour is the cat?", "Is it to the left or to the right of the tree?"]
SMALL_CONTEXT = 200


def load(folder):
    return VipLlava.from_pretrained(folder, verbose=False), VipLlavaProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 42 px images: 9 <image> positions, so that a conversation is short and a small context holds a few turns.
    return tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("chat"), vision=dict(image_size=42),
                                            dtype="float32", seed=1)


@pytest.fixture(scope="module")
def pair(folder):
    return load(folder)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("small"), vision=dict(image_size=42),
                                              text=dict(max_position_embeddings=SMALL_CONTEXT), dtype="float32", seed=1)
    return folder, *load(folder)


@pytest.fixture(scope="module")
def image():
    return load_image(CAT)


def user(text, image=False):
    return {"role": "user", "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def system(text=SYSTEM_PROMPT):
    return [{"role": "system", "content": [{"type": "text", "text": text}]}] if text else []


def fresh(model, processor, conversation, image, n, template="vipllava"):
    """(token ids, prompt ids, answer) of a fresh generate over the whole rendered conversation."""
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, template=template)
    inputs = processor(prompt, images=None if image is None else [image])
    new = model.generate(inputs["input_ids"], inputs.get("pixel_values"), max_new_tokens=n, tokenizer=processor,
                         stop_strings=["###"] if template == "vipllava" else None)
    return new[0].tolist(), inputs["input_ids"][0].tolist(), processor.decode(new[0], skip_special_tokens=True).strip()


def check_turns(model, processor, chat, history, image, questions, n=16, template="vipllava"):
    """Ask each question; each answer must equal a fresh generation over the history so far."""
    for i, q in enumerate(questions):
        history.append(user(q, image=image is not None and not any(m["role"] == "user" for m in history)))
        ids, prompt, expected = fresh(model, processor, history, image, n, template)
        assert chat.ask(q, max_new_tokens=n) == expected
        assert chat.last_token_ids == ids  # token for token, stop-string padding included
        history.append(assistant(expected))
        assert chat.conversation == history
        if i:  # the earlier turns came from the cache
            assert chat.last_prefill_tokens < len(prompt) - (0 if image is None else 9)
    return history


@pytest.mark.parametrize("template", ["vipllava", "llava_v1"])
@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_three_turns_equal_fresh_full_prompt_generations(pair, image, template, with_image):
    model, processor = pair
    img = image if with_image else None
    chat = ChatSession(model, processor, image=img, template=template)
    check_turns(model, processor, chat, system(), img, QUESTIONS, template=template)
    assert len(set(chat.last_token_ids)) > 3, "degenerate test: the model repeats one token"


@pytest.mark.parametrize("order", ["queued", "fixed-shape step"])
def test_gpu_step_order_and_fixed_shape_step_stay_exact(pair, image, order, monkeypatch):
    # "queued": the GPU order, the next step queued before the stop check (the cache then holds one token more).
    # "fixed-shape step": the path compile_decode() compiles, run uncompiled; its cache grows in CACHE_STEP steps.
    model, processor = pair
    if order == "queued":
        monkeypatch.setattr(generate, "queue_ahead", lambda device: True)
    else:
        monkeypatch.setattr(model, "compiled_step", model.language_model.decode_step)
    chat = ChatSession(model, processor, image=image)
    history = check_turns(model, processor, chat, system(), image, QUESTIONS[:1])
    cache = chat.cache[0]
    check_turns(model, processor, chat, history, image, QUESTIONS[1:])
    if order != "queued":
        assert chat.cache[0] is cache and cache.k.shape[2] == generate.CACHE_STEP  # the same buffers: one graph
    model.language_model.remove_cache()


@pytest.mark.parametrize("fixed_shape", [False, True], ids=["eager", "fixed-shape step"])
def test_the_cache_grows_in_steps_keeping_what_it_holds(pair, image, fixed_shape, monkeypatch):
    model, processor = pair
    monkeypatch.setattr(generate, "CACHE_STEP", 32)  # so that every turn outgrows it
    if fixed_shape:
        monkeypatch.setattr(model, "compiled_step", model.language_model.decode_step)
    chat = ChatSession(model, processor, image=image)
    lengths = []
    for q in QUESTIONS:
        check_turns(model, processor, chat, list(chat.conversation), image, [q])
        lengths.append(chat.cache[0].k.shape[2])
    assert all(n % 32 == 0 for n in lengths) and lengths[0] < lengths[1] < lengths[2], lengths
    model.language_model.remove_cache()


def test_turn_two_prefills_only_the_tokens_after_what_is_cached(pair, image):
    model, processor = pair
    chat = ChatSession(model, processor, image=image)
    # One new token in turn 1: it is sampled, never fed, so the cache holds exactly turn 1's prompt.
    ids1, prompt1, a1 = fresh(model, processor, system() + [user(QUESTIONS[0], True)], image, 1)
    chat.ask(QUESTIONS[0], max_new_tokens=1)
    assert chat.last_prefill_tokens == len(prompt1)
    _, prompt2, _ = fresh(model, processor, system() + [user(QUESTIONS[0], True), assistant(a1), user(QUESTIONS[1])], image, 1)
    assert prompt2[:len(prompt1)] == prompt1
    chat.ask(QUESTIONS[1], max_new_tokens=8)
    assert chat.last_prefill_tokens == len(prompt2) - len(prompt1)  # the answer, the question, the separators
    # After a longer answer: everything from the first token where the fresh prompt differs from prompt + answer.
    ids2, _, a2 = fresh(model, processor, system() + [user(QUESTIONS[0], True), assistant(a1), user(QUESTIONS[1])], image, 8)
    history = system() + [user(QUESTIONS[0], True), assistant(a1), user(QUESTIONS[1]), assistant(a2), user(QUESTIONS[2])]
    _, prompt3, _ = fresh(model, processor, history, image, 1)
    cached = prompt2 + ids2[:-1]
    same = next(i for i, (a, b) in enumerate(zip(cached + [-1], prompt3)) if a != b)
    chat.ask(QUESTIONS[2], max_new_tokens=8)
    assert chat.last_prefill_tokens == len(prompt3) - same
    assert chat.last_prefill_tokens < len(prompt3) - len(prompt2) + 8


def test_image_features_are_computed_once(pair, image, monkeypatch):
    model, processor = pair
    calls = []
    features = model.get_image_features
    monkeypatch.setattr(model, "get_image_features", lambda px: calls.append(px.shape) or features(px))
    chat = ChatSession(model, processor, image=image)
    chat.prefill()  # the system line and the image, before any question
    for q in QUESTIONS:
        chat.ask(q, max_new_tokens=6)
    chat.reset()  # forget the turns, keep the image: the next first question starts as the cached one did
    assert chat.conversation == system()
    chat.ask(QUESTIONS[1], max_new_tokens=6)
    assert len(calls) == 1
    _, prompt, _ = fresh(model, processor, system() + [user(QUESTIONS[1], True)], image, 1)
    assert chat.last_prefill_tokens < len(prompt) - 9  # the system line and the image stayed in the cache


def test_an_edited_answer_is_re_prefilled_from_where_it_differs(pair, image):
    model, processor = pair
    chat = ChatSession(model, processor, image=image, system="")
    chat.ask(QUESTIONS[0], max_new_tokens=12)
    chat.conversation[-1] = assistant("The image shows a red stop sign on a street corner.")
    history = chat.conversation + [user(QUESTIONS[1])]
    ids, prompt, expected = fresh(model, processor, history, image, 12)
    assert chat.ask(QUESTIONS[1], max_new_tokens=12) == expected and chat.last_token_ids == ids
    assert chat.conversation[0]["role"] == "user"  # system "": no system message


def test_sessions_sharing_a_model_and_plain_generate_in_between_stay_exact(pair, image):
    model, processor = pair
    a, b = ChatSession(model, processor, image=image), ChatSession(model, processor, template="llava_v1")
    ha, hb = system(), system()
    check_turns(model, processor, a, ha, image, QUESTIONS[:1])
    check_turns(model, processor, b, hb, None, QUESTIONS[:1], template="llava_v1")  # and fresh generates between
    check_turns(model, processor, a, ha, image, QUESTIONS[1:2])
    check_turns(model, processor, b, hb, None, QUESTIONS[1:2], template="llava_v1")
    a.close()
    check_turns(model, processor, a, ha, image, QUESTIONS[2:])
    assert a.last_prefill_tokens == len(fresh(model, processor, ha[:-1], image, 1)[1])  # closed: all prefilled again


def test_context_limit_drops_the_oldest_pairs_after_the_first(small, image, capfd):
    _, model, processor = small
    chat = ChatSession(model, processor, image=image)
    history, n, first, drops = system(), 16, len(system()), []
    for q in QUESTIONS * 2:
        candidate, dropped = history + [user(q, image=len(history) == first)], 0
        while len(fresh_prompt(processor, candidate)) + n > SMALL_CONTEXT:  # the rule, written out here
            candidate = candidate[:first + 2] + candidate[first + 4:]  # the oldest pair after the image turn
            dropped += 1
        ids, _, expected = fresh(model, processor, candidate, image, n)
        assert chat.ask(q, max_new_tokens=n) == expected and chat.last_token_ids == ids
        assert chat.last_dropped == dropped
        drops.append(dropped)
        history = candidate + [assistant(expected)]
        assert chat.conversation == history and chat.conversation[first]["content"][0] == {"type": "image"}
    assert sum(drops) >= 2 and drops.index(1) < len(drops) - 1, drops  # turns were dropped, and the chat went on
    assert "oldest question/answer pair(s) after the first" in capfd.readouterr().err


def fresh_prompt(processor, conversation):
    return processor.encode(processor.apply_chat_template(conversation, add_generation_prompt=True))


def test_a_turn_that_cannot_fit_is_a_clear_error_and_the_session_goes_on(small, image):
    _, model, processor = small
    chat = ChatSession(model, processor, image=image)
    chat.ask(QUESTIONS[0], max_new_tokens=8)
    before = list(chat.conversation)
    with pytest.raises(ValueError, match=f"with only the first question and answer kept; with max_new_tokens=8 that is "
                                         f"\\d+, more than the model's context of {SMALL_CONTEXT}"):
        chat.ask("the cat " * 100, max_new_tokens=8)
    assert chat.conversation == before
    with pytest.raises(ValueError, match="contains <image>"):
        chat.ask("<image> what?", max_new_tokens=8)
    ids, _, expected = fresh(model, processor, before + [user(QUESTIONS[1])], image, 8)
    assert chat.ask(QUESTIONS[1], max_new_tokens=8) == expected and chat.last_token_ids == ids
    with pytest.raises(ValueError, match="this turn's prompt takes \\d+ tokens; with max_new_tokens=8"):
        ChatSession(model, processor, image=image).ask("the cat " * 100, max_new_tokens=8)


def test_streamed_pieces_make_the_answer_and_timings_are_recorded(pair, image):
    model, processor = pair
    chat, streamed = ChatSession(model, processor, image=image), []
    answer = chat.ask(QUESTIONS[0], max_new_tokens=12, streamer=streamed.append)
    assert len(streamed) > 2 and "".join(streamed).strip() == answer
    assert 0 < chat.last_time_to_first_token <= chat.last_seconds and chat.last_new_tokens == len(chat.last_token_ids)


def test_unknown_template_fails_at_once(pair):
    with pytest.raises(ValueError, match="unknown chat template 'alpaca'"):
        ChatSession(*pair, template="alpaca")


def test_cli_chat_four_turns_with_a_small_context(small, image):
    folder, model, processor = small
    questions = QUESTIONS + ["And the sky?"]
    r = subprocess.run([sys.executable, str(ROOT / "vipllava.py"), "--model", folder, "--image", CAT, "--chat",
                        "--verbose", "--max-new-tokens", "16", "--prompt", questions[0]],
                       input="\n".join(questions[1:]) + "\n\n", text=True, capture_output=True, cwd=ROOT,
                       env=dict(os.environ), timeout=300)
    assert r.returncode == 0, r.stderr
    chat = ChatSession(model, processor, image=image)
    answers = [chat.ask(q, max_new_tokens=16) for q in questions]
    assert r.stdout.splitlines() == answers  # the same session, streamed
    assert "oldest question/answer pair(s) after the first" in r.stderr  # the small context was reached
    assert r.stderr.count("tokens prefilled, first token after") == 4 and r.stderr.count("you> ") == 4


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_keeps_the_session_exact(folder, image, mode):
    # The KV cache takes the embedding's dtype (lm_head may be int8) and every turn's prefill is longer than 16
    # tokens, so the turns and the fresh generations run the same (dequantized-pieces) path for their prompts.
    model = VipLlava.from_pretrained(folder, quantize=mode, group_size=32, verbose=False)
    processor = VipLlavaProcessor.from_pretrained(folder)
    chat = ChatSession(model, processor, image=image)
    check_turns(model, processor, chat, system(), image, QUESTIONS[:2])
    assert chat.last_prefill_tokens > 16
    assert chat.cache[0].k.dtype == torch.bfloat16
