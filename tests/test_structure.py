"""The rooms import one way: the model files never import the apps, and no two modules import each other."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ["clip", "llama", "vipllava", "generate", "processor", "visual_prompts", "weights", "quantize", "lora"]
APPS = {"cli", "server", "questions", "engine", "finetune"}


def top_level_imports(module: str) -> set[str]:
    """Project modules that `module` imports when it is loaded (imports inside functions are not run then)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & (set(LIBRARY) | APPS)


def test_the_library_never_imports_an_app():
    for module in LIBRARY:
        assert not top_level_imports(module) & APPS, f"{module}.py imports an app"


def test_no_two_library_modules_import_each_other():
    graph = {m: top_level_imports(m) for m in LIBRARY}
    seen = set()

    def visit(m, path):  # depth-first: a module met again on its own path is a circle
        assert m not in path, "import circle: " + " -> ".join(path + [m])
        if m not in seen:
            seen.add(m)
            for n in graph[m]:
                visit(n, path + [m])

    for m in LIBRARY:
        visit(m, [])
    assert "generate" in graph["vipllava"] and "vipllava" not in graph["generate"]
    assert "processor" in graph["visual_prompts"] and "visual_prompts" not in graph["processor"]


def test_importing_the_new_rooms_loads_no_app():
    code = "import sys, generate, visual_prompts; print(sorted(set(sys.modules) & %r))" % APPS
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_old_import_paths_keep_working():
    from processor import COLORS, draw_visual_prompt
    from vipllava import ChatSession
    import generate
    import visual_prompts

    assert draw_visual_prompt is visual_prompts.draw_visual_prompt and COLORS is visual_prompts.COLORS
    assert ChatSession is generate.ChatSession
    import processor
    assert not hasattr(processor, "no_such_name")
