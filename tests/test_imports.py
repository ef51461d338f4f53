"""The package's import graph: no cycles among numstab's modules, and no imports hidden inside
functions except of optional dependencies (the dependency graph reads from the top of files)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "numstab"
#: Imported inside functions on purpose: optional dependencies (a missing one must not break
#: ``import numstab``), the POSIX/Windows file-lock modules, and ml_dtypes (slow to import:
#: only where a format of its own is used, tests/test_lazy_imports.py).
OPTIONAL = {"cupy", "cupyx", "torch", "jax", "dask", "distributed", "matplotlib", "hypothesis",
            "array_api_strict", "sklearn", "numba", "fcntl", "msvcrt", "ml_dtypes"}  # fmt: skip
#: Modules imported on first use (by full name): scipy.sparse, slow to import, where a run
#: builds its gather matrix (tests/test_lazy_imports.py); numstab.teamkernels, which imports
#: numba (optional) at its top so that numba caches its compiled region bodies on disk.
LAZY = {"scipy.sparse", "numstab.teamkernels"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: dict) -> str | None:
    """The numstab module an import resolves to (a submodule if it is one, else its parent)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _edges(mod: str, path: pathlib.Path, modules: dict, *, top_level: bool):
    tree = ast.parse(path.read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in funcs for n in ast.walk(f)}
    # module level (including try/except and if blocks at the top), or inside functions
    nodes = [n for n in ast.walk(tree) if (id(n) in inner) != top_level]
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        yield from names


def test_no_import_cycles_among_numstab_modules():
    modules = _modules()
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        for name in _edges(mod, path, modules, top_level=True):
            if name.split(".")[0] == "numstab":
                t = _target(name, modules)
                if t and t != mod:
                    graph[mod].add(t)
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append([*stack[stack.index(m):], m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_function_local_imports_except_optional_dependencies():
    modules = _modules()
    hidden = []
    for mod, path in modules.items():
        for name in _edges(mod, path, modules, top_level=False):
            if name.split(".")[0] not in OPTIONAL and name not in LAZY:
                hidden.append(f"{mod}: {name}")
    assert not hidden, "function-local imports: " + ", ".join(sorted(set(hidden)))
