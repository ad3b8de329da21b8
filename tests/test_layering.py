"""The house's layering (ARCHITECTURE.md): imports only go down the wings, no two modules import each other (directly
or around a circle), and the core never imports Flower. Every import counts, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fl_ietagc", "strategies", "clients", "experiments", "benchmarks")

# bottom first; a module may import its own floor and any floor below it
FLOORS = [
    "fl_ietagc.settings",
    "fl_ietagc.federation",
    "fl_ietagc.runs",
    "fl_ietagc.data",
    "fl_ietagc.training",
    "fl_ietagc.evaluation",
    "fl_ietagc.loops",
    "fl_ietagc",  # the entry points at its top: cli, validate, resume_check, export, app_dir
    "clients",
    "strategies",
    "experiments.launch",
    "experiments.studies",
    "benchmarks",
]


def floor(module: str) -> int:
    best = max((f for f in FLOORS if module == f or module.startswith(f + ".")), key=len)
    return FLOORS.index(best)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The modules of this project that `path` imports (`from a.b import c` counts a.b.c when that is a module)."""
    here = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    files = [
        p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if p.relative_to(ROOT).parts[1:2] != ("app",)
    ]
    return {module_name(p): imports(p) for p in files}


def test_imports_only_go_down():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if floor(b) > floor(a)]
    assert upward == [], "imports that climb a floor (ARCHITECTURE.md):\n" + "\n".join(upward)


def test_no_module_imports_one_that_imports_it_back():
    full = graph()
    g = {a: {b for b in bs if b in full} for a, bs in full.items()}
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1 or v in g[v]:
                circles.append(sorted(members))

    for v in g:
        if v not in index:
            visit(v)
    assert circles == []


def test_every_wing_says_what_lives_there_and_who_imports_it():
    for wing in [f for f in FLOORS if f.count(".") == 1 or f in ("clients", "strategies")]:
        doc = ast.get_docstring(ast.parse((ROOT.joinpath(*wing.split(".")) / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"{wing}/__init__.py: say what lives there and who may import it"


def test_the_core_does_not_need_flower():
    flower = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "fl_ietagc").rglob("*.py")
        if any(
            isinstance(n, (ast.Import, ast.ImportFrom))
            and any((getattr(n, "module", None) or a.name).split(".")[0] == "flwr" for a in n.names)
            for n in ast.walk(ast.parse(p.read_text()))
        )
    ]
    assert flower == []
