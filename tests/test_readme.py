"""What the README claims about the repository stays true."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_line_counts_in_the_files_table_are_exact():
    rows = re.findall(r"^\| `([\w/.]+\.py)` \| (\d+) \|", README, flags=re.M)
    assert {name for name, _ in rows} >= {"clip.py", "llama.py", "vipllava.py", "generate.py", "processor.py",
                                          "visual_prompts.py", "weights.py", "quantize.py"}
    for name, count in rows:
        actual = len((ROOT / name).read_text().splitlines())
        assert int(count) == actual, f"README says {name} has {count} lines, it has {actual}"


def test_linked_files_exist():
    for target in re.findall(r"\]\(((?!http)[^)#]+)\)", README) + re.findall(r'src="([^"]+)"', README):
        assert (ROOT / target).exists(), f"README links {target}, which does not exist"


def test_the_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test,serve]"' in ci and "python -m pytest -q" in ci and "apt-get install -y -q chromium" in ci
    assert "export REQUIRE_BROWSER=1" in ci
    assert 'pip install torch==2.13.0 && pip install -e ".[test,serve]" && python -m pytest -q' in README
