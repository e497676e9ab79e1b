#!/usr/bin/env python
"""What a user copies with one script: the AST closure of its imports inside this repo (function-local imports
included), as modules and lines, per script; and the package's import graph (circles, imports of a higher layer).

    python benchmarks/bench_copy_closure.py      # writes benchmarks/results/copy_closure.{json,txt}

Targets (the copy-adaptable layout): an attack script ≤ 2,000 lines of helpers, a training script ≤ 2,800, 0 circles,
0 imports running back up. Lines are physical lines of the helper modules (docstrings and comments included).
"""

import ast
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mixsyn_utils import LAYERS  # noqa: E402

TARGETS = {"attack": 2000, "training": 2800}
SCRIPTS = {"attack": ["attack_clid.py", "attack_loss.py", "attack_pfami.py", "attack_pia.py", "attack_secmi.py"],
           "training": ["train_dreambooth_mixsyn.py", "train_lora_mixsyn.py", "train_textual_inversion_mixsyn.py"],
           "other": ["evaluate.py", "generate_synthetic.py", "perturb_antidreambooth.py", "make_tiny_victim.py"]}


def local_module(name):
    """The repo file of a dotted module name, or None for a third-party one."""
    for path in (REPO_ROOT / (name.replace(".", "/") + ".py"), REPO_ROOT / name.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_files(path):
    """Repo files `path` imports anywhere in its body (a package import also loads the package's __init__)."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            file = local_module(".".join(parts[:end]))
            if file is not None:
                found.add(file)
    return found


def closure(script):
    """Every repo file a copy of `script` needs, transitively."""
    seen, todo = set(), [REPO_ROOT / script]
    while todo:
        for file in imported_files(todo.pop()):
            if file not in seen and file != REPO_ROOT / script:
                seen.add(file)
                todo.append(file)
    return sorted(seen)


def package_graph():
    """{module: modules of mixsyn_utils it imports}, and the imports that run to a higher layer."""
    rank = {module: index for index, modules in enumerate(LAYERS.values()) for module in modules}
    graph = {path.stem: {file.stem for file in imported_files(path) if file.parent.name == "mixsyn_utils"
                         and file.stem != "__init__"} - {path.stem}
             for path in sorted((REPO_ROOT / "mixsyn_utils").glob("*.py")) if path.stem != "__init__"}
    upward = [f"{module} -> {other}" for module, others in graph.items() for other in sorted(others)
              if rank[other] > rank[module]]
    return graph, upward


def circles(graph):
    found, state = [], {}

    def visit(module, path):
        if state.get(module) == "open":
            found.append(path[path.index(module):] + [module])
            return
        if state.get(module) == "done":
            return
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
    return found


def main():
    rows = {}
    for kind, scripts in SCRIPTS.items():
        for script in scripts:
            files = closure(script)
            rows[script] = {"kind": kind, "modules": len(files),
                            "lines": sum(len(file.read_text().splitlines()) for file in files),
                            "script_lines": len((REPO_ROOT / script).read_text().splitlines()),
                            "files": [file.relative_to(REPO_ROOT).as_posix() for file in files]}
    graph, upward = package_graph()
    result = {"targets": TARGETS, "scripts": rows, "circles": circles(graph), "upward_imports": upward}
    out = REPO_ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "copy_closure.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["script | helper modules | helper lines | target | script lines", "---|---|---|---|---"]
    for script, row in rows.items():
        target = TARGETS.get(row["kind"])
        verdict = "" if target is None else f"≤ {target}: {'met' if row['lines'] <= target else 'NOT met'}"
        lines.append(f"{script} | {row['modules']} | {row['lines']} | {verdict} | {row['script_lines']}")
    lines += ["", f"import circles in mixsyn_utils: {len(result['circles'])}",
              f"imports of a higher layer: {len(upward)}"]
    (out / "copy_closure.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
