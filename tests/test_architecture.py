"""The shape of the house: every import inside vlm (module level, inside functions, under
``TYPE_CHECKING``, and the ``"module:Class"`` strings registries import lazily) runs one way down
the declared layers and closes no circle; a config layer without torch; inference apart from
training; one list of registries behind both the validation and ``vlm models``."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Set

import vlm.app.wiring

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm"

# The layers, lowest first; a module imports only from its own layer or from a lower rank.
# Layers of one rank (training, inference) never import each other.
LAYERS = [
    ("core", 0, ("vlm", "vlm.core")),
    ("config", 1, ("vlm.config",)),
    ("data", 2, ("vlm.data",)),
    ("modeling", 3, ("vlm.modeling",)),
    ("checkpoint", 4, ("vlm.checkpoint",)),
    ("training", 5, ("vlm.training",)),
    ("inference", 5, ("vlm.inference", "vlm.chat")),
    ("evaluation", 6, ("vlm.evaluation",)),
    ("interop", 7, ("vlm.interop",)),
    ("app", 8, ("vlm.app", "vlm.__main__")),
]
LAZY_TARGET = re.compile(r"^(vlm(?:\.\w+)+):[\w.]+$")  # a registry's "module:Class" entry


@dataclass(frozen=True)
class Import:
    """One import statement (or lazy registry entry) of a vlm module."""

    source: str
    target: str
    line: int
    in_function: bool

    def where(self) -> str:
        path = self.source.replace(".", "/") + ".py"
        return f"{path}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(target: str, modules: Set[str]) -> str:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target


def all_imports(path: Path, modules: Set[str]) -> List[Import]:
    """Every import of a vlm module in ``path``, wherever it stands."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    inside: Set[int] = set()  # ids of nodes nested in a function
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(fn) if n is not fn)
    found: List[Import] = []

    def add(target: str, node: ast.AST) -> None:
        target = _resolve(target, modules)
        if target and target != name:
            found.append(Import(name, target, node.lineno, id(node) in inside))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = LAZY_TARGET.match(node.value)
            if match:
                add(match.group(1), node)
    return found


def every_import() -> List[Import]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return [imp for p in paths for imp in all_imports(p, modules)]


def import_graph(imports: List[Import]) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    return graph


def layer_of(module: str):
    """(name, rank) of the layer holding ``module``: the longest matching prefix."""
    best = None
    for name, rank, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + ".") and prefix != "vlm":
                if best is None or len(prefix) > best[2]:
                    best = (name, rank, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[:2]


def upward(imports: List[Import]) -> List[str]:
    """The imports that run up (or sideways into a sibling layer), each as 'file:line imports X'."""
    bad = []
    for imp in imports:
        (src, src_rank), (dst, dst_rank) = layer_of(imp.source), layer_of(imp.target)
        if src != dst and dst_rank >= src_rank:
            bad.append(f"{imp.where()} ({src} -> {dst})")
    return bad


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a list of modules (first == last), or [] when there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_every_import_counts_function_level_ones_too():
    imports = every_import()
    assert sum(i.in_function for i in imports) > 10 and sum(not i.in_function for i in imports) > 150
    assert any(i.target == "vlm.modeling.vision.hf_clip" for i in imports)  # a lazy registry entry


def test_no_import_runs_up_the_layers():
    bad = upward(every_import())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_vlm_has_no_import_cycle():
    graph = import_graph(every_import())
    assert len(graph) > 60 and "vlm.config" in graph["vlm.app.wiring"]
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_the_checkers_find_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    up = Import("vlm.training.trainer", "vlm.evaluation.runner", 12, True)
    side = Import("vlm.inference.chat", "vlm.training.trainer", 3, False)
    down = Import("vlm.app.cli", "vlm.core.errors", 5, True)
    assert upward([up, side, down]) == [
        "vlm/training/trainer.py:12 imports vlm.evaluation.runner (training -> evaluation)",
        "vlm/inference/chat.py:3 imports vlm.training.trainer (inference -> training)"]


def test_every_module_is_in_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_chat_and_inference_do_not_import_the_trainer():
    done = run_python("import vlm.chat, vlm.inference, vlm.inference.chat, vlm.inference.serving.app, sys; "
                      "bad = sorted(m for m in sys.modules if m.startswith('vlm.training')); print(json.dumps(bad))",
                      prefix="import json; ")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def run_python(code: str, prefix: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", prefix + code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_the_config_layer_imports_no_torch():
    done = run_python("import vlm.config, vlm.core.errors, vlm.core.registry, vlm.core.plugins, sys; "
                      "assert 'torch' not in sys.modules, 'torch imported'; print('clean')")
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr


def test_validating_an_hf_clip_recipe_imports_no_other_encoder_library():
    code = ("import sys; from vlm.app.wiring import load_run_config; "
            "load_run_config('configs/demo/llava_shapes.yaml'); "
            "print(json.dumps(sorted(m for m in ('open_clip', 'timm', 'torchscale', 'peft') if m in sys.modules)))")
    done = run_python("import json; " + code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_vlm_models_lists_every_registry_of_the_one_list():
    from vlm.app.wiring import catalog

    entries = catalog()
    assert list(entries) == list(vlm.app.wiring.REGISTRIES)
    assert {"caption", "vqa", "retrieval"} <= set(entries["tasks"])
    assert {"lm", "caption_bow", "qformer_stage1"} <= set(entries["objectives"])
    assert {"hf_clip", "open_clip", "timm_vit", "beit3", "hf_blip2_vision"} <= set(entries["vision_encoders"])


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_the_add_your_own_component_example_runs_as_written(tmp_path):
    """docs/architecture.md's example registers an encoder, a connector, an objective and a task
    from outside vlm and runs a recipe that uses all four."""
    import re

    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text[text.index("## Add your own component"):]
    match = re.search(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert match, "the section has no ```python block"
    script = tmp_path / "add_your_own.py"
    script.write_text(match.group(1))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                            "HOME": str(tmp_path)})
    assert done.returncode == 0, f"example failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert re.search(r"^eval format: coco_captions$", done.stdout, flags=re.M)
    assert re.search(r"^mean words: \S+$", done.stdout, flags=re.M)


def _summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ") if doc.strip() else ""


def file_map(folder: Path = PACKAGE, depth: int = 0) -> List[str]:
    """The file map of docs/architecture.md as it must read: every folder (its ``__init__``'s
    summary line) and every module (its docstring's summary line), folders after modules."""
    pad = 36
    lines = []
    if depth == 0:
        lines.append(f"{'vlm/':<{pad}}{_summary(folder / '__init__.py')}")
    indent = "  " * (depth + 1)
    modules = sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")
    for path in modules:
        lines.append(f"{indent + path.name:<{pad}}{_summary(path)}")
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        lines.append(f"{indent + sub.name + '/':<{pad}}{_summary(sub / '__init__.py')}")
        lines.extend(file_map(sub, depth + 1))
    return lines


def test_every_module_has_a_one_line_summary():
    bad = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
           if not _summary(p) or len(_summary(p)) > 100 or "\n" in _summary(p)]
    assert not bad, f"modules without a one-line docstring summary (<= 100 characters): {bad}"


def test_the_file_map_in_architecture_md_lists_every_module_as_it_is():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text[text.index("## Files and their one job"):]
    block = re.search(r"^```\n(.*?)^```", section, flags=re.S | re.M).group(1).splitlines()
    expected = file_map()
    listed = [line for line in block if line.startswith("vlm/") or line.startswith("  ")]
    assert listed == expected, ("docs/architecture.md's file map differs from the tree; it should read:\n"
                                + "\n".join(expected))
