"""finetune.py at scale: QLoRA over the int8/int4 base, resumable runs (SIGTERM, SIGKILL), torchrun with DDP."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune
import lora
import tiny_checkpoint
from conftest import PAD_TOKEN, legacy_config, reference_model, write_checkpoint
from quantize import QUANTIZED
from test_finetune import synthetic_samples
from vipllava import VipLlava

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- QLoRA
@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlora")
    return write_checkpoint(reference_model(), folder, "hub", config=legacy_config(dtype="float32"))


def dequantized_twin(quantized: VipLlava, folder) -> VipLlava:
    """The float model holding exactly the weights the int8/int4 layers stand for."""
    twin = VipLlava.from_pretrained(folder, dtype=torch.float32, verbose=False)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, QUANTIZED):
                twin.get_submodule(name).weight.copy_(m.dequantize())
    return twin


def with_lora(model, config):
    groups = finetune.prepare_model(model, config, seed=3)
    with torch.no_grad():  # B non-zero, so that lora_A gets a gradient too
        g = torch.Generator().manual_seed(4)
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return groups


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_loss_and_gradients_equal_lora_over_the_dequantized_weights(float_checkpoint, mode, tmp_path):
    config = lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    quantized = VipLlava.from_pretrained(float_checkpoint, dtype=torch.float32, quantize=mode, verbose=False)
    twin = dequantized_twin(quantized, float_checkpoint)
    batch = finetune.collate(synthetic_samples(8), PAD_TOKEN)
    assert finetune.supervised_count(batch) > 16  # lm_head's rows: the float32 path, not the bf16 decode kernel
    results = []
    for model in (quantized, twin):
        with_lora(model, config)
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_q, grads_q), (loss_f, grads_f) = results
    assert sum(isinstance(m.base_layer, QUANTIZED) for m in lora.lora_modules(quantized).values()) == 2 * 7
    assert abs(loss_q - loss_f) <= 1e-5 * abs(loss_f)
    assert grads_q.keys() == grads_f.keys() and len(grads_q) == 2 * 2 * 7 + 6  # A, B of 14 layers; projector
    for name, g in grads_f.items():
        assert g.abs().max() > 0, name
        assert (grads_q[name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    # the same PEFT files; served unmerged over the quantized base they give the trained model's logits
    lora.save_adapter(quantized, config, tmp_path / "q")
    lora.save_adapter(twin, config, tmp_path / "f")
    assert load_file(tmp_path / "q" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "f" / "adapter_model.safetensors").keys()
    assert (tmp_path / "q" / "adapter_config.json").read_text() == (tmp_path / "f" / "adapter_config.json").read_text()
    served = VipLlava.from_pretrained(float_checkpoint, dtype=torch.float32, quantize=mode, verbose=False,
                                      adapter=tmp_path / "q")
    ids, pixels, mask = batch["input_ids"], batch["pixel_values"], batch["attention_mask"]
    with torch.no_grad():
        want = quantized.eval()(ids, pixels, mask).logits
        assert torch.allclose(served(ids, pixels, mask).logits, want, atol=1e-5, rtol=0)
        # merged: each layer re-quantized with the update in it; close, not equal (the README's figure)
        merged = VipLlava.from_pretrained(float_checkpoint, dtype=torch.float32, quantize=mode, verbose=False,
                                          adapter=tmp_path / "q", merge=True)
        assert not lora.lora_modules(merged)
        error = (merged(ids, pixels, mask).logits - want).abs().max()
        assert 0 < error < 0.5 * want.abs().max()
    with pytest.raises(ValueError, match="unmerged LoRA over an int8/int4 layer"):
        served.save_pretrained(tmp_path / "saved")


# ---------------------------------------------------------------------------- command-line runs
@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A tiny base with tokenizer, and 10 marked records (one text-only)."""
    folder = tmp_path_factory.mktemp("runs")
    base = tiny_checkpoint.write_checkpoint(folder / "base", vision=dict(image_size=112), dtype="float32")
    Image.new("RGB", (160, 120), (30, 120, 200)).save(folder / "p.png")
    records = [{"id": f"r{i}", "image": "p.png", "bboxes": [[10 + i, 10, 90, 80 - i]],
                "conversations": [{"from": "human", "value": "<image>\nWhat is <bbox0>?"},
                                  {"from": "gpt", "value": f"A cat number {i}."}]} for i in range(9)]
    records.insert(4, {"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                       {"from": "gpt", "value": "Hi there."}]})
    (folder / "train.json").write_text(json.dumps(records))
    return base, folder


def command(base, folder, output, *extra):
    return [str(base), "--data", str(folder / "train.json"), "--image-folder", str(folder), "--output", str(output),
            "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-3", "--projector-lr", "1e-3", "--quiet", *extra]


def finetune_process(base, folder, output, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), "--model",
                             *command(base, folder, output, *extra)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p, want=0):
    out, err = p.communicate(timeout=300)
    assert p.returncode == want, err
    return err


def adapter(output) -> dict:
    return load_file(Path(output) / "adapter_model.safetensors")


def logged_steps(output) -> list[int]:
    log = Path(output) / "loss_log.jsonl"
    if not log.exists():
        return []
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]


RESUME = ("--batch-size", "2", "--epochs", "2", "--save-every", "3")  # 5 steps per epoch, dropout 0.05 on


@pytest.fixture(scope="module")
def uninterrupted(run_files, tmp_path_factory):
    base, folder = run_files
    output = tmp_path_factory.mktemp("whole") / "out"
    finish(finetune_process(base, folder, output, *RESUME))
    assert logged_steps(output) == list(range(1, 11))
    return adapter(output)


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_saves_and_the_rerun_ends_identical(run_files, uninterrupted, tmp_path):
    base, folder = run_files
    output = tmp_path / "out"
    p = finetune_process(base, folder, output, *RESUME)
    while 3 not in logged_steps(output):  # step 3 logged: stop the process there, so that the signal lands in step 4
        assert p.poll() is None, p.communicate()[1]
        time.sleep(0.002)
    p.send_signal(signal.SIGSTOP)
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    err = finish(p, 128 + signal.SIGTERM)
    assert "SIGTERM: saved" in err and (output / "checkpoint-4" / "training_state.pt").is_file()
    assert not (output / "adapter_model.safetensors").exists() and logged_steps(output) == [1, 2, 3, 4]
    err = finish(finetune_process(base, folder, output, *RESUME))  # the same command again
    assert "resuming from" in err and "checkpoint-4" in err
    assert logged_steps(output) == list(range(1, 11))
    assert_identical(adapter(output), uninterrupted)


def test_sigkill_after_a_save_loses_only_the_steps_since(run_files, uninterrupted, tmp_path):
    base, folder = run_files
    output = tmp_path / "out"
    p = finetune_process(base, folder, output, *RESUME)
    while not (output / "checkpoint-3").is_dir():
        assert p.poll() is None, p.communicate()[1]
        time.sleep(0.002)
    p.kill()
    finish(p, -signal.SIGKILL)
    assert not list(output.glob("*.tmp"))  # the folder appears whole or not at all
    err = finish(finetune_process(base, folder, output, *RESUME, "--resume", str(output / "checkpoint-3")))
    assert "checkpoint-3" in err
    assert_identical(adapter(output), uninterrupted)
    assert logged_steps(output) == list(range(1, 11))  # the steps logged after the save and lost: logged once
    state = torch.load(output / "checkpoint-9" / "training_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["steps_in_epoch"]) == (9, 1, 4)


def test_a_resumed_run_refuses_other_settings(run_files, tmp_path):
    base, folder = run_files
    output = tmp_path / "out"
    finish(finetune_process(base, folder, output, "--batch-size", "5", "--save-every", "1"))
    err = finish(finetune_process(base, folder, output, "--batch-size", "5", "--lora-r", "8"), 1)
    assert "lora_r: 4 then, 8 now" in err


def test_the_global_batch_must_split(run_files, tmp_path):
    base, folder = run_files
    err = finish(finetune_process(base, folder, tmp_path / "o", "--batch-size", "5", "--grad-accum", "2"), 1)
    assert "--batch-size 5" in err and "multiple of 2" in err


# ---------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one_with_the_same_global_batch(run_files, tmp_path, mode):
    """2 ranks x 2 micro-batches of 1 (DDP or FSDP2, synced in the second's backward) == 1 process x 1 batch of 4:
    the same 4 samples per step (one text-only: the projector is unused in its micro-batch), the loss normalised by
    the supervised tokens of all ranks."""
    base, folder = run_files
    settings = ("--batch-size", "4", "--lora-dropout", "0", "--max-grad-norm", "0")
    sharded = ["--fsdp", "--save-every", "2"] if mode == "fsdp" else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "finetune.py"), "--model", *command(base, folder, tmp_path / "two", *settings,
                                                                         "--grad-accum", "2", *sharded)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        err = p.communicate(timeout=240)[1]
    finally:
        if p.poll() is None:  # a hang: the launcher and its workers go together
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err[-3000:]
    finish(finetune_process(base, folder, tmp_path / "one", *settings))
    two, one = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert logged_steps(tmp_path / "two") == logged_steps(tmp_path / "one") == [1, 2, 3]
    losses = [[json.loads(line) for line in (tmp_path / run / "loss_log.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    for a, b in zip(*losses):  # the mean over every rank's supervised tokens, as one process computes it
        assert a["supervised_tokens"] == b["supervised_tokens"] and abs(a["loss"] - b["loss"]) <= 1e-6 * a["loss"]
    assert one.keys() == two.keys()
    for k in one:
        assert (one[k] - two[k]).abs().max() <= 1e-6, k
    assert all(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # trained: B moved from zero
    if mode == "fsdp":  # its checkpoint (shards gathered) resumes in one process: the same end
        resumed = tmp_path / "resumed"
        err = finish(finetune_process(base, folder, resumed, *settings, "--resume",
                                      str(tmp_path / "two" / "checkpoint-2")))
        assert "checkpoint-2 (step 2)" in err and logged_steps(resumed) == [3]
        for k, v in adapter(resumed).items():
            assert (v - one[k]).abs().max() <= 1e-6, k
