"""The benchmark's smoke test: the tiny preset runs end to end and prints the documented JSON (speed is not asserted).

Only what cannot be noisy is asserted positive: times measured directly, memory, byte counts. Decode tokens/s is a
difference of two timings (NaN when a busy machine makes it <= 0), so it and the ratios and bound fractions made
from it are only checked to be numbers.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
SIDE_KEYS = {"load_s", "peak_rss_gb", "vision_s", "prefill_s", "decode_tok_s_b1", "decode_tok_s_b4"}
DIRECT = {"load_s", "peak_rss_gb", "vision_s", "prefill_s"}  # measured directly: > 0 on any machine
FROM_DECODE = {"decode_tok_s_b1", "decode_tok_s_b4", "decode_bound_fraction", "decode", "decode_b1", "decode_b4"}


def check_numbers(values: dict):
    """Direct measurements > 0; what decode tokens/s enters, a float (NaN allowed) and never <= 0."""
    for k, v in values.items():
        assert isinstance(v, (int, float)), (k, v)
        assert (math.isnan(v) or v > 0) if k in FROM_DECODE else v > 0, (k, v)


def test_tiny_preset_prints_one_json_object_with_both_sides_and_the_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--preset", "tiny", "--json", "--repeats", "1",
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert {"preset", "dtype", "ours", "reference", "ratios", "decode_bound_fraction"} <= result.keys()
    assert (result["preset"], result["dtype"]) == ("tiny", "float32")
    for side in ("ours", "reference"):
        assert SIDE_KEYS <= result[side].keys()
        check_numbers({k: result[side][k] for k in SIDE_KEYS})
    assert set(result["ratios"]) == {"load", "vision", "prefill", "decode"}
    check_numbers(result["ratios"])
    check_numbers({"decode_bound_fraction": result["decode_bound_fraction"]})
    assert (tmp_path / "tiny" / "config.json").is_file()  # the checkpoint is cached for the next run


def test_tiny_preset_with_quantized_sides_prints_their_metrics_bounds_and_ratios(tmp_path):
    # The tiny text width is 64: the tiny preset's int4 group size is 32 (bench's default there).
    proc = subprocess.run([sys.executable, str(BENCH), "--preset", "tiny", "--json", "--repeats", "1", "--dtype", "bfloat16",
                           "--quantize", "int8", "int4", "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert {"preset", "dtype", "ours", "reference", "ratios", "decode_bound_fraction"} <= result.keys()  # as before
    assert (result["dtype"], result["quantize"], result["group_size"]) == ("bfloat16", ["int8", "int4"], 32)
    for mode in ("int8", "int4"):
        side = result[f"ours_{mode}"]
        assert SIDE_KEYS | {"decode_bound_fraction", "decode_bytes_per_step", "weights_gb"} <= side.keys()
        check_numbers({k: side[k] for k in SIDE_KEYS | {"decode_bound_fraction", "decode_bytes_per_step"}})
        # fewer bytes per decode step than bfloat16's: int8 / int4 weights (+ scales, zeros) instead of bf16 ones
        assert side["decode_bytes_per_step"] < result["decode_bytes_per_step"]
        ratios = result[f"ratios_{mode}"]
        assert set(ratios) == {"decode_b1", "decode_b4", "prefill", "vision", "load", "peak_rss"}
        check_numbers(ratios)
    assert result["ours_int4"]["decode_bytes_per_step"] < result["ours_int8"]["decode_bytes_per_step"]
    # the float side's bytes counted on the loaded model agree with the formula the float bound uses
    assert result["ours_decode_bytes_per_step_measured"] == result["decode_bytes_per_step"]


def test_sizes_of_the_real_7b_meet_the_targets():
    sizes = BENCH.parent / "sizes.py"
    proc = subprocess.run([sys.executable, str(sizes), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert set(r) == {"7B", "13B"}
    b7 = r["7B"]
    assert round(b7["decoder_linear_weights"] / 1e9, 2) == 6.48
    assert b7["int8"] <= 7.6 and b7["int4"] <= 4.6, b7
    assert b7["float32"] > b7["bfloat16"] > b7["int8"] > b7["int4"]
    assert abs(b7["float32"] - 2 * b7["bfloat16"]) < 1e-6
    assert r["13B"]["decoder_linear_weights"] > b7["decoder_linear_weights"]
    # The same sizes by hand from the 7B's shapes (h 4096, i 11008, 32 layers, vocab 32064): each Linear's
    # weights at 1 byte (int8) or 1/2 byte plus a bf16 scale and zero per 128 (int4); int8 scales float32, one
    # per output; lm_head int8 in both; everything else 2 bytes.
    h, i, n, vocab = 4096, 11008, 32, 32064
    outputs = n * (4 * h + 2 * i + h)  # one int8 scale per output channel
    float_rest = b7["parameters"] - b7["decoder_linear_weights"] - vocab * h
    int8 = b7["decoder_linear_weights"] + 4 * outputs + vocab * h + 4 * vocab + 2 * float_rest
    int4 = b7["decoder_linear_weights"] // 2 + b7["decoder_linear_weights"] // 128 * 4 + vocab * h + 4 * vocab + \
        2 * float_rest
    assert (b7["int8"], b7["int4"]) == (int8 / 1e9, int4 / 1e9)
    # README's "what runs where" table is this script's output.
    table = subprocess.run([sys.executable, str(sizes)], capture_output=True, text=True, timeout=300).stdout
    readme = (BENCH.parent.parent / "README.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 7B") or line.startswith("| 13B")]
    assert len(rows) == 2 and all(row in readme for row in rows), rows


def test_vs_llamacpp_converts_the_same_language_model(tmp_path):
    # What vs_llamacpp.py hands llama.cpp's converter: a plain LlamaForCausalLM folder with our checkpoint's
    # language model (transformers' logits there equal ours) and a vocabulary of one token per embedding row.
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    sys.path.insert(0, str(BENCH.parent))
    import tiny_checkpoint
    import vs_llamacpp
    from vipllava import VipLlava

    folder = tiny_checkpoint.write_checkpoint(tmp_path / "ckpt", dtype="float32", max_shard_bytes=200_000)
    llama = vs_llamacpp.llama_folder(folder)
    assert llama == tmp_path / "ckpt-llama" and vs_llamacpp.llama_folder(folder) == llama  # made once
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()(ids).logits
        ours = VipLlava.from_pretrained(folder, dtype="float32", verbose=False).language_model(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    vocab = AutoTokenizer.from_pretrained(llama).get_vocab()
    assert sorted(vocab.values()) == list(range(theirs.shape[-1]))
