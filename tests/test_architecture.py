"""The shape of the house: no module-level import cycle inside vlm, a config layer without
torch, and one list of registries behind both the validation and ``vlm models``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import vlm.wiring

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: Set[str]) -> Set[str]:
    """The vlm modules ``path`` imports in its module body (not inside functions or classes,
    not under ``if TYPE_CHECKING``)."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    targets: Set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in modules else source)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> Dict[str, Set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): top_level_imports(p, modules) for p in paths}


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


def test_vlm_has_no_module_level_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "vlm.config" in graph["vlm.wiring"]
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_the_config_layer_imports_no_torch():
    done = run_python("import vlm.config, vlm.errors, vlm.registry, sys; "
                      "assert 'torch' not in sys.modules, 'torch imported'; print('clean')")
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr


def test_validating_an_hf_clip_recipe_imports_no_other_encoder_library():
    code = ("import sys; from vlm.wiring import load_run_config; "
            "load_run_config('configs/demo/llava_shapes.yaml'); "
            "print(json.dumps(sorted(m for m in ('open_clip', 'timm', 'torchscale', 'peft') if m in sys.modules)))")
    done = run_python("import json; " + code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_vlm_models_lists_every_registry_of_the_one_list():
    from vlm.catalog import catalog

    entries = catalog()
    assert list(entries) == list(vlm.wiring.REGISTRIES)
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
