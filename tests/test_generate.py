"""Generation: greedy parity with transformers' generate, sampling rules, stops and streaming."""
import pytest
import torch

from conftest import PAD_TOKEN, inputs, reference_model, write_checkpoint, legacy_config
import generate
from generate import sample
from vipllava import VipLlava

N_NEW = 40


@pytest.fixture(autouse=True, params=["host-order", "queued"])
def step_order(request, monkeypatch):
    # "queued" is the GPU order (the next step is queued before stops are read back), run here on the CPU.
    if request.param == "queued":
        monkeypatch.setattr(generate, "queue_ahead", lambda device: True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # A sharper random model than the default, so greedy paths are not a single repeated token.
    reference = reference_model(seed=1, text=dict(initializer_range=0.2))
    folder = write_checkpoint(reference, tmp_path_factory.mktemp("gen"), "hub", config=legacy_config(dtype="float32"))
    return reference, VipLlava.from_pretrained(folder, verbose=False)


def reference_generate(reference, ids, mask, px, n=N_NEW, **kw):
    with torch.no_grad():
        images = {} if px is None else {"pixel_values": px}  # transformers fails on an explicit None
        out = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=PAD_TOKEN, eos_token_id=None, **images, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("rows", [
    [(0, 5, 1, 6)],  # batch 1 with an image
    [(0, 9, 0, 0)],  # batch 1, text only
    [(0, 4, 1, 9), (6, 3, 1, 4), (11, 2, 1, 2)],  # batch 3 of different lengths, left-padded, images
    [(0, 14, 0, 0), (5, 9, 0, 0), (9, 5, 0, 0)],  # batch 3, text only
], ids=["b1-image", "b1-text", "b3-images", "b3-text"])
def test_greedy_matches_transformers_token_for_token(pair, rows):
    reference, model = pair
    ids, mask, px = inputs(rows, seed=3)
    ours = model.generate(ids, px, mask, max_new_tokens=N_NEW, eos_token_id=[])
    ref = reference_generate(reference, ids, mask, px)
    assert ours.shape == (len(rows), N_NEW)
    assert len(set(ours[0].tolist())) > 3, "degenerate test: the model repeats one token"
    assert torch.equal(ours, ref)


def test_repetition_penalty_matches_transformers(pair):
    reference, model = pair
    ids, mask, px = inputs([(0, 5, 1, 6), (3, 4, 1, 4)], seed=4)
    ours = model.generate(ids, px, mask, max_new_tokens=24, repetition_penalty=1.3, eos_token_id=[])
    assert torch.equal(ours, reference_generate(reference, ids, mask, px, n=24, repetition_penalty=1.3))


@pytest.mark.parametrize("rows", [[(0, 5, 1, 6)], [(0, 4, 1, 9), (6, 3, 1, 4), (11, 2, 1, 2)]], ids=["b1", "b3-padded"])
def test_fixed_shape_decode_step_matches_transformers(pair, rows):
    # The path compile_decode() compiles (whole-cache attention under a mask, the slot as a tensor), run
    # here without torch.compile; the compiled version is checked on a GPU in test_cuda.py.
    reference, model = pair
    ids, mask, px = inputs(rows, seed=3)
    model.compiled_step = model.language_model.decode_step
    try:
        ours = model.generate(ids, px, mask, max_new_tokens=N_NEW, eos_token_id=[])
        again = model.generate(ids, px, mask, max_new_tokens=N_NEW, eos_token_id=[])  # the kept cache is reused
        assert model.language_model.model.layers[0].self_attn.kv_cache.k.shape[2] == 256  # rounded up
    finally:
        model.compiled_step = None
        model.language_model.remove_cache()
    assert torch.equal(ours, reference_generate(reference, ids, mask, px))
    assert torch.equal(again, ours)


def test_cached_decode_equals_uncached_forward(pair):
    _, model = pair
    ids, mask, px = inputs([(0, 5, 1, 6)], seed=5)
    new = model.generate(ids, px, max_new_tokens=8, eos_token_id=[])
    full = torch.cat([ids, new], dim=1)
    logits = model(full, px).logits  # one forward over the prompt and the generated tokens
    assert torch.equal(logits[0, ids.shape[1] - 1:-1].argmax(-1), new[0])


def test_eos_in_one_row_does_not_stop_the_others(pair):
    _, model = pair
    ids, mask, px = inputs([(0, 4, 1, 9), (6, 3, 1, 4)], seed=3)
    free = model.generate(ids, px, mask, max_new_tokens=20, eos_token_id=[])
    eos = next(t for t in free[0, 2:].tolist() if t not in free[1].tolist())  # row 0 makes it, row 1 never does
    at = free[0].tolist().index(eos)
    out = model.generate(ids, px, mask, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(out[0, :at + 1], free[0, :at + 1])  # EOS kept, as transformers does
    assert (out[0, at + 1:] == PAD_TOKEN).all()  # then padding
    assert torch.equal(out[1], free[1])


def test_generation_stops_when_every_row_is_done(pair):
    _, model = pair
    ids, mask, px = inputs([(0, 5, 1, 6)], seed=3)
    free = model.generate(ids, px, max_new_tokens=10, eos_token_id=[])
    out = model.generate(ids, px, max_new_tokens=10, eos_token_id=int(free[0, 3]))
    assert out.shape[1] == free[0].tolist().index(int(free[0, 3])) + 1


class CharTokenizer:
    """Each token id decodes to a fixed string; <pad> is special. Stands in for the processor."""

    def __init__(self, pieces: dict):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces.get(i, "x") for i in ids if not (skip_special_tokens and i == PAD_TOKEN))

    def stream_decoder(self):
        return CharStream(self)


class CharStream:
    def __init__(self, tokenizer):
        self.decode = lambda i: tokenizer.decode([i], skip_special_tokens=True)

    def push(self, i):
        return self.decode(i)

    def flush(self):
        return ""


def test_stop_string_split_across_tokens_stops_and_is_not_returned(pair):
    _, model = pair
    ids, mask, px = inputs([(0, 5, 1, 6)], seed=3)
    free = model.generate(ids, px, max_new_tokens=16, eos_token_id=[])[0].tolist()
    i = next(k for k in range(3, 15) if free[k] not in free[:k] and free[k + 1] not in free[:k + 1])
    pieces = {t: "a" for t in free[:i]} | {free[i]: "##", free[i + 1]: "#b"}  # '###' spans two tokens
    tok = CharTokenizer(pieces)
    streamed = []
    out = model.generate(ids, px, max_new_tokens=16, eos_token_id=[], stop_strings=["###"], tokenizer=tok,
                         streamer=streamed.append)
    assert out.shape[1] == i + 2  # stopped at the token that completed '###'
    assert out[0, :i].tolist() == free[:i] and (out[0, i:] == PAD_TOKEN).all()
    assert tok.decode(out[0].tolist(), skip_special_tokens=True) == "a" * i
    assert "".join(streamed) == "a" * i and "#" not in "".join(streamed)


def test_streamer_pieces_concatenate_to_the_answer(pair):
    _, model = pair
    ids, mask, px = inputs([(0, 5, 1, 6)], seed=3)
    tok = CharTokenizer({t: chr(97 + t % 26) for t in range(128)})
    streamed = []
    out = model.generate(ids, px, max_new_tokens=12, eos_token_id=[], tokenizer=tok, streamer=streamed.append)
    assert len(streamed) >= 6  # pieces arrive as they are made, not all at the end
    assert "".join(streamed) == tok.decode(out[0].tolist(), skip_special_tokens=True)


def test_same_seed_same_tokens_and_top_k_1_is_greedy(pair):
    _, model = pair
    ids, mask, px = inputs([(0, 5, 1, 6)], seed=3)
    a = model.generate(ids, px, max_new_tokens=12, temperature=1.5, seed=7, eos_token_id=[])
    b = model.generate(ids, px, max_new_tokens=12, temperature=1.5, seed=7, eos_token_id=[])
    c = model.generate(ids, px, max_new_tokens=12, temperature=1.5, seed=8, eos_token_id=[])
    greedy = model.generate(ids, px, max_new_tokens=12, eos_token_id=[])
    top1 = model.generate(ids, px, max_new_tokens=12, temperature=1.5, top_k=1, seed=9, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(top1, greedy)


LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def frequencies(n=20000, **kw):
    g = torch.Generator().manual_seed(0)
    draws = sample(LOGITS.expand(n, 4), generator=g, **kw)
    return torch.bincount(draws, minlength=4).float() / n


def test_sampling_follows_the_softmax():
    assert torch.allclose(frequencies(temperature=1.0), LOGITS.exp()[0], atol=0.015)


def test_temperature_sharpens_and_flattens():
    cold, hot = frequencies(temperature=0.5), frequencies(temperature=2.0)
    expect_cold = torch.softmax(LOGITS[0] / 0.5, -1)
    expect_hot = torch.softmax(LOGITS[0] / 2.0, -1)
    assert torch.allclose(cold, expect_cold, atol=0.015) and torch.allclose(hot, expect_hot, atol=0.015)
    assert cold[0] > 0.6 and hot[0] < 0.4


def test_top_p_keeps_the_smallest_set_reaching_p():
    f = frequencies(temperature=1.0, top_p=0.7)  # 0.5 + 0.25 reaches 0.7: two tokens, renormalised
    assert f[2] == 0 and f[3] == 0
    assert torch.allclose(f[:2], torch.tensor([2 / 3, 1 / 3]), atol=0.015)
    assert (frequencies(temperature=1.0, top_p=0.4)[1:] == 0).all()  # the top token alone has 0.5 >= 0.4


def test_top_k_keeps_k_tokens():
    f = frequencies(temperature=1.0, top_k=3)
    assert f[3] == 0 and torch.allclose(f[:3], torch.tensor([0.5, 0.25, 0.15]) / 0.9, atol=0.015)


def test_greedy_is_argmax():
    assert sample(torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])).tolist() == [1, 0]


def test_bad_arguments(pair):
    _, model = pair
    ids, _, _ = inputs([(0, 5, 0, 0)])
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="need tokenizer="):
        model.generate(ids, stop_strings=["###"])
    with pytest.raises(ValueError, match="the prompt has 5 tokens; with max_new_tokens=300 that is 305, more than the model's context of 256"):
        model.generate(ids, max_new_tokens=300)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=1.0, top_p=2.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=-1), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
])
def test_bad_sampling_arguments_are_refused(pair, kw, message):
    _, model = pair
    ids, _, _ = inputs([(0, 5, 0, 0)])
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=2, **kw)


def test_do_sample_false_is_greedy_whatever_the_temperature(pair):
    _, model = pair
    ids, _, _ = inputs([(0, 5, 0, 0)])
    greedy = model.generate(ids, max_new_tokens=8)
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=5.0, seed=0, do_sample=False), greedy)
    sampled = model.generate(ids, max_new_tokens=8, do_sample=True, seed=0)  # temperature 1, as transformers
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=8, temperature=1.0, seed=0))


def test_left_padded_batch_without_a_mask_gets_it_inferred(pair):
    _, model = pair
    ids, mask, px = inputs([(0, 4, 1, 9), (6, 3, 1, 4)])
    assert torch.equal(model.generate(ids, px, max_new_tokens=10), model.generate(ids, px, mask, max_new_tokens=10))
    alone = model.generate(ids[1:, 6:], px[1:], max_new_tokens=10)  # row 1 without its 6 pad tokens
    assert torch.equal(model.generate(ids, px, max_new_tokens=10)[1], alone[0])
