"""Teach ViP-LLaVA your own marks: LoRA fine-tuning on marked images, in one readable loop.

    python finetune.py --model llava-hf/vip-llava-7b-hf --data train.json --image-folder images/ --output adapter/
    python vipllava.py --model llava-hf/vip-llava-7b-hf --adapter adapter/ --image x.jpg --box ... --prompt ...

    data: records -> marks sampled and drawn (visual_prompts.sample_mark), `<bboxN>` -> "within the red rectangle"
          -> llava_v1 prompt, tokenized whole -> labels: only the answers and their </s> supervised
    model: VipLlava, CLIP frozen (no graph), projector trained in full, LoRA on q/k/v/o/gate/up/down (lora.py)
    loop: AdamW (weight decay 0), cosine schedule with warmup, gradient accumulation normalised per supervised
          token across the accumulated micro-batches, the adapter saved in PEFT's format + a JSON-lines loss log

The settings are ViP-LLaVA's LoRA scripts' (r 128, alpha 256, dropout 0.05, lr 2e-4, projector 2e-5, one epoch,
warmup 0.03, max length 2048). Data: a JSON (or JSON-lines) list of LLaVA records, {"id", "image", "conversations":
[{"from": "human"|"gpt", "value"}], "bboxes": [[x1, y1, x2, y2], ...] (pixels of the image), "segmentations":
[[polygon], ...]}, or of question-file records {"image", "visual_prompts": [...], "question", "answer"}.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

import lora
from processor import IMAGE_TOKEN, VipLlavaProcessor, load_image, render_chat
from vipllava import IGNORE_INDEX, VipLlava
from visual_prompts import COLORS, SHAPES, draw_visual_prompts, sample_mark

PLACEHOLDER = re.compile(r"<bbox(\d*)>")  # <bbox> is <bbox0>


# ---------------------------------------------------------------------------- data
def read_records(path) -> list[dict]:
    """A JSON list, or one JSON object per line."""
    text = Path(path).read_text()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is neither a JSON list nor JSON lines ({e})") from None
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not ("conversations" in r or {"question", "answer"} <= r.keys()):
            raise ValueError(f"{path}, record {i}: expected LLaVA's {{'id', 'image', 'conversations'}} or "
                             f"{{'image', 'visual_prompts', 'question', 'answer'}}, got {str(r)[:120]}")
    return records


def record_turns(r: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs; `<image>` moved to the start of the first question as "<image>\\n", as LLaVA
    does. Placeholders stay: `fill_placeholders` replaces them once the marks are drawn."""
    if "conversations" in r:
        messages = r["conversations"]
        roles = [m.get("from") for m in messages]
        if not messages or len(messages) % 2 or roles != ["human", "gpt"] * (len(messages) // 2):
            raise ValueError(f"conversations must alternate human, gpt, ... and end with gpt, got roles {roles}")
        turns = [(q["value"], a["value"]) for q, a in zip(messages[0::2], messages[1::2])]
    else:
        turns = [(r["question"], r["answer"])]
    if any(IMAGE_TOKEN in a for _, a in turns) or any(IMAGE_TOKEN in q for q, _ in turns[1:]):
        raise ValueError(f"{IMAGE_TOKEN} may only appear in the first question")
    first = turns[0][0].replace(IMAGE_TOKEN, "").strip()
    turns[0] = ((IMAGE_TOKEN + "\n" + first) if r.get("image") else first, turns[0][1])
    return turns


def fill_placeholders(turns, phrases: list[str]):
    """`<bbox0>`, `<bbox1>`, ... (and `<bbox>`) -> the phrase naming the mark drawn for that box."""
    def phrase(m):
        i = int(m[1] or 0)
        if i >= len(phrases):
            raise ValueError(f"the text has {m[0]} but the record has {len(phrases)} bbox(es)")
        return phrases[i]

    return [(PLACEHOLDER.sub(phrase, q), PLACEHOLDER.sub(phrase, a)) for q, a in turns]


def tokenize_with_labels(processor: VipLlavaProcessor, turns, max_length: int | None = None):
    """input_ids and labels of one conversation, exactly as LLaVA's `preprocess_v1` with the llava_v1 template:

        "<system> USER: <q1> ASSISTANT: <a1></s>USER: <q2> ASSISTANT: <a2></s>"   tokenized whole (with <s>)

    labels = input_ids where a token lies inside " <answer></s>" (the space after "ASSISTANT:" goes with the
    answer: it merges into the answer's first token), -100 everywhere else: <s>, the system line, every question
    and "ASSISTANT:", the image positions. Spans come from the tokenizer's character offsets, so a token that
    would straddle a span's edge is an error, not a silent shift. Truncation at `max_length` comes after each
    <image> is expanded (to 576 ids); a cut inside an image is an error.
    """
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    text = render_chat(messages, template="llava_v1").replace(IMAGE_TOKEN, IMAGE_TOKEN * processor.image_seq_length)
    spans, pos = [], 0
    for _, answer in turns:
        start = text.index(" ASSISTANT: " + answer + "</s>", pos) + len(" ASSISTANT:")
        pos = start + len(" " + answer + "</s>")
        spans.append((start, pos))
    enc = processor.tokenizer.encode(text)
    ids, labels = enc.ids, [IGNORE_INDEX] * len(enc.ids)
    eos = processor.tokenizer.token_to_id("</s>")
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(enc.offsets) if b > a and start <= a and b <= end]
        straddles = [i for i, (a, b) in enumerate(enc.offsets) if a < start < b or a < end < b]
        if straddles or not inside or ids[inside[-1]] != eos:
            raise ValueError(f"the tokens do not split at the answer {text[start:end]!r}: cannot supervise it exactly")
        for i in inside:
            labels[i] = ids[i]
    if max_length is not None and len(ids) > max_length:
        image = processor.image_token_id
        if ids[max_length - 1] == image and ids[max_length] == image:
            raise ValueError(f"{len(ids)} tokens, and --max-length {max_length} cuts into the image: raise it")
        ids, labels = ids[:max_length], labels[:max_length]
    return torch.tensor(ids), torch.tensor(labels)


class MarkedConversations(torch.utils.data.Dataset):
    """Training samples: each record's marks sampled and drawn at load time, as ViP-LLaVA's training did, from a
    `random.Random` seeded by (seed, epoch, index), so that a rerun draws the same marks and each epoch new ones.
    Set `.epoch` before each epoch. An item is {"id", "input_ids", "labels", "pixel_values" or None}; a sample
    that cannot be drawn or tokenized raises an error naming it (never swapped for another)."""

    def __init__(self, records, processor, image_folder=None, max_length=2048, seed=0, shapes=SHAPES):
        self.records, self.processor, self.max_length, self.seed = records, processor, max_length, seed
        self.image_folder, self.shapes, self.epoch = Path(image_folder or "."), shapes, 0

    def __len__(self):
        return len(self.records)

    def name(self, i):
        return f"sample {i}" + (f" (id {self.records[i]['id']!r})" if "id" in self.records[i] else "")

    def marked(self, r: dict, rng: random.Random):
        """(image with the marks drawn, or None; the phrase of each bbox)."""
        if not r.get("image"):
            if r.get("bboxes") or r.get("visual_prompts"):
                raise ValueError("it has marks but no image")
            return None, []
        image = load_image(self.image_folder / r["image"])
        image = draw_visual_prompts(image, r.get("visual_prompts") or [])
        phrases, names = [], set(COLORS)
        segmentations = r.get("segmentations") or [None] * len(r.get("bboxes") or [])
        for bbox, seg in zip(r.get("bboxes") or [], segmentations):
            mark = sample_mark(rng, image.size, bbox, seg, self.shapes, tuple(n for n in COLORS if n in names))
            names.discard(mark.color_name)  # several marks: each named colour once
            image = mark.draw(image)
            phrases.append(mark.phrase)
        return image, phrases

    def __getitem__(self, i):
        rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
        try:
            image, phrases = self.marked(self.records[i], rng)
            turns = fill_placeholders(record_turns(self.records[i]), phrases)
            ids, labels = tokenize_with_labels(self.processor, turns, self.max_length)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise ValueError(f"{self.name(i)}: {e}") from e
        pixels = None if image is None else self.processor.image_processor(image)["pixel_values"][0]  # (3, H, W)
        return {"id": self.name(i), "input_ids": ids, "labels": labels, "pixel_values": pixels}


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-padded (B, T) input_ids / labels (-100) / attention_mask, and the images stacked (N, 3, H, W).
    A sample left with no supervised token (its answer cut off by the max length) is dropped and named in
    "skipped"; the batch may then be empty (T = 0)."""
    skipped = [s["id"] for s in samples if not bool((s["labels"][1:] != IGNORE_INDEX).any())]
    samples = [s for s in samples if s["id"] not in skipped]
    T = max((len(s["input_ids"]) for s in samples), default=0)
    batch = {"input_ids": torch.full((len(samples), T), pad_id), "labels": torch.full((len(samples), T), IGNORE_INDEX),
             "attention_mask": torch.zeros(len(samples), T, dtype=torch.long)}
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][b, :n], batch["labels"][b, :n] = s["input_ids"], s["labels"]
        batch["attention_mask"][b, :n] = 1
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    batch["pixel_values"] = torch.stack(images) if images else None
    batch["ids"], batch["skipped"] = [s["id"] for s in samples], skipped
    return batch


def supervised_count(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the shifted labels the loss sees


# ---------------------------------------------------------------------------- model and the training step
def prepare_model(model: VipLlava, config: lora.LoraConfig, checkpointing=False, seed=0) -> dict[str, list]:
    """Freeze everything, add LoRA (float32), train the projector in full (in float32 over a bf16 base); returns
    the parameter groups {"lora": [...], "projector": [...]}. CLIP has no trainable weight and takes no gradient
    in, so autograd keeps none of its activations (it runs as under no_grad)."""
    model.requires_grad_(False)
    lora.add_lora(model, config, seed=seed)
    projector = model.multi_modal_projector.float().requires_grad_(True)
    projector.register_forward_pre_hook(lambda m, args: tuple(a.float() for a in args))  # CLIP may be bf16
    model.language_model.checkpointing = checkpointing
    groups = {"lora": [p for n, p in model.named_parameters() if ".lora_" in n],
              "projector": list(projector.parameters())}
    for p in groups["lora"]:
        p.requires_grad_(True)
    return groups


def cosine_schedule(total_steps: int, warmup_steps: int):
    """transformers' get_cosine_schedule_with_warmup: linear from 0 over the warmup, then half a cosine to 0."""
    def factor(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return factor


def to_device(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(model, micro_batches: list[dict], optimizer, scheduler, max_grad_norm=1.0) -> tuple[float, int]:
    """One optimizer step over the accumulated micro-batches. Each loss is its sum of token losses divided by the
    supervised tokens of the whole step, so the gradient is that of the mean over every supervised token, whatever
    the split (k micro-batches of b == one batch of k*b). Returns (that mean loss, the supervised tokens).
    Under DDP the count would be summed over the ranks first."""
    n = sum(supervised_count(b) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        device = model.device
        loss = model(b["input_ids"].to(device), None if b["pixel_values"] is None else b["pixel_values"].to(device),
                     b["attention_mask"].to(device), labels=b["labels"].to(device), num_items_in_batch=max(n, 1)).loss
        loss.backward()
        total += loss.item()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, n


@torch.no_grad()
def evaluate(model, loader) -> float:
    """Mean cross-entropy over every supervised token of `loader`."""
    was_training, total, n = model.training, 0.0, 0
    model.eval()
    for b in loader:
        count = supervised_count(b) if b["ids"] else 0
        if count:
            b = to_device(b, model.device)
            total += model(b["input_ids"], b["pixel_values"], b["attention_mask"], labels=b["labels"],
                           num_items_in_batch=1).loss.item()
            n += count
    model.train(was_training)
    return total / max(n, 1)


# ---------------------------------------------------------------------------- the loop
def loader(dataset, batch_size, pad_id, shuffle, seed, workers=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       num_workers=workers, collate_fn=functools.partial(collate, pad_id=pad_id))


def train(args, model=None, processor=None) -> dict:
    """The whole run; returns {"loss": [...], "eval_loss": [...]}. `model`/`processor` skip the loading."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    processor = processor or VipLlavaProcessor.from_pretrained(args.model)
    model = model or VipLlava.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    config = lora.LoraConfig(args.lora_r, args.lora_alpha, args.lora_dropout)
    groups = prepare_model(model, config, args.checkpointing, args.seed)
    optimizer = torch.optim.AdamW([{"params": groups["lora"], "lr": args.lr},
                                   {"params": groups["projector"], "lr": args.projector_lr}], weight_decay=0.0)
    data = MarkedConversations(read_records(args.data), processor, args.image_folder, args.max_length, args.seed)
    held_out = None
    if args.eval_data:
        held_out = MarkedConversations(read_records(args.eval_data), processor, args.image_folder, args.max_length,
                                       args.seed + 1)
    steps_per_epoch = math.ceil(len(data) / (args.batch_size * args.grad_accum))
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total_steps, math.ceil(total_steps * args.warmup_ratio)))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    log_file = (output / "loss_log.jsonl").open("a")
    history = {"loss": [], "eval_loss": []}

    def record(entry):
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()

    def save(folder):
        lora.save_adapter(model, config, folder, str(args.model))

    def evaluate_held_out(**where):  # the held-out marks stay those of epoch 0: the same test each time
        history["eval_loss"].append(evaluate(model, loader(held_out, args.batch_size, processor.pad_token_id,
                                                           False, 0)))
        record(where | {"eval_loss": history["eval_loss"][-1]})

    if held_out is not None:
        evaluate_held_out(step=0)
    model.train()
    step, bar = 0, tqdm(total=total_steps, disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    for epoch in range(args.epochs):
        data.epoch = epoch
        micro, tokens, t0 = [], 0, time.perf_counter()
        batches = loader(data, args.batch_size, processor.pad_token_id, True, args.seed + epoch, args.workers)
        for i, batch in enumerate(batches):
            for name in batch["skipped"]:
                bar.write(f"{name}: no supervised token left at --max-length {args.max_length}: skipped")
                record({"step": step, "skipped": name, "reason": "no supervised token"})
            if batch["ids"]:
                micro.append(batch)
                tokens += int(batch["attention_mask"].sum())
            if not micro or len(micro) < args.grad_accum and i + 1 < len(batches):
                continue
            lr = scheduler.get_last_lr()[0]
            loss, n = train_step(model, micro, optimizer, scheduler, args.max_grad_norm)
            step, micro = step + 1, []
            seconds = time.perf_counter() - t0
            history["loss"].append(loss)
            record({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "supervised_tokens": n, "tokens": tokens,
                    "tokens_per_s": tokens / seconds})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            bar.update()
            tokens, t0 = 0, time.perf_counter()
            if args.save_every and step % args.save_every == 0:
                save(output / f"checkpoint-{step}")
        if held_out is not None:
            evaluate_held_out(step=step, epoch=epoch)
            bar.write(f"epoch {epoch}: held-out loss {history['eval_loss'][-1]:.4f}")
    bar.close()
    save(output)
    log_file.close()
    return history


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or checkpoint folder of the base model")
    p.add_argument("--data", required=True, help="training records (JSON list or JSON lines)")
    p.add_argument("--image-folder", default=None, help="images are relative to this folder (default: the working one)")
    p.add_argument("--output", required=True, help="adapter folder (PEFT format) and loss_log.jsonl")
    p.add_argument("--eval-data", default=None, help="held-out records: their loss after each epoch")
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument("--lora-alpha", type=float, default=256)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate of the LoRA weights")
    p.add_argument("--projector-lr", type=float, default=2e-5, help="learning rate of the projector (trained in full)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4, help="samples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample, after the image's 576")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="of the base weights (LoRA and the projector train in float32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    p.add_argument("--save-every", type=int, default=0, help="also save the adapter every N steps (0: at the end)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (marks drawn, images preprocessed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    history = train(parse_args())
    print(json.dumps({"final_loss": history["loss"][-1] if history["loss"] else None,
                      "eval_loss": history["eval_loss"]}))
