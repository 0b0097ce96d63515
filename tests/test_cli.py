"""The command line, end to end in subprocesses, on a checkpoint written here in the official format."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_checkpoint
from processor import VipLlavaProcessor, load_image
from vipllava import VipLlava

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "tests" / "images" / "chelsea.png"  # 451x300
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # several shards, like the real checkpoint
    return tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("cli"), max_shard_bytes=200_000, dtype="float32")


def run(*args, stdin="", env=None):
    return subprocess.run([sys.executable, str(ROOT / "vipllava.py"), *map(str, args)], input=stdin, text=True,
                          capture_output=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def answer(checkpoint, conversation, image, n):
    """What the library gives for the same question, without streaming."""
    processor = VipLlavaProcessor.from_pretrained(checkpoint)
    model = VipLlava.from_pretrained(checkpoint, verbose=False)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(prompt, images=[image])
    new = model.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=n, stop_strings=["###"],
                         tokenizer=processor)
    return processor.decode(new[0], skip_special_tokens=True)


def user(text, image=True):
    return {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}


def test_streamed_answer_equals_the_library_answer_and_box_is_drawn(checkpoint, tmp_path):
    marked = tmp_path / "marked.png"
    r = run("--model", checkpoint, "--image", CAT, "--prompt", "What is in the box?", "--box", "100,50,300,250",
            "--max-new-tokens", 24, "--save-annotated", marked)
    assert r.returncode == 0, r.stderr
    assert "loading weights" in r.stderr and "Traceback" not in r.stderr  # progress on stderr
    image = load_image(marked)
    from visual_prompts import draw_visual_prompt
    expected = answer(checkpoint, [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                                   user("What is in the box?")],
                      draw_visual_prompt(load_image(CAT), "box", [100, 50, 300, 250]), 24)
    assert expected and r.stdout == expected + "\n"

    before, after = np.asarray(load_image(CAT).convert("RGB")), np.asarray(image)
    assert after.shape == before.shape
    changed = (before != after).any(-1)
    edge = np.zeros_like(changed)
    edge[50:251, 100:301] = True
    w = round(4 * 451 / 336)  # default box width: 4 px at 336, scaled by max(W, H) / 336 -> 5 px here
    edge[50 + w:251 - w, 100 + w:301 - w] = False
    assert (after[edge] == [255, 0, 0]).all()  # the marker is pure red where drawn
    assert not changed[~edge].any()  # and nothing else changed


def test_colors_apply_to_the_shapes_after_them(checkpoint, tmp_path):
    marked = tmp_path / "m.png"
    r = run("--model", checkpoint, "--image", CAT, "--prompt", "?", "--max-new-tokens", 1, "--save-annotated", marked,
            "--point", "20,20", "--color", "blue", "--point", "200,150", "--color", "0,255,0", "--point", "400,250")
    assert r.returncode == 0, r.stderr
    out = np.asarray(load_image(marked))
    assert tuple(out[150, 200]) == (0, 0, 255) and tuple(out[250, 400]) == (0, 255, 0)
    assert tuple(out[20, 20]) == (0, 255, 0)  # before any --color: the last one given


def test_chat_two_turns_through_stdin(checkpoint):
    r = run("--model", checkpoint, "--image", CAT, "--prompt", "What is this?", "--chat", "--max-new-tokens", 8,
            stdin="And the colour?\n\n")
    assert r.returncode == 0, r.stderr
    first = answer(checkpoint, [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, user("What is this?")],
                   load_image(CAT), 8)
    history = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, user("What is this?"),
               {"role": "assistant", "content": [{"type": "text", "text": first.strip()}]},
               user("And the colour?", image=False)]
    second = answer(checkpoint, history, load_image(CAT), 8)
    assert r.stdout == f"{first}\n{second}\n"
    assert r.stderr.count("you> ") == 2  # asked twice; the empty line ended the session


@pytest.mark.parametrize("args,message", [
    (["--image", "nope.png"], "no image file nope.png"),
    (["--image", "README.md"], "not an image file"),
    (["--image", "tests"], "tests is a folder, not an image file: give the path of one image in it"),
    (["--image", CAT, "--box", "1,2,30,40", "--width", "0"], "argument --width: must be at least 1 pixel, got 0"),
    (["--image", CAT, "--box", "1,2,30,40", "--width", "-3"], "argument --width: must be at least 1 pixel, got -3"),
    (["--image", CAT, "--quantize", "int4", "--group-size", "128"],
     "int4 group size 128 does not divide a layer width of 64: use group size 64 (--group-size 64"),
    (["--image", CAT, "--box", "1,2,3"], "expects x1,y1,x2,y2"),
    (["--image", CAT, "--box", "a,b,c,d"], "expects x1,y1,x2,y2"),
    (["--image", CAT, "--point", "600,20"], "outside the 451x300 image"),
    (["--image", CAT, "--box", "1,2,30,40", "--color", "mauve"], "red, lime, blue"),
    (["--image", CAT, "--device", "cuda"], "CUDA is not available"),
    (["--image", CAT, "--device", "tpu"], "unknown device"),
    (["--image", CAT, "--max-new-tokens", "0"], "must be at least 1"),
    (["--image", CAT, "--template", "alpaca"], "invalid choice: 'alpaca'"),
    (["--image", CAT, "--dtype", "float8"], "invalid choice: 'float8'"),
    (["--image", CAT, "--device", "cuda:1"], "device 'cuda:1' was asked for"),
    (["--image", ""], "--image is empty"),
    (["--image", CAT, "--box", "-5,75,100,155"], "outside the 451x300 image"),  # a value, not a flag
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "1", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--top-k", "-3"], "--top-k must be an integer >= 0"),
    (["--image", CAT, "--prompt", "<image>\nWhat is it?"], "--prompt contains <image>, which is reserved: the image is placed"),
    (["--prompt", "<image> What?"], "--prompt contains <image>, which is reserved"),  # without --image too
    (["--image", CAT, "--system", "Look: <image>"], "--system contains <image>, which is reserved"),
    (["--image", CAT, "--save-annotated", "no-such-folder/m.png"], "--save-annotated: folder no-such-folder does not exist"),
    (["--image", "nope.png", "--save-annotated", "no-such-folder/m.png"], "--save-annotated: folder"),  # before the image
    (["--image", CAT, "--save-annotated", "tests"], "--save-annotated: tests is a folder"),
    (["--image", CAT, "--save-annotated", "marked.xyz"], "cannot tell an image format from 'marked.xyz'"),
    (["--save-annotated", "marked.png"], "--save-annotated needs --image"),
])
def test_bad_input_is_one_line_and_status_2(checkpoint, args, message):
    r = run("--model", checkpoint, "--prompt", "What is it?", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""


def test_int4_on_the_tiny_checkpoint_takes_the_largest_group_size_that_fits_and_says_so(checkpoint):
    # 128, the default, does not divide the tiny model's width of 64: 64 does, and stderr says so
    r = run("--model", checkpoint, "--image", CAT, "--prompt", "What is it?", "--quantize", "int4",
            "--max-new-tokens", 4)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert "int4: group size 64, the largest that divides this model's layer widths" in r.stderr


def test_save_annotated_where_nothing_may_be_written_is_refused_before_loading(monkeypatch, capsys, tmp_path):
    import cli  # in this process: a root user may write anywhere, so the permission check is stubbed

    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--image", str(CAT), "--prompt", "?", "--save-annotated", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--save-annotated: {tmp_path / 'm.png'} cannot be written here (no permission)" in err


def test_offline_without_a_cached_model_says_how_to_use_a_local_folder(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = run("--image", CAT, "--prompt", "What is it?", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--model /path/to/folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "`hf download llava-hf/vip-llava-7b-hf`" in r.stderr and "`python tiny_checkpoint.py tiny`" in r.stderr


def test_crop_mode_warns_about_a_marker_it_cuts_away(checkpoint):
    r = run("--model", checkpoint, "--image", CAT, "--prompt", "?", "--box", "5,100,60,200", "--image-mode", "crop",
            "--max-new-tokens", 1)
    assert r.returncode == 0 and "outside the square that --image-mode crop keeps" in r.stderr


def test_help_shows_the_defaults():
    r = run("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert "(default: 256)" in text and "(default: pad)" in text and "(default: vipllava)" in text


def test_image_over_the_pixel_limit_is_one_line_and_status_2(checkpoint, tmp_path):
    from test_processor import png_claiming

    (tmp_path / "huge.png").write_bytes(png_claiming(13000, 12000))  # only the header: nothing big is written
    r = run("--model", checkpoint, "--image", tmp_path / "huge.png", "--prompt", "?")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "huge.png is 13000x12000 = 156,000,000 pixels, more than the limit of 150,000,000" in r.stderr


def test_a_108_megapixel_photo_gets_one_note_and_its_marks_in_full_size_pixels(checkpoint, tmp_path):
    Image.new("RGB", (12000, 9000), (40, 40, 200)).save(tmp_path / "phone.png", compress_level=1)
    r = run("--model", checkpoint, "--image", tmp_path / "phone.png", "--prompt", "?", "--box", "6000,3000,9000,6000",
            "--max-new-tokens", 1, "--save-annotated", tmp_path / "marked.png")
    assert r.returncode == 0, r.stderr
    assert "DecompressionBomb" not in r.stderr and "Warning" not in r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: the image is 12000x9000, over 4096 px on a side: the model gets it reduced 3x, "
                     "to 4000x3000, after the marks are drawn at full size"]
    marked = load_image(tmp_path / "marked.png")  # saved at full size, the box where the user put it
    assert marked.size == (12000, 9000) and marked.getpixel((6010, 4500)) == (255, 0, 0)
    assert marked.getpixel((5990, 4500)) == (40, 40, 200) and marked.getpixel((7500, 4500)) == (40, 40, 200)
