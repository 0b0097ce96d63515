"""Quantized models end to end: from_pretrained(quantize=...), save_pretrained, --dtype auto, --quantize.

The layers' formulas are checked against torchao in test_quantize.py; here the whole model on small random
checkpoints in the official format: against float32, against a float model holding the same dequantized
weights, through a save -> load round trip, and the memory of quantizing while loading.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantize
import tiny_checkpoint
import weights
from vipllava import VipLlava

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
# Widths that int4's default group of 128 divides; 4 heads, 2 of them for keys and values.
TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint.write_checkpoint(tmp_path_factory.mktemp("q"), text=TEXT, dtype="float16",
                                            max_shard_bytes=400_000)


@pytest.fixture(scope="module")
def float32(checkpoint):
    return VipLlava.from_pretrained(checkpoint, dtype="float32", verbose=False)


def prompt(n: int, seed: int = 0):
    return torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(seed))


def relative(a, b) -> float:  # the largest difference, relative to the reference logits' scale
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def with_dequantized_weights(float_model, quantized):
    """A copy of the float model whose Linears hold the quantized model's weights, dequantized."""
    import copy

    model = copy.deepcopy(float_model)
    for name, m in quantize.quantized_layers(quantized).items():
        model.get_submodule(name).weight.copy_(m.dequantize())
    return model


@pytest.mark.parametrize("mode, bound", [("int8", 0.01), ("int4", 0.08)])
def test_logits_stay_close_to_float32(checkpoint, float32, mode, bound):
    # Bounds relative to the largest logit. Measured here (random weights, 40 tokens): int8 0.0016 in float32
    # and 0.0059 in bfloat16; int4 (g128) 0.044 and 0.045. Random weights are harder on 4 bits than trained ones.
    ids = prompt(40)
    ref = float32(ids).logits
    for dtype in ("float32", "bfloat16"):
        model = VipLlava.from_pretrained(checkpoint, dtype=dtype, quantize=mode, verbose=False)
        err = relative(model(ids).logits, ref)
        assert 0 < err <= bound, f"{mode} in {dtype}: logits {err:.4f} of their scale from float32 (bound {bound})"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_path_computes_the_dequantized_model(checkpoint, float32, mode):
    model = VipLlava.from_pretrained(checkpoint, dtype="float32", quantize=mode, verbose=False)
    layers = quantize.quantized_layers(model)
    assert len(layers) == 2 * 7 + 1 and type(layers["language_model.lm_head"]) is quantize.Int8Linear
    if mode == "int4":
        assert {m.layout for n, m in layers.items() if n != "language_model.lm_head"} == {"cpu"}
    same = with_dequantized_weights(float32, model)
    long, short = prompt(40), prompt(8)
    # 40 rows: the weights dequantized in float32 pieces, so the same numbers as the float model up to sums' order.
    assert relative(model(long).logits, same(long).logits) <= 1e-5
    # 8 rows: the fused kernels, whose activations are bf16 (8 bits of mantissa): bound 2% of the scale.
    assert relative(model(short).logits, same(short).logits) <= 0.02


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_runs_and_matches_the_dequantized_model_on_the_first_tokens(checkpoint, float32, mode, capsys):
    model = VipLlava.from_pretrained(checkpoint, quantize=mode)
    assert model.dtype == torch.bfloat16  # the default with quantize: what the kernels take
    assert f"dtype auto: bfloat16 beside the {mode} weights" in capsys.readouterr().err
    ids = prompt(30)
    out = model.generate(ids, max_new_tokens=12)
    assert out.shape == (1, 12) and out.dtype == torch.long
    # The first token comes from the prefill (dequantized pieces): the same argmax as the float model with
    # the same weights in bfloat16.
    same = with_dequantized_weights(float32, model).to(torch.bfloat16)
    assert out[0, 0] == same.generate(ids, max_new_tokens=1)[0, 0]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_then_load_gives_identical_logits(checkpoint, tmp_path, mode):
    model = VipLlava.from_pretrained(checkpoint, quantize=mode, group_size=64, verbose=False)
    folder = model.save_pretrained(tmp_path / "q", max_shard_bytes=300_000)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "vipllava-weight-only", "weights": mode,
                                             "group_size": 64, "lm_head": "int8", "modules": "language_model Linears"}
    assert (folder / "model.safetensors.index.json").is_file()  # sharded, with its index
    others = [f.name for f in checkpoint.iterdir() if f.suffix != ".safetensors" and
              f.name not in ("config.json", "model.safetensors.index.json")]
    assert {"tokenizer.json", "preprocessor_config.json", "chat_template.json"} <= set(others)
    for name in others:  # tokenizer, processor, chat template, generation config: copied as they are
        assert (folder / name).read_bytes() == (checkpoint / name).read_bytes(), name
    again = VipLlava.from_pretrained(folder, verbose=False)  # no quantize=: the folder says how
    assert again.quantization == {"weights": mode, "group_size": 64}
    ids = prompt(40)
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert torch.equal(again(ids[:, :5]).logits, model(ids[:, :5]).logits)  # the kernel path too
    assert torch.equal(again.generate(ids, max_new_tokens=8), model.generate(ids, max_new_tokens=8))
    # The saved form is the portable one: int4 two values per byte, whatever the CPU's kernel layout.
    from safetensors.torch import load_file

    saved = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    up = saved["language_model.model.layers.0.mlp.up_proj.weight"]
    assert up.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert up.shape == ((256, 128) if mode == "int8" else (256, 64))
    assert saved["language_model.model.embed_tokens.weight"].dtype == torch.bfloat16
    # A processor loads from the saved folder as from the original.
    from processor import VipLlavaProcessor

    assert VipLlavaProcessor.from_pretrained(folder)("hello")["input_ids"].tolist() == \
        VipLlavaProcessor.from_pretrained(checkpoint)("hello")["input_ids"].tolist()


def test_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"unknown quantize value 'int3': use None \(no quantization\), 'int8' or 'int4'"):
        VipLlava.from_pretrained(checkpoint, quantize="int3", verbose=False)
    with pytest.raises(ValueError, match=r"int4 group size 48 is not supported: use one of \(32, 64, 128, 256\)"):
        VipLlava.from_pretrained(checkpoint, quantize="int4", group_size=48, verbose=False)
    with pytest.raises(ValueError, match="int4 group size 256 does not divide a layer width of 128: use group size 128"):
        VipLlava.from_pretrained(checkpoint, quantize="int4", group_size=256, verbose=False)
    saved = VipLlava.from_pretrained(checkpoint, quantize="int4", verbose=False).save_pretrained(tmp_path / "q4")
    with pytest.raises(ValueError, match=r"already quantized to int4 \(group size 128\), but quantize='int8' was asked"):
        VipLlava.from_pretrained(saved, quantize="int8", verbose=False)
    with pytest.raises(ValueError, match=r"already quantized to int4 \(group size 128\), but quantize='int4', "
                                         r"group_size=32 was asked for"):
        VipLlava.from_pretrained(saved, quantize="int4", group_size=32, verbose=False)
    VipLlava.from_pretrained(saved, quantize="int4", verbose=False)  # the same as saved: fine
    with pytest.raises(FileExistsError, match="already holds weights: save into a new or empty folder"):
        VipLlava.from_pretrained(saved, verbose=False).save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized with 'bitsandbytes', which this loader does not read"):
        VipLlava.from_pretrained(saved, verbose=False)


def test_without_a_kernel_int4_dequantizes_and_says_so(checkpoint, monkeypatch, capsys):
    fused = VipLlava.from_pretrained(checkpoint, quantize="int4", verbose=False)
    assert quantize.without_kernel(fused) == []
    monkeypatch.setattr(quantize, "cpu_int4_block", lambda: None)  # as on a CPU whose layout we do not know
    model = VipLlava.from_pretrained(checkpoint, quantize="int4")
    assert len(quantize.without_kernel(model)) == 2 * 7  # lm_head is int8
    assert "note: 14 quantized layer(s) have no fused kernel on cpu" in capsys.readouterr().err
    ids = prompt(8)  # few rows: the fused model takes its kernel, this one dequantizes
    assert relative(model(ids).logits, fused(ids).logits) <= 0.02


def test_dtype_auto_on_a_cpu_follows_the_available_memory(checkpoint, monkeypatch, capsys):
    model = VipLlava.from_pretrained(checkpoint, dtype="float32", verbose=False)
    fp32 = quantize.weight_bytes(model)
    assert fp32 == sum(t.numel() * 4 for t in model.state_dict().values())
    for free, chosen in ((10 * fp32, torch.float32), (fp32, torch.bfloat16)):  # float32 needs 1.2x its size
        monkeypatch.setattr(weights, "available_memory", lambda device: free)
        assert VipLlava.from_pretrained(checkpoint, dtype="auto").dtype == chosen
        assert f"dtype auto: {str(chosen)[6:]}" in capsys.readouterr().err
    monkeypatch.setattr(weights, "available_memory", lambda device: fp32 // 4)
    with pytest.raises(MemoryError, match=r"in float32 and .* in bfloat16, but only .* available: quantize them while "
                                          r"loading, quantize='int8' \(--quantize int8, .*\) or quantize='int4'"):
        VipLlava.from_pretrained(checkpoint)


def test_cli_quantize(checkpoint):
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "vipllava.py"), "--model", str(checkpoint), "--prompt",
                               "hi", "--max-new-tokens", "4", *args], capture_output=True, text=True, timeout=120)

    assert run("--quantize", "int8").returncode == 0
    done = run("--quantize", "int4", "--group-size", "256")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "group size 256 does not divide a layer width of 128" in done.stderr


# Peak memory of quantizing while loading, in a fresh interpreter (see test_weights.py for why VmHWM).
MEASURE = """
import json, sys
import torch
import quantize, vipllava

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

with torch.device("meta"):
    torch.nn.Embedding(1, 1)
before = status_kb("VmRSS")
model = vipllava.VipLlava.from_pretrained(sys.argv[1], quantize=sys.argv[2], verbose=False)
growth = (status_kb("VmHWM") - before) * 1024
with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the present RSS, to see save_pretrained's own peak
    f.write("5")
loaded = status_kb("VmRSS")
model.save_pretrained(sys.argv[3])
print(json.dumps(dict(growth=growth, weight_bytes=quantize.weight_bytes(model),
                      save_growth=(status_kb("VmHWM") - loaded) * 1024)))
"""


def test_peak_memory_of_quantizing_while_loading(tmp_path):
    # ~290 MB in float16 (6 layers of the 1024 width, vocab 32064): a float32 or even float16 copy would show.
    text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32064)
    folder = tiny_checkpoint.write_checkpoint(tmp_path, text=text, dtype="float16", max_shard_bytes=64 * MB)
    fp16 = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for mode in ("int8", "int4"):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), mode, str(tmp_path / f"saved-{mode}")],
                             cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
        assert out.returncode == 0, out.stderr
        m = json.loads(out.stdout)
        assert m["weight_bytes"] < fp16 * (0.65 if mode == "int8" else 0.5)  # embedding bf16, lm_head int8
        # The bound: 1.1 x the quantized model + 0.5 GB. Measured (torch 2.13, 2 CPUs, 4 runs): int8, 179 MB
        # of weights, growth 274-299 MB; int4, 142 MB, growth 259-284 MB. Above the weights: the largest float16
        # tensor, read whole into one buffer (lm_head, 66 MB), the 16 MiB read buffer, the quantizer's float32
        # pieces and what the heap keeps of them; the float model never exists.
        bound = 1.1 * m["weight_bytes"] + 0.5e9
        assert m["growth"] <= bound, f"{mode}: grew {m['growth'] / MB:.0f} MiB, bound {bound / MB:.0f} MiB"
        # And tighter than the issue asks, so that a float16 copy of the whole model (290 MB) would fail here.
        assert m["growth"] <= m["weight_bytes"] + 200 * MB, f"{mode}: {m}"
        # save_pretrained turns int4 layers portable in their own bytes, one at a time, and back: measured 1 MB
        # (int8) and 33 MB (int4: the heap's share of each layer's unpacking temporaries) on the AVX2 EPYC, and
        # 33-46 MB on the AVX-512 Xeon (the heap's share varies from run to run); a portable copy of every int4
        # layer, as first written, held the layers' 38 MB twice over on top (> 100 MB).
        assert m["save_growth"] <= 0.4 * m["weight_bytes"], f"{mode}: {m}"
