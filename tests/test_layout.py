"""Import rules of the package layout: models/ is pure torch, preprocessing never depends on tools, no cycles.

Every import counts, at module level or inside a function (a lazy import is still a dependency); only imports under
``if TYPE_CHECKING:`` (annotations) are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "scellst"
FILES = {
    ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in ROOT.rglob("*.py")
}
PACKAGES = {m for m, p in FILES.items() if p.name == "__init__.py"}


def _nodes(tree: ast.AST):
    """Import nodes, skipping the bodies of ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _nodes_of(child))
            continue
        yield from _nodes_of(node)


def _nodes_of(node: ast.AST):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _nodes(node)


def _raw_imports(module: str) -> list[tuple[str, str | None]]:
    package = module if module in PACKAGES else module.rsplit(".", 1)[0]
    out = []
    for node in _nodes(ast.parse(FILES[module].read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("scellst"):
                out += [(target, alias.name) for alias in node.names]
        else:
            out += [(alias.name, None) for alias in node.names if alias.name.startswith("scellst")]
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the scellst modules it imports (names re-exported by a package resolve to their defining module)."""
    defined_in = {
        (package, name): target
        for package in PACKAGES
        for target, name in _raw_imports(package)
        if name and target in FILES and target != package
    }
    graph = {}
    for module in FILES:
        if module in PACKAGES:
            continue
        deps = set()
        for target, name in _raw_imports(module):
            full = f"{target}.{name}" if name else target
            if full in FILES and full not in PACKAGES:
                deps.add(full)
            elif target in PACKAGES and name and (target, name) in defined_in:
                deps.add(defined_in[(target, name)])
            elif target in FILES and target not in PACKAGES:
                deps.add(target)
        deps.discard(module)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_models_import_none_of_io_im_pp_tl_bench_pl():
    bad = [(m, d) for m, deps in _graph().items() if _room(m) == "models" for d in deps
           if _room(d) in ("io", "im", "pp", "tl", "bench", "pl")]  # fmt: skip
    assert not bad, f"models/ must stay pure torch: {bad}"


def test_rooms_follow_the_data():
    """image -> bags -> model -> cell table: earlier rooms never import later ones (benchmarking comes last)."""
    later = {"io": ("pp", "tl", "bench", "pl"), "im": ("tl", "bench", "pl"), "pp": ("tl", "bench"), "tl": ("bench",)}
    bad = [(m, d) for m, deps in _graph().items() for d in deps if _room(d) in later.get(_room(m), ())]
    assert not bad, f"a room imports a later one: {bad}"


def test_moved_names_still_work_and_warn():
    import importlib

    import scellst
    from scellst._moved import MOVED

    for namespace, names in MOVED.items():
        for name, target in names.items():
            with pytest.warns(FutureWarning, match=f"scellst.{target}.{name}"):
                old = getattr(getattr(scellst, namespace), name)
            assert old is getattr(importlib.import_module(f"scellst.{target}"), name)
            assert name not in getattr(scellst, namespace).__all__
    with pytest.raises(AttributeError):
        scellst.tl.no_such_function  # noqa: B018


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_rules_see_lazy_imports_and_cycles():
    """The checker itself: a function-level import counts, and a two-module cycle is found."""
    graph = _graph()
    assert "scellst.models._registry" in graph["scellst.models._mil"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_element_keys_live_in_constants():
    """Default element names and the attribute root are written once, in `_constants.py`."""
    import re

    literal = re.compile(
        r'(uns|attrs)\["scellst"\]|obs\["predicted_type"\]|= "(he|xenium_cells|xenium_nuclei|xenium_table)"'
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in ROOT.rglob("*.py")
        if path.name != "_constants.py"
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if literal.search(line)
    ]
    assert offenders == []
