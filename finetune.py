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
import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

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
    enc = processor.tokenizer.backend_tokenizer.encode(text)  # the raw tokenizer: ids and character offsets
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

    Under DistributedDataParallel (`model` wrapped, torchrun) or FSDP2 (`fully_shard`): the count is summed over
    the ranks (all_reduce) and each loss divided by count / world, since both average the ranks' gradients; the
    gradients are synchronised only in the last micro-batch's backward (no_sync / set_requires_gradient_sync
    before). A micro-batch left empty (its samples had no supervised token) is skipped alone, and runs as one
    padding token with no label over several ranks, whose collectives need every rank's forward and backward."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    fsdp = isinstance(model, FSDPModule)
    world = dist.get_world_size() if ddp or fsdp else 1
    device = model.module.device if ddp else model.device
    n = sum(supervised_count(b) for b in micro_batches if b["ids"])
    if world > 1:
        count = torch.tensor(n, dtype=torch.float64, device=device)
        dist.all_reduce(count)
        n = int(count.item())
    total = 0.0
    for i, b in enumerate(micro_batches):
        if not b["ids"]:
            if world == 1:
                continue
            b = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.full((1, 1), IGNORE_INDEX),
                 "attention_mask": torch.ones(1, 1, dtype=torch.long), "pixel_values": None}
        sync = i == len(micro_batches) - 1
        if fsdp:
            model.set_requires_gradient_sync(sync)
        with model.no_sync() if ddp and not sync else contextlib.nullcontext():
            loss = model(b["input_ids"].to(device), None if b["pixel_values"] is None else b["pixel_values"].to(device),
                         b["attention_mask"].to(device), labels=b["labels"].to(device),
                         num_items_in_batch=max(n, 1) / world).loss
            loss.backward()
        total += loss.item() / world
    if world > 1:  # the mean over every rank's tokens, for the log
        total_t = torch.tensor(total, dtype=torch.float64, device=device)
        dist.all_reduce(total_t)
        total = total_t.item()
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
def loader(dataset, batch_size, pad_id, shuffle, seed, workers=0, rank=0, world=1, skip=0):
    """Batches in the order of torch.randperm seeded with `seed` (DistributedSampler's). With `world` processes
    each takes every world-th sample of that order, so each rank holds its share of every global batch (the last
    one padded with repeats so the ranks step together). `skip`: batches already trained (a resumed run)."""
    order = list(torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=shuffle, seed=seed))
    g = torch.Generator().manual_seed(seed)  # the workers' seeds: never drawn from the global generator
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order[skip * batch_size:], generator=g,
                                       num_workers=workers, collate_fn=functools.partial(collate, pad_id=pad_id))


# ---------------------------------------------------------------------------- many processes, resumable runs
def start_distributed(args) -> tuple[int, int, str]:
    """(rank, world size, device). Under torchrun (RANK in the environment): one process per GPU (NCCL), or
    gloo on CPUs; alone: (0, 1, args.device)."""
    if "RANK" not in os.environ:
        return 0, 1, args.device
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else ("cpu" if args.device == "auto" else args.device)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(model) -> dict[str, list]:
    """FSDP2 over a LoRA'd model: each decoder layer (its frozen base and its LoRA: FSDP wants one dtype among the
    trainable weights only), then the rest (embeddings, CLIP, the projector, lm_head) as the root: every rank
    gathers the projector even when its batch has no image. An int8/int4 base's weights are buffers: they stay
    whole on each rank. Returns the parameter groups anew: the sharded parameters replace the model's."""
    for layer in model.language_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return {"lora": [p for n, p in model.named_parameters() if ".lora_" in n],
            "projector": list(model.multi_modal_projector.parameters())}


def micro_batch_size(batch_size: int, grad_accum: int, world: int) -> int:
    """--batch-size is the global batch (samples per optimizer step): each of the `world` processes runs
    `grad_accum` micro-batches of batch_size / (world * grad_accum) samples."""
    micro, rest = divmod(batch_size, world * grad_accum)
    if rest or not micro:
        raise ValueError(f"--batch-size {batch_size} (samples per optimizer step) does not split into {world} "
                         f"process(es) x --grad-accum {grad_accum} micro-batches: make it a multiple of "
                         f"{world * grad_accum}")
    return micro


SAME_RUN = ("model", "data", "lora_r", "lora_alpha", "lora_dropout", "lr", "projector_lr", "epochs", "batch_size",
            "max_length", "warmup_ratio", "seed", "quantize", "group_size")  # what a resumed run may not change


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(folder: Path, model, config, optimizer, scheduler, position: dict, args, world: int):
    """A resumable checkpoint: the adapter (PEFT's files: LoRA and the projector), optimizer and scheduler state,
    every rank's RNG states and the data position, written into `folder`.tmp and renamed: a folder that exists is
    complete. Every rank calls it (the RNG states are gathered); rank 0 writes."""
    states = [rng_states()]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, rng_states())
    # whole tensors under FSDP too (gathered on every rank), keyed by parameter name: any world size resumes it
    adapter = lora.adapter_state_dict(model, config)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                          cpu_offload=True))
    if world == 1 or dist.get_rank() == 0:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lora.save_adapter(model, config, tmp, str(args.model), adapter)
        settings = {k: str(getattr(args, k)) for k in SAME_RUN}
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": states,
                    "world": world, "settings": settings, **position}, tmp / "training_state.pt")
        if folder.exists():  # a step saved again (a rerun after a kill): the old one goes only once the new is in
            folder.rename(folder.with_name(folder.name + ".old"))
        tmp.rename(folder)
        shutil.rmtree(folder.with_name(folder.name + ".old"), ignore_errors=True)
    if world > 1:
        dist.barrier()


def last_checkpoint(output: Path) -> Path | None:
    """The checkpoint-N folder with the largest N that holds a training state (.tmp ones are unfinished)."""
    found = [(int(f.name.split("-")[1]), f) for f in output.glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", f.name) and (f / "training_state.pt").is_file()]
    return max(found)[1] if found else None


def read_checkpoint(folder: Path, model, config, args) -> dict:
    """The training state of a checkpoint (refused if its settings differ); the adapter loaded into `model`
    (before FSDP shards it)."""
    state = torch.load(folder / "training_state.pt", weights_only=True)
    changed = {k: (v, str(getattr(args, k))) for k, v in state["settings"].items() if str(getattr(args, k)) != v}
    if changed:
        said = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items())
        raise ValueError(f"{folder} was saved by a run with other settings ({said}): run with the same ones, or "
                         f"into another --output")
    lora.load_adapter_weights(model, config, folder / "adapter_model.safetensors")
    return state


def load_checkpoint(state: dict, model, optimizer, scheduler, args, rank: int, world: int) -> dict:
    """Restore the optimizer, scheduler and RNG states; returns the data position {"step", "epoch",
    "steps_in_epoch"}."""
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if state["world"] == world:
        set_rng_states(state["rng"][rank])
    else:  # the data order is the same at any world size; dropout's draws cannot be
        torch.manual_seed(args.seed + rank + state["step"])
    return {k: state[k] for k in ("step", "epoch", "steps_in_epoch")}


class StopSignals:
    """SIGTERM/SIGINT during the run set `.signal` (the loop then saves and stops); a second one stops at once."""

    def __init__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def stop_now(self, world: int, device) -> bool:
        """Whether any rank got a signal (every rank must stop at the same step)."""
        if world == 1:
            return self.signal is not None
        flag = torch.tensor(0 if self.signal is None else self.signal, device=device)
        dist.all_reduce(flag, dist.ReduceOp.MAX)
        self.signal = int(flag) or None
        return self.signal is not None

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(args, model=None, processor=None) -> dict:
    """The whole run; returns {"loss": [...], "eval_loss": [...], "stopped": signal number or None}.
    `model`/`processor` skip the loading. Under torchrun: one process per rank, DDP; logs and files from rank 0.
    A checkpoint in --output (--save-every, or a SIGTERM/SIGINT) is resumed from."""
    from tqdm import tqdm

    rank, world, device = start_distributed(args)
    micro_size = micro_batch_size(args.batch_size, args.grad_accum, world)
    torch.manual_seed(args.seed)
    processor = processor or VipLlavaProcessor.from_pretrained(args.model)
    model = model or VipLlava.from_pretrained(args.model, dtype=args.dtype, device=device, quantize=args.quantize,
                                              group_size=args.group_size, verbose=rank == 0)
    config = lora.LoraConfig(args.lora_r, args.lora_alpha, args.lora_dropout)
    groups = prepare_model(model, config, args.checkpointing, args.seed)
    torch.manual_seed(args.seed + rank)  # dropout: each rank its own draws
    output = Path(args.output)
    resume = Path(args.resume) if args.resume else last_checkpoint(output)
    checkpoint = None if resume is None else read_checkpoint(resume, model, config, args)
    trained = model  # what the step runs: DDP over it with several processes; the model itself is what is saved
    if args.fsdp:
        groups = shard(model)
    elif world > 1:  # every rank loaded the same base and drew the same LoRA: no start-up broadcast of the weights
        trained = torch.nn.parallel.DistributedDataParallel(  # the base's weights are buffers: never broadcast
            model, init_sync=False, forward_sync_buffers=False, find_unused_parameters=True)  # text-only batches
    optimizer = torch.optim.AdamW([{"params": groups["lora"], "lr": args.lr},
                                   {"params": groups["projector"], "lr": args.projector_lr}], weight_decay=0.0)
    data = MarkedConversations(read_records(args.data), processor, args.image_folder, args.max_length, args.seed)
    held_out = None
    if args.eval_data:
        held_out = MarkedConversations(read_records(args.eval_data), processor, args.image_folder, args.max_length,
                                       args.seed + 1)
    steps_per_epoch = math.ceil(math.ceil(len(data) / world) / micro_size / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(total_steps, math.ceil(total_steps * args.warmup_ratio)))
    output.mkdir(parents=True, exist_ok=True)
    log_file = (output / "loss_log.jsonl").open("a") if rank == 0 else open(os.devnull, "w")
    history = {"loss": [], "eval_loss": [], "stopped": None}

    def record(entry):
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()

    def save(folder):
        adapter = lora.adapter_state_dict(model, config)  # on every rank: FSDP gathers the shards
        if rank == 0:
            lora.save_adapter(model, config, folder, str(args.model), adapter)

    position = {"step": 0, "epoch": 0, "steps_in_epoch": 0}
    if checkpoint is not None:
        position = load_checkpoint(checkpoint, model, optimizer, scheduler, args, rank, world)
        if rank == 0:
            print(f"resuming from {resume} (step {position['step']})", file=sys.stderr)
            log_file.close()  # what was logged after the checkpoint (a SIGKILL) is done again: drop it
            log = output / "loss_log.jsonl"
            kept = [line for line in log.read_text().splitlines() if line.strip() and (
                json.loads(line)["step"] < position["step"] or
                json.loads(line)["step"] == position["step"] and "loss" in json.loads(line))]
            log.write_text("".join(line + "\n" for line in kept))
            log_file = log.open("a")
    def evaluate_held_out(**where):  # the held-out marks stay those of epoch 0: the same test each time
        history["eval_loss"].append(evaluate(model, loader(held_out, micro_size, processor.pad_token_id,
                                                           False, 0)))
        record(where | {"eval_loss": history["eval_loss"][-1]})

    if held_out is not None and resume is None:
        evaluate_held_out(step=0)
    model.train()
    signals = StopSignals()
    step, bar = position["step"], tqdm(total=total_steps, initial=position["step"], file=sys.stderr,
                                        disable=args.quiet or rank != 0, dynamic_ncols=True)
    for epoch in range(position["epoch"], args.epochs):
        data.epoch = epoch
        micro, tokens, t0 = [], 0, time.perf_counter()
        done = position["steps_in_epoch"] if epoch == position["epoch"] else 0  # optimizer steps already taken
        batches = loader(data, micro_size, processor.pad_token_id, True, args.seed + epoch, args.workers, rank, world,
                         skip=done * args.grad_accum)
        for i, batch in enumerate(batches):
            for name in batch["skipped"]:
                bar.write(f"{name}: no supervised token left at --max-length {args.max_length}: skipped")
                record({"step": step, "skipped": name, "reason": "no supervised token"})
            micro.append(batch)  # even empty: a step is always grad_accum micro-batches, on every rank
            tokens += int(batch["attention_mask"].sum())
            if len(micro) < args.grad_accum and i + 1 < len(batches):
                continue
            lr = scheduler.get_last_lr()[0]
            loss, n = train_step(trained, micro, optimizer, scheduler, args.max_grad_norm)
            step, micro, done = step + 1, [], done + 1
            seconds = time.perf_counter() - t0
            history["loss"].append(loss)
            record({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "supervised_tokens": n, "tokens": tokens,
                    "tokens_per_s": tokens / seconds})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            bar.update()
            tokens, t0 = 0, time.perf_counter()
            stop = signals.stop_now(world, model.device)
            if stop or args.save_every and step % args.save_every == 0:
                save_checkpoint(output / f"checkpoint-{step}", model, config, optimizer, scheduler,
                                {"step": step, "epoch": epoch, "steps_in_epoch": done}, args, world)
            if stop:
                history["stopped"] = signals.signal
                if rank == 0:
                    print(f"{signal.Signals(signals.signal).name}: saved {output / f'checkpoint-{step}'}; run the same "
                          f"command again to continue", file=sys.stderr)
                break
        if history["stopped"]:
            break
        if held_out is not None:
            evaluate_held_out(step=step, epoch=epoch)
            bar.write(f"epoch {epoch}: held-out loss {history['eval_loss'][-1]:.4f}")
    bar.close()
    signals.restore()
    if not history["stopped"]:
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
    p.add_argument("--batch-size", type=int, default=4, help="samples per optimizer step (the global batch, over all "
                   "processes): each process runs --grad-accum micro-batches of batch-size / (processes x grad-accum)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step, in each process")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per sample, after the image's 576")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="of the base weights (LoRA and the projector train in float32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per decoder layer")
    p.add_argument("--save-every", type=int, default=0, help="also save a resumable checkpoint (adapter, optimizer, "
                   "data position) every N steps in OUTPUT/checkpoint-N (0: only at the end, or on SIGTERM/SIGINT)")
    p.add_argument("--resume", default=None, help="a checkpoint folder to continue from (default: the last "
                   "OUTPUT/checkpoint-N, if any: re-running the same command continues)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="QLoRA: the base's language model in int8/int4 (frozen), LoRA and the projector in float32")
    p.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (default 128)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the base, LoRA and the projector over "
                   "the processes (FSDP2 fully_shard) instead of a whole copy on each (DDP)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (marks drawn, images preprocessed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        history = train(parse_args())
    except ValueError as e:  # bad settings or data: the message says what to do
        sys.exit(f"finetune.py: {e}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"final_loss": history["loss"][-1] if history["loss"] else None,
                          "eval_loss": history["eval_loss"]}))
    if dist.is_initialized():
        dist.destroy_process_group()
    if history["stopped"]:
        sys.exit(128 + history["stopped"])
