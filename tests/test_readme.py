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


def test_the_notebooks_readme_lists_every_notebook_and_counts_them():
    text = (ROOT / "notebooks" / "README.md").read_text()
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert all(f"]({name})" in text for name in notebooks), notebooks
    words = ["One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]
    assert text.split("\n\n")[1].startswith(f"{words[len(notebooks) - 1]} walks"), "the count of notebooks"


def test_streamed_examples_do_not_print_the_answer_twice():
    # ask(..., streamer=print...) prints the text as it comes and returns it: wrapping it in print shows it twice
    calls = re.findall(r"print\((?:\w+\.)+(?:ask|generate)\([^\n]*streamer=", README)
    assert not calls, calls


def test_the_test_time_names_the_cpu_it_was_measured_on_and_both_kinds_pass():
    paragraph = README[README.index("Set up and run the tests"):README.index('pip install -e ".[test,serve]" && python')]
    assert re.search(r"AVX-?512|AVX2", paragraph), "which CPU kind the test time was measured on"
    assert "AVX2 and AVX-512" in README and "passes on both" in README
