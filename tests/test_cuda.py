"""GPU only (skipped without CUDA): flash attention on the fp16 path, parity with transformers on the GPU,
and the torch.compile'd decode step (CUDA graphs) giving the same tokens as transformers."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import PAD_TOKEN, inputs, legacy_config, reference_logits, reference_model, write_checkpoint
from test_model import BATCH, FP32_TOL, HALF_TOL, max_diff
from tiny_checkpoint import write_checkpoint as write_tiny
from vipllava import VipLlava

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fp16_prefill_and_decode_run_with_only_the_flash_backend(tmp_path):
    # Tiny shapes: 336 px images (576 <image> positions), head size 16, GQA 4:2 in the decoder.
    model = VipLlava.from_pretrained(write_tiny(tmp_path), dtype=torch.float16, device="cuda", verbose=False)
    c = model.config
    text = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([text[:, :5], torch.full((2, c.image_seq_length), c.image_token_index), text[:, 5:]], dim=1)
    px = torch.randn(2, 3, 336, 336, dtype=torch.float16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # any attention call that cannot use flash raises
        logits = model(ids.cuda(), px.cuda(), last_only=True).logits  # prefill: CLIP attention and causal attention
        new = model.generate(ids, px, max_new_tokens=8, eos_token_id=[])  # prefill + 7 decode steps via the KV cache
    assert logits.shape == (2, 1, c.text_config.vocab_size) and torch.isfinite(logits).all()
    assert new.shape == (2, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logits_match_transformers_on_the_gpu(reference, tmp_path, dtype):
    # The same bounds as on the CPU (test_model.py), with both models on the GPU in the same dtype.
    write_checkpoint(reference, tmp_path, "hub", n_shards=2, dtype=dtype, config=legacy_config(dtype=str(dtype)[6:]))
    model = VipLlava.from_pretrained(tmp_path, dtype=dtype, device="cuda", verbose=False)
    ref = reference_model().to("cuda", dtype)
    ids, mask, px = (t.cuda() for t in inputs(BATCH))
    ours = model(ids, px.to(dtype), mask).logits
    bound = FP32_TOL if dtype == torch.float32 else HALF_TOL[dtype]
    assert max_diff(ours, reference_logits(ref, ids, mask, px.to(dtype)), mask) <= bound


def test_greedy_eager_and_compiled_decode_match_transformers_on_the_gpu(tmp_path):
    reference = reference_model(seed=1, text=dict(initializer_range=0.2))  # as in test_generate.py
    model = VipLlava.from_pretrained(write_checkpoint(reference, tmp_path, "hub", config=legacy_config(dtype="float32")),
                                     device="cuda", dtype=torch.float32, verbose=False)
    reference.cuda()
    ids, mask, px = (t.cuda() for t in inputs([(0, 4, 1, 9), (6, 3, 1, 4), (11, 2, 1, 2)], seed=3))
    n = 32
    with torch.no_grad():
        ref = reference.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=PAD_TOKEN, eos_token_id=None)[:, ids.shape[1]:]
    eager = model.generate(ids, px, mask, max_new_tokens=n, eos_token_id=[])
    model.compile_decode()  # torch.compile, mode reduce-overhead: the decode step replays as a CUDA graph
    compiled = [model.generate(ids, px, mask, max_new_tokens=n, eos_token_id=[]) for _ in range(2)]  # compile, replay
    assert len(set(ref[0].tolist())) > 3, "degenerate test: the model repeats one token"
    assert torch.equal(eager, ref)
    assert torch.equal(compiled[0], ref) and torch.equal(compiled[1], ref)


def test_chat_session_eager_and_compiled_equal_fresh_generations_on_the_gpu(tmp_path):
    # The GPU's step order (the next step queued before the stop check) and CUDA-graph replays on a cache
    # that a session swaps in and out of the model between turns.
    from processor import SYSTEM_PROMPT, VipLlavaProcessor, load_image
    from vipllava import ChatSession

    folder = write_tiny(tmp_path, vision=dict(image_size=42), dtype="float32", seed=1)
    model = VipLlava.from_pretrained(folder, device="cuda", dtype=torch.float32, verbose=False)
    processor = VipLlavaProcessor.from_pretrained(folder)
    image = load_image("tests/images/chelsea.png")
    questions = ["What is in the image?", "What colour is the cat?", "Is it to the left or to the right?"]

    def fresh(conversation):
        inputs = processor(processor.apply_chat_template(conversation, add_generation_prompt=True), images=[image])
        new = model.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=16, tokenizer=processor,
                             stop_strings=["###"])
        return new[0].tolist(), processor.decode(new[0], skip_special_tokens=True).strip()

    expected, history = [], [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
    for i, q in enumerate(questions):  # eager, fresh prompts: the expected answers
        history.append({"role": "user", "content": [{"type": "image"}] * (i == 0) + [{"type": "text", "text": q}]})
        ids, answer = fresh(history)
        expected.append(ids)
        history.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    for compiled in (False, True):
        if compiled:
            model.compile_decode()
        for _ in range(1 + compiled):  # compiled: compile, then replay
            chat = ChatSession(model, processor, image=image)
            for q, ids in zip(questions, expected):
                chat.ask(q, max_new_tokens=16)
                assert chat.last_token_ids == ids
