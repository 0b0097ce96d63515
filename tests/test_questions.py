"""Question files (questions.py): answers through the continuous-batching engine equal single-question generate
(with answers of mixed lengths), error records, resuming after a kill or an interrupt, two torchrun ranks on the
CPU, and --merge; on a tiny checkpoint written here."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli
import engine
import questions
import tiny_checkpoint
from processor import SYSTEM_PROMPT, VipLlavaProcessor, load_image
from visual_prompts import draw_visual_prompt
from vipllava import VipLlava

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "images"
N_NEW = 12
KILL_NEW = 150  # long answers, so that a run takes seconds and a signal lands mid-file
TEXTS = ["What is this?", "Describe the animal in detail, please, with every part of it you can see.",
         "<image>\nWhat colour is the marked region?", "Who?", "Is there anything unusual in the picture at all?",
         "Count the objects.", "What is inside the box?", "Where is the arrow pointing?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny checkpoint and a question file whose images are relative paths (one absolute), with bad lines."""
    folder = tmp_path_factory.mktemp("questions")
    tiny_checkpoint.write_checkpoint(folder / "ckpt", dtype="float32")
    (folder / "img").mkdir()
    for name in ["chelsea.png", "horse.png", "coffee.png", "camera.png"]:
        shutil.copy(IMAGES / name, folder / "img" / name)
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = []
    for i in range(16):
        q = {"question_id": f"q{i}", "image": f"img/{['chelsea', 'horse', 'coffee', 'camera'][i % 4]}.png",
             "text": TEXTS[i % len(TEXTS)]}
        if i % 3 == 1:
            q["visual_prompts"] = [{"shape": "box", "coords": [20 + i, 30, 200, 180], "color": "blue"},
                                   {"shape": "arrow", "coords": "10,10,90,80"}]
        if i == 5:
            q["system"] = "You answer in one word."
        if i == 9:
            q["image"] = str(folder / "img" / "horse.png")  # absolute
        lines.append(json.dumps(q))
    lines[3:3] = ["{not json", ""]  # lines 4 and 5 (the blank one is skipped, not an error)
    lines += [json.dumps({"question_id": "q20", "image": "img/missing.png", "text": "Hi?"}),
              json.dumps({"question_id": "q21", "image": "img/broken.png", "text": "Hi?"}),
              json.dumps({"question_id": "q22", "image": "img/horse.png", "text": "Hi?",
                          "visual_prompts": [{"shape": "hexagon", "coords": [1, 2, 3, 4]}]}),
              json.dumps({"question_id": "q0", "image": "img/horse.png", "text": "Again?"}),
              json.dumps({"image": "img/horse.png", "text": "Whose?"}),
              json.dumps(["a", "list"])]
    (folder / "q.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def status_of(argv) -> int:
    """cli.main's exit status: 1 when a question could not be answered (q.jsonl's bad lines), else 0."""
    try:
        cli.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def answer_file(folder, name, *extra, questions="q.jsonl", n_new=N_NEW, status=1):
    out = folder / name
    out.unlink(missing_ok=True)
    assert status_of(["--model", str(folder / "ckpt"), "--questions", str(folder / questions), "--answers", str(out),
                      "--max-new-tokens", str(n_new), *map(str, extra)]) == status
    return out


@pytest.fixture(scope="module")
def reference(folder):
    """The whole file answered in one process, batch size 8."""
    return answer_file(folder, "reference.jsonl", "--batch-size", 8)


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(*args, **kw):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stderr=subprocess.PIPE, text=True, **kw)


def single_generate(folder, processor, model, q: dict, n_new: int):
    """The reference: one question alone through generate (batch 1, no padding); its new tokens (1, N) and
    prompt length."""
    image = load_image(Path(folder, q["image"]))
    for v in q.get("visual_prompts", []):
        coords = v["coords"] if isinstance(v["coords"], list) else [float(c) for c in v["coords"].split(",")]
        image = draw_visual_prompt(image, v["shape"], coords, v.get("color", "red"))
    content = ([] if "<image>" in q["text"] else [{"type": "image"}]) + [{"type": "text", "text": q["text"]}]
    conversation = [{"role": "system", "content": [{"type": "text", "text": q.get("system", SYSTEM_PROMPT)}]},
                    {"role": "user", "content": content}]
    inputs = processor(processor.apply_chat_template(conversation, add_generation_prompt=True), images=[image])
    new = model.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=n_new, stop_strings=["###"],
                         tokenizer=processor)
    return new, inputs["input_ids"].shape[1]


def test_batched_answers_equal_single_question_generate(folder, reference):
    lines = (folder / "q.jsonl").read_text().splitlines()
    questions = [json.loads(line) for line in lines[:3] + lines[5:18]]  # the good lines
    answers = [r for r in records(reference) if "error" not in r]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]  # input order
    processor = VipLlavaProcessor.from_pretrained(folder / "ckpt")
    model = VipLlava.from_pretrained(folder / "ckpt", verbose=False)
    for q, a in zip(questions, answers):
        new, n_prompt = single_generate(folder, processor, model, q, N_NEW)
        assert a["text"] == processor.decode(new[0], skip_special_tokens=True).strip(), q
        assert a["prompt_tokens"] == n_prompt and a["new_tokens"] == new.shape[1]
        assert a["prompt"] == q["text"] and a["model_id"] == "ckpt" and a["metadata"]["max_new_tokens"] == N_NEW
    assert len({a["text"] for a in answers}) > 3  # the questions really get different answers
    assert len({a["prompt_tokens"] for a in answers}) > 3  # and the slots hold prompts of different lengths


@pytest.fixture(scope="module")
def eight(folder):
    """Eight good questions (four images, marked or not, different texts and a system line), and the model."""
    lines = (folder / "q.jsonl").read_text().splitlines()
    (folder / "eight.jsonl").write_text("\n".join(lines[:3] + lines[5:10]) + "\n")
    questions = [json.loads(line) for line in lines[:3] + lines[5:10]]
    return questions, VipLlavaProcessor.from_pretrained(folder / "ckpt"), VipLlava.from_pretrained(folder / "ckpt",
                                                                                                     verbose=False)


def answer_in_process(folder, model, processor, out, *extra):
    args = cli.parse_args(["--model", str(folder / "ckpt"), "--questions", str(folder / "eight.jsonl"),
                           "--answers", str(out), *map(str, extra)])
    return questions.answer(args, model, processor)


def test_engine_answers_of_mixed_lengths_equal_generate_one_at_a_time(folder, eight, tmp_path, monkeypatch):
    qs, processor, model = eight
    n_new = 24
    # Random weights seldom say </s>: make EOS a token that some greedy answers (not all) say before the end.
    full = [single_generate(folder, processor, model, q, n_new)[0][0].tolist() for q in qs]
    said = {t for row in full for t in set(row[:n_new - 2])}
    eos = max(said, key=lambda t: (2 <= sum(t in row[:n_new - 2] for row in full) <= len(full) - 2, t))
    monkeypatch.setattr(model.generation_config, "eos_token_id", eos)
    out = tmp_path / "a.jsonl"
    assert answer_in_process(folder, model, processor, out, "--batch-size", 3, "--max-new-tokens", n_new) == 0
    answers = records(out)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in qs]
    for q, a in zip(qs, answers):  # the engine is closed: generate has the model's cache again
        new, n_prompt = single_generate(folder, processor, model, q, n_new)
        assert a["text"] == processor.decode(new[0], skip_special_tokens=True).strip(), q
        assert a["prompt_tokens"] == n_prompt and a["new_tokens"] == new.shape[1]
    lengths = [a["new_tokens"] for a in answers]
    assert sum(n < n_new for n in lengths) >= 2 and sum(n == n_new for n in lengths) >= 2, lengths


def test_a_question_that_fails_in_the_engine_is_an_error_record_and_the_others_are_answered(folder, eight, tmp_path,
                                                                                            monkeypatch):
    qs, processor, model = eight
    reference = tmp_path / "reference.jsonl"
    assert answer_in_process(folder, model, processor, reference, "--batch-size", 3, "--max-new-tokens", 6) == 0
    prefill = engine.Engine.prefill_chunk_of

    def failing(self, r):
        if r.question.question_id == "q2":
            raise RuntimeError("out of memory (a test)")
        return prefill(self, r)

    monkeypatch.setattr(engine.Engine, "prefill_chunk_of", failing)
    out = tmp_path / "a.jsonl"
    assert answer_in_process(folder, model, processor, out, "--batch-size", 3, "--max-new-tokens", 6) == 1
    got, expected = records(out), records(reference)
    assert got[2] == {"question_id": "q2", "line": 3, "error": "RuntimeError: out of memory (a test)"}
    assert got[:2] + got[3:] == expected[:2] + expected[3:]


def test_an_interrupted_run_resumes_and_answers_each_question_once(folder, eight, tmp_path, monkeypatch):
    qs, processor, model = eight
    reference = tmp_path / "reference.jsonl"
    assert answer_in_process(folder, model, processor, reference, "--batch-size", 3, "--max-new-tokens", 8) == 0
    write, written = questions.Stopper.write, []

    def interrupted(self, f, record):  # Ctrl-C after the third answer, with requests still in the engine
        write(self, f, record)
        written.append(record)
        if len(written) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "a.jsonl"
    with monkeypatch.context() as m:
        m.setattr(questions.Stopper, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            answer_in_process(folder, model, processor, out, "--batch-size", 3, "--max-new-tokens", 8)
    assert len(records(out)) == 3
    assert model.language_model.model.layers[0].self_attn.kv_cache is None  # the engine was closed: cache freed
    assert answer_in_process(folder, model, processor, out, "--batch-size", 3, "--max-new-tokens", 8) == 0
    assert out.read_text() == reference.read_text()  # each question once, in input order, the same answers


def test_bad_lines_and_images_give_error_records_and_the_run_goes_on(reference):
    errors = {r["line"]: r for r in records(reference) if "error" in r}
    assert sorted(errors) == [4, 19, 20, 21, 22, 23, 24]
    assert "not valid JSON" in errors[4]["error"] and errors[4]["question_id"] is None
    assert "no image file" in errors[19]["error"] and errors[19]["question_id"] == "q20"
    assert "not an image file" in errors[20]["error"] or "damaged" in errors[20]["error"]
    assert "unknown shape 'hexagon'" in errors[21]["error"]
    assert "question_id 'q0' already appears on line 1" in errors[22]["error"]
    assert "no question_id" in errors[23]["error"] and "JSON object" in errors[24]["error"]
    assert sum("error" not in r for r in records(reference)) == 16


def test_killed_run_resumes_and_answers_each_question_exactly_once(folder, tmp_path):
    lines = (folder / "q.jsonl").read_text().splitlines()
    (folder / "long.jsonl").write_text("\n".join(lines[:3] + lines[5:14]) + "\n")  # 12 questions, long answers
    reference = answer_file(folder, "long_reference.jsonl", questions="long.jsonl", n_new=KILL_NEW, status=0)
    out = tmp_path / "a.jsonl"
    cmd = [ROOT / "vipllava.py", "--model", folder / "ckpt", "--questions", folder / "long.jsonl", "--answers", out,
           "--max-new-tokens", KILL_NEW, "--batch-size", 1]
    counts = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # what torchrun/schedulers send, and Ctrl-C
        p = run(*cmd)
        start = len(out.read_text().splitlines()) if out.exists() else 0
        deadline = time.time() + 120
        while (not out.exists() or len(out.read_text().splitlines()) < start + 2) and time.time() < deadline:
            time.sleep(0.02)
        p.send_signal(sig)
        stderr = p.communicate(timeout=60)[1]
        assert p.returncode == 130, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr
        text = out.read_text()
        assert text.endswith("\n")  # no half line
        counts.append(len(records(out)))
    assert 0 < counts[0] < counts[1] < len(records(reference))  # stopped mid-file, and the second run went on
    with open(out, "a") as f:
        f.write('{"question_id": "q1', )  # what a hard kill (SIGKILL) can leave: half a line
    p = run(*cmd)
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert out.read_text() == reference.read_text()  # each question once, in input order, the same answers


def test_two_torchrun_ranks_on_cpu_give_the_same_file_as_one_process(folder, reference, tmp_path):
    out = tmp_path / "a.jsonl"
    p = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", 2, ROOT / "vipllava.py",
            "--model", folder / "ckpt", "--questions", folder / "q.jsonl", "--answers", out, "--device", "cpu",
            "--max-new-tokens", N_NEW, "--batch-size", 3)
    assert p.wait(timeout=240) == 1, p.stderr.read()  # q.jsonl's bad lines: rank 0 exits 1, and so torchrun
    assert out.read_text() == reference.read_text()
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]  # the part files were merged and removed


def test_merge_puts_part_files_in_input_order(folder, reference, tmp_path):
    lines = reference.read_text().splitlines(keepends=True)
    out = tmp_path / "a.jsonl"
    out.write_text("".join(lines[:3]))  # an earlier run's answers
    (tmp_path / "a.jsonl.part0-of-2").write_text("".join(lines[3::2][::-1]) + lines[0] + '{"quest')  # a duplicate, a half line
    (tmp_path / "a.jsonl.part1-of-2").write_text("".join(lines[4::2]))
    assert status_of(["--questions", str(folder / "q.jsonl"), "--answers", str(out), "--merge"]) == 1  # bad lines
    assert out.read_text() == reference.read_text()
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def test_the_run_ends_with_how_many_were_answered_and_exits_1_if_any_was_not(folder, tmp_path):
    lines = (folder / "q.jsonl").read_text().splitlines()
    thin = json.dumps({"question_id": "w0", "image": str(folder / "img" / "horse.png"), "text": "Hi?",
                       "visual_prompts": [{"shape": "box", "coords": [1, 2, 30, 40], "width": 0}]})
    # beside q.jsonl: its images are paths relative to the question file
    (folder / "some_bad.jsonl").write_text("\n".join(lines[:2] + [thin] + lines[-5:]) + "\n")  # 2 good, 6 bad
    (folder / "good.jsonl").write_text("\n".join(lines[:2]) + "\n")
    for name, status, summary in [("some_bad", 1, "8 record(s) in {}: 2 answered, 6 could not be answered"),
                                  ("good", 0, "2 record(s) in {}: 2 answered, 0 could not be answered")]:
        out = tmp_path / f"{name}.answers.jsonl"
        p = run(ROOT / "vipllava.py", "--model", folder / "ckpt", "--questions", folder / f"{name}.jsonl",
                "--answers", out, "--max-new-tokens", 4)
        stderr = p.communicate(timeout=240)[1]
        assert p.returncode == status, stderr
        assert summary.format(out) in stderr.splitlines()[-1] and "Traceback" not in stderr
    (width,) = [r for r in records(tmp_path / "some_bad.answers.jsonl") if r.get("question_id") == "w0"]
    assert "width must be at least 1 pixel, got 0" in width["error"]
    r = subprocess.run([sys.executable, ROOT / "vipllava.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "Exit status 1 when any question could not be answered" in " ".join(r.stdout.split())


@pytest.mark.parametrize("args, message", [
    (["--questions", "q.jsonl"], "--questions and --answers go together"),
    (["--questions", "nowhere.jsonl", "--answers", "a.jsonl"], "no question file nowhere.jsonl"),
    (["--questions", "q.jsonl", "--answers", "a.jsonl", "--prompt", "hi"], "drop --image, --prompt"),
    (["--questions", "q.jsonl", "--answers", "a.jsonl", "--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_flags_fail_with_one_line(folder, capsys, monkeypatch, args, message):
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as e:
        cli.parse_args(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
