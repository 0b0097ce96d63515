"""Answer a whole question file: `python vipllava.py --questions in.jsonl --answers out.jsonl [--batch-size 8]`.

One question per line: {"question_id", "image" (relative to the question file, absolute, or a URL), "text",
optional "visual_prompts": [{"shape", "coords", "color", "width", "alpha"}], optional "system"}. One answer per
line in the shape of the original repo's `llava/eval` scripts, {"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}, plus "prompt_tokens" and "new_tokens"; a line that cannot be answered gets
{"question_id", "line", "error"} instead, and the run goes on.

- Continuous batching: the questions go through engine.py's Engine with --batch-size slots. A question whose
  answer ends (EOS, "###" or --max-new-tokens) frees its slot for the next one at once, so a short answer never
  waits for the longest of a static batch. A background thread loads, marks and preprocesses the images and
  keeps at most 2 x --batch-size questions submitted ahead (memory stays bounded); answers are written as they
  finish. Greedy answers are the same as one question at a time through `generate` (the tests check it); with
  sampling each question draws from its own generator seeded with --seed, whatever else runs beside it.
- Resumable: each answer is appended and flushed as it is made; a rerun skips the question_ids (and the
  error lines) already in the file; a half-written last line (a hard kill) is dropped. Ctrl-C and SIGTERM
  stop between two lines. At the end the file is rewritten in input order.
- Many GPUs: under `torchrun --nproc-per-node N` rank r takes the questions with index % N == r on its own
  device and writes its own part file (`out.jsonl.part{r}-of-{N}`); after a barrier rank 0 merges the
  parts into out.jsonl in input order. `--merge` does that step alone (e.g. parts copied from other nodes).
"""
from __future__ import annotations

import datetime
import json
import os
import queue
import signal
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weights import log

VISUAL_PROMPT_KEYS = {"shape", "coords", "color", "width", "alpha"}


@dataclass
class Question:
    line: int  # 1-based line number in the question file
    question_id: object
    image: str
    text: str
    visual_prompts: list = field(default_factory=list)
    system: str | None = None
    prompt: str = ""  # the chat prompt, filled in by plan
    ids: list = field(default_factory=list)  # its token ids, <image> expanded (processor.encode), by plan


# ---------------------------------------------------------------------------- reading the files
def parse_question(line: int, text: str, folder: Path) -> Question:
    """One line of the question file; a ValueError says what is wrong with it."""
    try:
        q = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(q, dict):
        raise ValueError(f"a question is a JSON object, got {type(q).__name__}")
    missing = [k for k in ("question_id", "image", "text") if k not in q]
    if missing:
        raise ValueError(f"no {', '.join(missing)}: each line needs question_id, image and text")
    qid = q["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise ValueError(f"question_id must be a string or an integer, got {qid!r}")
    for key in ("image", "text") + (("system",) if q.get("system") is not None else ()):
        if not isinstance(q[key], str):
            raise ValueError(f"{key} must be a string, got {q[key]!r}")
    if q["text"].count("<image>") > 1:
        raise ValueError("the text has more than one <image>: a question has one image")
    prompts = q.get("visual_prompts") or []
    if not isinstance(prompts, list) or not all(isinstance(v, dict) and "shape" in v and "coords" in v for v in prompts):
        raise ValueError(f'visual_prompts must be a list of {{"shape", "coords", "color"}} objects, got {prompts!r}')
    for v in prompts:
        if set(v) - VISUAL_PROMPT_KEYS:
            raise ValueError(f"unknown visual prompt key(s) {sorted(set(v) - VISUAL_PROMPT_KEYS)}: "
                             f"use {', '.join(sorted(VISUAL_PROMPT_KEYS))}")
    image = q["image"]
    if not image.startswith(("http://", "https://")):
        image = str(folder / Path(image).expanduser())  # relative to the question file; absolute stays
    return Question(line, qid, image, q["text"], prompts, q.get("system"))


def read_questions(path: Path) -> list:
    """Every non-blank line of the file, in order: a Question, or (line, error message) for a bad line."""
    entries, first_line = [], {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                q = parse_question(n, text, path.parent)
                if q.question_id in first_line:
                    raise ValueError(f"question_id {q.question_id!r} already appears on line {first_line[q.question_id]}")
                first_line[q.question_id] = n
                entries.append(q)
            except ValueError as e:
                entries.append((n, str(e)))
    return entries


def read_records(path: Path, truncate: bool = False) -> list[dict]:
    """The complete JSON lines of an answer file. A last line without its newline (the process was killed
    while writing it) is ignored, and with truncate=True cut off so that appending starts on a fresh line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log(f"{path}: dropping a half-written last line (the run was killed while writing it)")
        if truncate:
            with open(path, "r+b") as f:
                f.truncate(end)
    records = []
    for i, text in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError:
            log(f"{path}, line {i}: not a JSON record, ignored")
    return records


def part_files(answers: Path) -> list[Path]:
    return sorted(answers.parent.glob(answers.name + ".part*-of-*"))


def done_keys(records) -> set:
    """What a rerun skips: answered question_ids, and the line numbers of error records."""
    return {("line", r.get("line")) if "error" in r else ("id", r.get("question_id")) for r in records}


def merge(questions: Path, answers: Path, parts: list[Path]):
    """Rewrite `answers` with its records and those of `parts`, once each, in the order of the question
    file (records of questions no longer in it last), then delete the parts. Atomic: a new file replaces it."""
    entries = read_questions(questions)
    order = {("id", e.question_id) if isinstance(e, Question) else ("line", e[0]): i for i, e in enumerate(entries)}
    order.update({("line", e.line): i for i, e in enumerate(entries) if isinstance(e, Question)})
    records, seen = [], set()
    for r in [r for p in [answers, *parts] for r in read_records(p)]:
        key = ("line", r.get("line")) if "error" in r else ("id", r.get("question_id"))
        if key not in seen:
            seen.add(key)
            records.append((order.get(key, len(order)), len(records), r))
    tmp = answers.with_name(answers.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for *_, r in sorted(records, key=lambda x: x[:2]))
    os.replace(tmp, answers)
    for p in parts:
        p.unlink()
    return len(records)


# ---------------------------------------------------------------------------- ranks
def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment variables; (0, 1, 0) without torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup_ranks(device: str) -> str:
    """Under torchrun: join the process group (nccl on GPUs, gloo on CPUs) and give each rank its own GPU."""
    rank, size, local = world()
    if size == 1:
        return device
    cuda = device in ("auto", "cuda") and torch.cuda.is_available() or device.startswith("cuda")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device == "auto":
        device = "cpu"
    # Ranks that finish early wait at the final barrier for the slowest: give it hours, not the default minutes.
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    return device


def barrier():
    rank, size, local = world()
    if size > 1:
        torch.distributed.barrier(**({"device_ids": [local]} if torch.distributed.get_backend() == "nccl" else {}))


# ---------------------------------------------------------------------------- answering
def plan(entries: list, done: set, processor, args, context: int) -> tuple[list, list]:
    """This rank's questions not in `done`, in file order, each with its prompt and ids; and error records for
    the bad lines among them (and for prompts too long for the model)."""
    from processor import SYSTEM_PROMPT

    rank, size, _ = world()
    todo, errors = [], []
    for i, e in enumerate(entries):
        if i % size != rank:
            continue
        if not isinstance(e, Question):
            if ("line", e[0]) not in done:
                errors.append({"question_id": None, "line": e[0], "error": e[1]})
            continue
        if ("id", e.question_id) in done or ("line", e.line) in done:
            continue
        # The conversation cli.chat builds: the system line, then the image first unless the text places it.
        system = next((s for s in (e.system, args.system, SYSTEM_PROMPT) if s is not None))
        content = ([] if "<image>" in e.text else [{"type": "image"}]) + [{"type": "text", "text": e.text}]
        conversation = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        e.prompt = processor.apply_chat_template(conversation + [{"role": "user", "content": content}],
                                                 add_generation_prompt=True, template=args.template)
        e.ids = processor.encode(e.prompt)  # each <image> expanded, as the processor tokenizes it
        if len(e.ids) + args.max_new_tokens > context:
            errors.append(error_record(e, f"the prompt has {len(e.ids)} tokens; with --max-new-tokens "
                                          f"{args.max_new_tokens} that is more than the model's context of {context}"))
            continue
        todo.append(e)
    return todo, errors


def error_record(q: Question, message: str) -> dict:
    return {"question_id": q.question_id, "line": q.line, "error": message}


def load_marked(q: Question):
    """The question's image with its visual prompts drawn on it."""
    from processor import load_image
    from visual_prompts import draw_visual_prompt, parse_coords

    image = load_image(q.image)
    for v in q.visual_prompts:
        coords = parse_coords(v["coords"], v["shape"]) if isinstance(v["coords"], str) else v["coords"]
        if not isinstance(coords, list) or not all(isinstance(c, (int, float)) for c in coords):
            raise ValueError(f"visual prompt coords must be a list of numbers or 'x1,y1,...', got {v['coords']!r}")
        image = draw_visual_prompt(image, v["shape"], coords, v.get("color", "red"), v.get("width"), v.get("alpha"))
    return image


class Finished(threading.Event):
    """A request's `done` event that also puts the request on a queue when set (by the engine's thread), so
    that the main thread writes each answer the moment it is complete, in whatever order they finish."""

    def __init__(self, finished: queue.Queue):
        super().__init__()
        self.finished, self.request = finished, None

    def set(self):
        super().set()
        self.finished.put(self.request)


def feed(todo: list, processor, engine, settings: dict, image_mode: str, room: threading.Semaphore,
         stop: threading.Event, finished: queue.Queue):
    """Background thread: load, mark and preprocess each question's image and submit it to the engine, at most
    `room` ahead of the answers written. A question whose image fails goes on `finished` as (question, error
    message); an exception of this thread goes there too, for the main thread to raise."""
    from engine import Request

    try:
        for q in todo:
            while not room.acquire(timeout=0.1):  # the main thread releases one per answer written
                if stop.is_set():
                    return
            if stop.is_set():
                return
            try:
                image = load_marked(q)
            except (OSError, ValueError, TypeError) as e:
                finished.put((q, f"image {q.image}: {e}"))
                continue
            pixel_values = processor.image_processor([image], image_mode)["pixel_values"]  # (1, 3, H, W)
            done = Finished(finished)
            request = done.request = Request(q.ids, pixel_values, done=done, **settings)
            request.question = q
            try:
                engine.submit(request)
            except ValueError as e:  # plan checked the length: not expected, but one question's fault
                finished.put((q, str(e)))
    except BaseException as e:  # handed to the main thread, which raises it
        finished.put(e)


class Stopper:
    """SIGINT (Ctrl-C) and SIGTERM (what torchrun and job schedulers send) raise KeyboardInterrupt, but never
    while a line is being written: then the line is finished first."""

    def __init__(self):
        self.writing = self.pending = False

    def __call__(self, signum, frame):
        if self.writing:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def write(self, f, record: dict):
        self.writing = True
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()  # on disk (in the kernel) now: a killed process loses nothing written
        self.writing = False
        if self.pending:
            raise KeyboardInterrupt


def answer(args, model, processor):
    """Answer this rank's share of args.questions into args.answers (or its part file); rank 0 merges."""
    from huggingface_hub.utils import tqdm

    from engine import Engine

    rank, size, _ = world()
    answers = Path(args.answers)
    entries = read_questions(Path(args.questions))
    out_path = answers if size == 1 else answers.with_name(f"{answers.name}.part{rank}-of-{size}")
    read_records(out_path, truncate=True)  # a half line from a killed run is cut before we append
    done = set().union(*(done_keys(read_records(p)) for p in [answers, *part_files(answers)]))
    todo, errors = plan(entries, done, processor, args, model.config.text_config.max_position_embeddings)
    model_id = Path(args.model).name if Path(args.model).is_dir() else args.model
    settings = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "template",
                                              "image_mode")} | {"dtype": str(model.dtype).removeprefix("torch.")}
    sampling = {k: settings[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")} | {
        "stop_strings": ["###"] if args.template == "vipllava" else []}
    n_todo = len(todo) + len(errors)
    if rank == 0:
        log(f"{n_todo} question(s) to answer" + (f" on this rank of {size}" if size > 1 else "")
            + f", up to {args.batch_size} at once")
    bar = tqdm(total=n_todo, unit="q", desc="questions", disable=rank != 0 or None, dynamic_ncols=True)
    stopper = Stopper()
    previous = {s: signal.signal(s, stopper) for s in (signal.SIGINT, signal.SIGTERM)}
    engine = thread = None
    stop, finished = threading.Event(), queue.Queue()
    room = threading.Semaphore(2 * args.batch_size)  # questions submitted but not yet written
    with open(out_path, "a", encoding="utf-8") as out:
        def write(record):
            stopper.write(out, record)

        try:
            for r in errors:
                write(r)
            bar.update(len(errors))
            if todo:
                # Cache rows only as long as this file needs (the model's context would be 2 GB a row on the 7B).
                context = max(len(q.ids) for q in todo) + args.max_new_tokens
                engine = Engine(model, processor, max_slots=args.batch_size, max_queue=2 * args.batch_size + 1,
                                context=context)
                thread = threading.Thread(target=feed, args=(todo, processor, engine, sampling, args.image_mode,
                                                             room, stop, finished), daemon=True)
                thread.start()
            for _ in todo:
                item = finished.get()  # a finished request, (question, error message) or the feeder's exception
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):
                    write(error_record(*item))
                elif item.error is not None:  # this question failed in the engine; the others go on
                    write(error_record(item.question, f"{type(item.error).__name__}: {item.error}"))
                else:
                    q = item.question
                    write({"question_id": q.question_id, "prompt": q.text, "text": item.text.strip(),
                           "prompt_tokens": len(q.ids), "new_tokens": len(item.tokens),
                           "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}|{q.question_id}").hex,
                           "model_id": model_id, "metadata": settings})
                room.release()
                bar.update(1)
        except KeyboardInterrupt:
            bar.close()
            log(f"interrupted: {out_path} holds every answer made so far; run the same command again to go on")
            raise
        finally:
            stop.set()
            if thread is not None and thread.is_alive():  # let it finish its image: a thread killed inside torch aborts
                thread.join()
            if engine is not None:
                engine.close()  # fails what is still in it (Cancelled, not written) and frees the cache
            for s, handler in previous.items():
                signal.signal(s, handler)
    bar.close()
    barrier()
    return finish(Path(args.questions), answers, size) if rank == 0 else 0


def finish(questions: Path, answers: Path, size: int) -> int:
    """Rank 0, after the barrier: merge the part files (if all ranks' are here) and order by input.
    The number of questions that could not be answered (error records), for the exit status."""
    parts = part_files(answers)
    missing = [r for r in range(size) if size > 1 and not (answers.parent / f"{answers.name}.part{r}-of-{size}").is_file()]
    if missing:
        log(f"the part files of rank(s) {missing} are not in {answers.parent} (nodes without a shared filesystem?): "
            f"copy them there and run the same command with --merge")
        return 0
    merge(questions, answers, parts)
    records = read_records(answers)
    n_errors = sum("error" in r for r in records)
    log(f"{len(records)} record(s) in {answers}: {len(records) - n_errors} answered, {n_errors} could not be answered"
        + (' (their "error" says why; exit status 1)' if n_errors else ""))
    return n_errors
