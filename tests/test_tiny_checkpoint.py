"""`python tiny_checkpoint.py FOLDER`, in subprocesses: what it writes, and where it refuses to write."""
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import tiny_checkpoint
from vipllava import VipLlava

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "tiny_checkpoint.py"), *map(str, args)], text=True,
                          capture_output=True, cwd=ROOT, timeout=300)


def refused(r, message):
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    return True


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "FOLDER" in r.stdout and "--force" in r.stdout and "gibberish" in r.stdout
    assert "--dtype {float32,float16,bfloat16}" in r.stdout and "--seed" in r.stdout


def test_writes_a_checkpoint_that_loads_and_says_it_is_random(tmp_path):
    folder = tmp_path / "new" / "tiny"  # missing parents are created
    r = run(folder)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{folder}\n"  # the folder alone on stdout, for scripts
    assert len(r.stderr.strip().splitlines()) == 1 and "random" in r.stderr and "gibberish" in r.stderr
    assert f"python vipllava.py --model {folder}" in r.stderr
    VipLlava.from_pretrained(folder, verbose=False)
    assert {str(t.dtype) for t in load_file(folder / "model.safetensors").values()} == {"torch.float32"}  # the default


def test_dtype_and_seed(tmp_path):
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert run(tmp_path / "empty", "--dtype", "bfloat16", "--seed", "1").returncode == 0
    assert run(tmp_path / "again", "--dtype", "bfloat16", "--seed", "1").returncode == 0
    a, b = load_file(tmp_path / "empty" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert {str(t.dtype) for t in a.values()} == {"torch.bfloat16"}
    assert all(a[k].equal(b[k]) for k in a)  # the same seed, the same weights
    default = load_file(tiny_checkpoint.write_checkpoint(tmp_path / "seed0", dtype="bfloat16") / "model.safetensors")
    assert not all(a[k].equal(default[k]) for k in a)  # seed 1 is not seed 0


def test_refuses_a_file_and_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    assert refused(run(tmp_path / "notes.txt"), "notes.txt is a file: give a folder")
    assert refused(run(tmp_path), "is not empty and holds no VipLlava checkpoint: choose a new or empty folder")
    assert refused(run(tmp_path, "--force"), "holds no VipLlava checkpoint")  # --force is only for checkpoints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "keep me"


def test_replaces_a_checkpoint_only_with_force(tmp_path):
    tiny_checkpoint.write_checkpoint(tmp_path, dtype="float32", max_shard_bytes=200_000)  # sharded, with an index
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    assert refused(run(tmp_path), "already holds a VipLlava checkpoint (not this command's with these settings): "
                                  "use it as it is, or pass --force")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards  # untouched
    assert run(tmp_path, "--force", "--seed", "3").returncode == 0
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]  # old shards gone
    assert not (tmp_path / "model.safetensors.index.json").exists()
    VipLlava.from_pretrained(tmp_path, verbose=False)


def test_a_rerun_with_the_same_settings_finds_it_done(tmp_path):
    # the README's one-liner, run twice: the second run must reach the CLI
    folder = tmp_path / "tiny"
    assert run(folder, "--seed", "2").returncode == 0
    shards = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    r = run(folder, "--seed", "2")
    assert r.returncode == 0 and r.stdout == f"{folder}\n", r.stderr
    assert "already there, nothing written" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == shards  # nothing rewritten
    assert refused(run(folder, "--seed", "3"), "already holds a VipLlava checkpoint")  # other settings: not silently
    assert refused(run(folder, "--dtype", "bfloat16", "--seed", "2"), "already holds a VipLlava checkpoint")


@pytest.mark.parametrize("args,message", [(["--dtype", "float8", "x"], "invalid choice: 'float8'"),
                                          ([], "the following arguments are required: FOLDER")])
def test_bad_arguments_are_one_line(args, message):
    assert refused(run(*args), message)
