"""finetune.py: labels as LLaVA's preprocess_v1 makes them, the marked data, gradient accumulation."""
import copy
import json
import random

import pytest
import torch
from PIL import Image

import finetune
import lora
from conftest import IMAGE_SEQ, IMAGE_TOKEN, PAD_TOKEN, legacy_config, reference_model, write_checkpoint
from processor import SYSTEM_PROMPT, VipLlavaProcessor
from tiny_checkpoint import write_processor_files
from vipllava import VipLlava
from visual_prompts import COLORS, SHAPE_WORDS, sample_mark

IGNORE = -100


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "metaspace"])
def processor(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proc")
    write_processor_files(folder, image_size=42, legacy=request.param)
    p = VipLlavaProcessor.from_pretrained(folder)
    p.legacy = request.param
    return p


def reference_labels(processor, turns, has_image):
    """LLaVA's preprocess_v1 (llava_v1 template), written from its rules, not from finetune.py: the prompt built by
    hand and tokenized whole; per round (split on </s>), len(tok(instruction + " ASSISTANT: ")) - 2 tokens masked
    (<s> and the space that merges into the answer), round_len = len(tok(round)) (its <s> stands for the </s>).
    This counting holds for the legacy tokenizer.json the checkpoints have (each text segment starts with "▁",
    after </s> too); for others LLaVA's counts drift (upstream's "- 1 per later round" is tuned to Llama's real
    vocabulary) and it masks the whole sample with a warning."""
    tok = processor.encode  # <image> expanded, <s> added
    conversation = SYSTEM_PROMPT + " "
    for i, (q, a) in enumerate(turns):
        q = ("<image>\n" + q) if has_image and i == 0 else q
        conversation += "USER: " + q + " " + "ASSISTANT: " + a + "</s>"
    ids = tok(conversation)
    target = list(ids)
    cur = 1
    target[:cur] = [IGNORE]
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        assert len(parts) == 2
        round_len, instruction_len = len(tok(rou)), len(tok(parts[0] + " ASSISTANT: ")) - 2
        target[cur:cur + instruction_len] = [IGNORE] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE] * (len(target) - cur)
    assert cur == len(ids), "the reference's own length check"
    return ids, target


CONVERSATIONS = [
    [("What is in the box?", "A cat.")],
    [("Describe it.", "The image shows a red stop sign on a street corner."), ("How many?", "3 people"),
     ("Left or right?", "left")],
    [("Count them.", "2"), ("Is it blue?", "yes, it is.\nIt is light blue.")],  # digits, newlines in an answer
]


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["one-turn", "three-turns", "digits-and-newline"])
@pytest.mark.parametrize("has_image", [True, False], ids=["image", "text-only"])
def test_labels_equal_preprocess_v1(processor, turns, has_image):
    record = {"conversations": [m for q, a in turns
                                for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]}
    if has_image:
        record["image"] = "x.png"
        record["conversations"][0]["value"] += " <image>"  # moved to the front, as LLaVA does
    ids, labels = finetune.tokenize_with_labels(processor, finetune.record_turns(record))
    if processor.legacy:
        want_ids, want_labels = reference_labels(processor, turns, has_image)
        assert ids.tolist() == want_ids
        assert labels.tolist() == want_labels
    # both tokenizers: the supervised runs are exactly the answers, each with its </s>, in order
    runs, run = [], []
    for x in labels.tolist():
        if x != IGNORE:
            run.append(x)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    assert [processor.decode(r) for r in runs] == [a + "</s>" for _, a in turns]
    assert (labels[ids == processor.image_token_id] == IGNORE).all()


def test_truncation_after_the_image_expansion(processor):
    turns = finetune.record_turns({"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A long answer about a cat."}]})
    ids, labels = finetune.tokenize_with_labels(processor, turns)
    short_ids, short_labels = finetune.tokenize_with_labels(processor, turns, max_length=len(ids) - 3)
    assert short_ids.tolist() == ids[:-3].tolist() and short_labels.tolist() == labels[:-3].tolist()
    image_end = int((ids == processor.image_token_id).nonzero().max())
    with pytest.raises(ValueError, match="cuts into the image"):
        finetune.tokenize_with_labels(processor, turns, max_length=image_end - 2)
    # cut right after the prompt: no supervised token left, and the collator names the sample
    first_answer = int((labels != IGNORE).nonzero().min())
    ids, labels = finetune.tokenize_with_labels(processor, turns, max_length=first_answer)
    batch = finetune.collate([{"id": "sample 7", "input_ids": ids, "labels": labels, "pixel_values": None}], 0)
    assert batch["skipped"] == ["sample 7"] and batch["ids"] == []


def photo(tmp_path, name="photo.png", size=(200, 120)):
    Image.new("RGB", size, (128, 128, 128)).save(tmp_path / name)
    return name


def test_marked_sample_phrase_and_mark(processor, tmp_path):
    records = [{"id": "refcocog-1", "image": photo(tmp_path), "bboxes": [[20, 10, 120, 100]],
                "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox0>?"},
                                  {"from": "gpt", "value": "The object <bbox> is a cup."}]}]
    data = finetune.MarkedConversations(records, processor, tmp_path, seed=3)
    item = data[0]
    mark = sample_mark(random.Random("3/0/0"), (200, 120), [20, 10, 120, 100])  # the same draw, by (seed, epoch, i)
    text = processor.decode(item["input_ids"])
    assert text.count(mark.phrase) == 2 and "<bbox" not in text
    how, what = SHAPE_WORDS[mark.shape]
    assert mark.phrase.startswith(how) and mark.phrase.endswith(what)
    assert torch.equal(data[0]["pixel_values"], item["pixel_values"])  # the same every time
    marked = item["pixel_values"]
    plain = processor.image_processor(Image.open(tmp_path / records[0]["image"]))["pixel_values"][0]
    assert (marked - plain).abs().amax() > 0.5  # the mark is drawn
    phrases = set()
    for epoch in range(8):
        data.epoch = epoch
        phrases.add(processor.decode(data[0]["input_ids"]))
    assert len(phrases) > 1  # each epoch samples new marks


def test_mark_sampler_follows_the_training_ranges():
    rng = random.Random(0)
    marks = [sample_mark(rng, (672, 400), [100, 50, 400, 300]) for _ in range(2000)]
    assert {m.shape for m in marks} == set(SHAPE_WORDS)
    named = [m for m in marks if m.color_name]
    assert 0.4 < len(named) / len(marks) < 0.6 and {m.color_name for m in named} == set(COLORS)
    assert all(COLORS[m.color_name] == m.color for m in named)
    for m in marks:
        assert (48 <= m.alpha <= 128) if m.shape == "mask" else (96 <= m.alpha <= 255)
    widths = [m.width for m in marks if m.shape == "box"]  # 2-8 at 336, x2 here (672 px)
    assert min(widths) == 4 and max(widths) == 16


def test_bad_samples_are_errors_that_name_them(processor, tmp_path):
    name = photo(tmp_path)
    bad = [{"id": "a1", "conversations": [{"from": "human", "value": "<bbox0>?"}, {"from": "gpt", "value": "x"}],
            "bboxes": [[1, 1, 5, 5]]},  # marks but no image
           {"id": "a2", "image": name, "bboxes": [[1, 1, 50, 50]],
            "conversations": [{"from": "human", "value": "<image>\n<bbox1>?"}, {"from": "gpt", "value": "x"}]},
           {"id": "a3", "image": name, "bboxes": [[1, 1, 500, 50]],  # outside the 200x120 image
            "conversations": [{"from": "human", "value": "<image>\n<bbox0>?"}, {"from": "gpt", "value": "x"}]},
           {"id": "a4", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nx"},
                                                                  {"from": "gpt", "value": "x"}]}]
    data = finetune.MarkedConversations(bad, processor, tmp_path)
    for i, want in enumerate(["no image", "has <bbox1> but the record has 1", "not x1 < x2", "no image file"]):
        with pytest.raises(ValueError, match=f"id 'a{i + 1}'.*{want}"):
            data[i]


def test_question_file_records(processor, tmp_path):
    records = [{"image": photo(tmp_path), "question": "What colour is the mark?", "answer": "red",
                "visual_prompts": [{"shape": "box", "coords": [10, 10, 100, 100], "color": "red"}]}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    item = finetune.MarkedConversations(finetune.read_records(path), processor, tmp_path)[0]
    text = processor.decode(item["input_ids"])
    assert text.count("<image>") == processor.image_seq_length
    assert text.endswith("\nWhat colour is the mark? ASSISTANT: red</s>")
    assert processor.decode([x for x in item["labels"].tolist() if x != IGNORE]).strip() == "red</s>"


def synthetic_samples(n, seed=0):
    """Samples in the conftest vocabulary: an image, text of varied length, the answer part supervised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        before, after = 2 + i % 3, 4 + (3 * i) % 5
        ids = torch.cat([torch.tensor([1]), torch.randint(2, IMAGE_TOKEN, (before,), generator=g),
                         torch.full((IMAGE_SEQ,), IMAGE_TOKEN), torch.randint(2, IMAGE_TOKEN, (after,), generator=g)])
        labels = torch.full_like(ids, IGNORE)
        labels[-(after // 2 + 1):] = ids[-(after // 2 + 1):]
        out.append({"id": f"s{i}", "input_ids": ids, "labels": labels,
                    "pixel_values": torch.randn(3, 42, 42, generator=g)})
    return out


def test_k_micro_batches_equal_one_big_batch(tmp_path):
    """k micro-batches of b give the same update as one batch of k*b (SGD with lr 1: the update is the gradient),
    with the supervised-token counts deliberately uneven between the micro-batches. The accumulating side also
    recomputes its decoder layers (activation checkpointing), which must not change a gradient either."""
    folder = write_checkpoint(reference_model(), tmp_path, "hub", config=legacy_config(dtype="float32"))
    base = VipLlava.from_pretrained(folder, verbose=False)
    config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    models = []
    for _ in range(2):
        m = copy.deepcopy(base)
        groups = finetune.prepare_model(m, config, seed=5)
        with torch.no_grad():  # B non-zero, so that every LoRA weight gets a gradient
            for mod in lora.lora_modules(m).values():
                mod.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
        optimizer = torch.optim.SGD(groups["lora"] + groups["projector"], lr=1.0)
        models.append((m, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)))
    samples = synthetic_samples(6)
    (one, opt1, s1), (acc, opt2, s2) = models
    start = {n: p.detach().clone() for n, p in one.named_parameters() if p.requires_grad}
    loss1, n1 = finetune.train_step(one, [finetune.collate(samples, PAD_TOKEN)], opt1, s1, max_grad_norm=0)
    micro = [finetune.collate(samples[i:i + 2], PAD_TOKEN) for i in range(0, 6, 2)]
    acc.language_model.checkpointing = True
    assert len({finetune.supervised_count(b) for b in micro}) > 1
    loss2, n2 = finetune.train_step(acc, micro, opt2, s2, max_grad_norm=0)
    assert n1 == n2 and abs(loss1 - loss2) <= 1e-6
    params2 = dict(acc.named_parameters())
    for name, p in one.named_parameters():
        if p.requires_grad:
            assert (p - start[name]).abs().max() > 0, name  # it moved
            assert (p - params2[name]).abs().max() <= 1e-6, name


def test_command_line_writes_a_peft_adapter_and_a_loss_log_that_cli_loads(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import tiny_checkpoint

    root = Path(__file__).resolve().parent.parent
    base = tiny_checkpoint.write_checkpoint(tmp_path / "base", vision=dict(image_size=112), dtype="float32")
    name = photo(tmp_path, size=(160, 120))
    records = [{"id": f"r{i}", "image": name, "bboxes": [[10 + i, 10, 90, 80]],
                "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox0>?"},
                                  {"from": "gpt", "value": "A cat."}]} for i in range(5)]
    (tmp_path / "train.json").write_text(json.dumps(records))
    out = tmp_path / "adapter"
    r = subprocess.run([sys.executable, str(root / "finetune.py"), "--model", base, "--data", tmp_path / "train.json",
                        "--image-folder", tmp_path, "--output", out, "--eval-data", tmp_path / "train.json",
                        "--lora-r", "4", "--lora-alpha", "8", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3",
                        "--checkpointing"], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 2 and all(e["tokens_per_s"] > 0 and e["supervised_tokens"] > 0 for e in steps)
    assert [e["step"] for e in log if "eval_loss" in e] == [0, 2]
    assert steps[0]["lr"] < steps[1]["lr"] or steps[0]["lr"] == 0  # warmup first
    r = subprocess.run([sys.executable, str(root / "vipllava.py"), "--model", base, "--adapter", out, "--image",
                        tmp_path / name, "--box", "10,10,90,80", "--prompt", "What is it?", "--max-new-tokens", "3"],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr


COLOURS = ["red", "lime", "blue", "yellow"]


def colour_task(n, seed, folder):
    """"What colour is the mark?" on grey photos with a large filled mark: the notebook's task."""
    rng, records = random.Random(seed), []
    folder.mkdir(exist_ok=True)
    for i in range(n):
        W, H, grey = rng.randint(120, 200), rng.randint(100, 160), rng.randint(60, 200)
        name = f"{seed}_{i}.png"
        Image.new("RGB", (W, H), (grey, grey, grey)).save(folder / name)
        x, y, c = rng.uniform(0, 0.3 * W), rng.uniform(0, 0.3 * H), rng.choice(COLOURS)
        polygon = [x, y, x + 0.7 * W, y, x + 0.7 * W, y + 0.7 * H, x, y + 0.7 * H]
        records.append({"image": name, "question": "What colour is the mark?", "answer": c,
                        "visual_prompts": [{"shape": "mask", "coords": polygon, "color": c, "alpha": 255}]})
    return records


@torch.no_grad()
def accuracy(model, processor, records, folder):
    """The share of records whose answer is the most likely of the four colours."""
    model.eval()
    right = 0
    for r in records:
        items = [finetune.MarkedConversations([dict(r, answer=c)], processor, folder)[0] for c in COLOURS]
        losses = [model(**{k: b[k] for k in ("input_ids", "pixel_values", "attention_mask", "labels")}).loss.item()
                  for b in (finetune.collate([item], processor.pad_token_id) for item in items)]
        right += COLOURS[losses.index(min(losses))] == r["answer"]
    return right / len(records)


def test_a_short_run_learns_the_colour_of_the_mark(tmp_path):
    """A real learning check on the tiny random model: 96 steps of LoRA r 16 + the projector. Measured: held-out
    loss 6.41 -> 2.21, accuracy 0.25 (chance) -> 1.0."""
    import tiny_checkpoint

    base = tiny_checkpoint.write_checkpoint(tmp_path / "base", vision=dict(image_size=112), dtype="float32")
    images = tmp_path / "images"
    (tmp_path / "train.json").write_text(json.dumps(colour_task(64, 0, images)))
    held_out = colour_task(40, 1, images)
    (tmp_path / "test.json").write_text(json.dumps(held_out))
    processor = VipLlavaProcessor.from_pretrained(base)
    model = VipLlava.from_pretrained(base, dtype="float32", verbose=False)
    before = accuracy(model, processor, held_out, images)
    args = finetune.parse_args(["--model", str(base), "--data", str(tmp_path / "train.json"), "--eval-data",
                                str(tmp_path / "test.json"), "--image-folder", str(images), "--output",
                                str(tmp_path / "out"), "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0",
                                "--lr", "5e-3", "--projector-lr", "5e-3", "--epochs", "6", "--batch-size", "4",
                                "--warmup-ratio", "0.1", "--quiet"])
    history = finetune.train(args, model, processor)
    after = accuracy(model, processor, held_out, images)
    assert history["eval_loss"][-1] < 0.6 * history["eval_loss"][0]
    assert before <= 0.5 and after >= 0.75, (before, after)
