"""The benchmark's smoke test: the tiny preset runs end to end and prints the documented JSON (speed is not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
SIDE_KEYS = {"load_s", "peak_rss_gb", "vision_s", "prefill_s", "decode_tok_s_b1", "decode_tok_s_b4"}


def test_tiny_preset_prints_one_json_object_with_both_sides_and_the_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--preset", "tiny", "--json", "--repeats", "1",
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert {"preset", "dtype", "ours", "reference", "ratios", "decode_bound_fraction"} <= result.keys()
    assert (result["preset"], result["dtype"]) == ("tiny", "float32")
    for side in ("ours", "reference"):
        assert SIDE_KEYS <= result[side].keys()
        assert all(result[side][k] > 0 for k in SIDE_KEYS), result[side]
    assert set(result["ratios"]) == {"load", "vision", "prefill", "decode"}
    assert all(r > 0 for r in result["ratios"].values())
    assert 0 < result["decode_bound_fraction"]
    assert (tmp_path / "tiny" / "config.json").is_file()  # the checkpoint is cached for the next run
