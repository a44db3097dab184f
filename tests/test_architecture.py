"""The package's layering, checked statically: what `import fused_ft` loads, no import cycle between
the optimizers, the kernels and the dispatcher, no private names taken from a sibling, and a backend
contract a reader (or grep) can follow from an optimizer to the functions that run it."""
import ast
import subprocess
import sys
from pathlib import Path

import fused_ft
from fused_ft.optim import _dispatch

PACKAGE = Path(fused_ft.__file__).parent
# the dispatcher first: it lies inside optim, and _unit takes the first match
UNITS = ("fused_ft.optim._dispatch", "fused_ft.optim", "fused_ft.kernels")


def _modules() -> dict[str, Path]:
    return {".".join(("fused_ft", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import in the file, function-level ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.append((base, [a.name for a in node.names]))
    return found


def _unit(module: str) -> str | None:
    return next((u for u in UNITS if module == u or module.startswith(u + ".")), None)


def test_import_fused_ft_loads_no_test_data_and_nothing_it_does_not_need():
    # fused_ft.testing: the test registry; torch.distributed.tensor: 0.6 s (sympy) that only sharded
    # parameters need, and they come with it imported
    code = ("import sys, fused_ft, fused_ft.cli; print(sorted(m for m in sys.modules "
            "if m.startswith('fused_ft.testing') or m == 'torch.distributed.tensor'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycle_between_optim_kernels_and_dispatch():
    modules = _modules()
    edges: dict[str, set[str]] = {u: set() for u in UNITS}
    for name, path in modules.items():
        source = _unit(name)
        if source is None:
            continue
        targets = []
        for module, names in _imports(name, path):
            targets.append(module)
            targets += [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
        if name == "fused_ft.optim._dispatch":  # the backend modules it imports by name
            targets += list(_dispatch._MODULES.values())
        edges[source] |= {u for t in targets if (u := _unit(t)) not in (None, source)}
    for a in UNITS:  # three nodes: a cycle is a pair, or a triangle
        for b in edges[a]:
            assert a not in edges[b], f"cycle: {a} <-> {b} ({edges})"
            for c in edges[b]:
                assert a not in edges.get(c, ()), f"cycle: {a} -> {b} -> {c} -> {a} ({edges})"


def test_no_module_takes_a_private_name_from_a_sibling():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        for module, names in _imports(name, path):
            if not module.startswith("fused_ft") or module == name:
                continue
            for n in names:
                is_module = f"{module}.{n}" in modules
                if n.startswith("_") and not is_module and n != "_C":  # _C: the compiled extension itself
                    offenders.append(f"{name} imports {module}.{n}")
    assert not offenders, offenders


def test_every_backend_module_has_the_same_contract_and_plain_names():
    for backend in _dispatch._MODULES:
        module = _dispatch._module(backend)
        assert callable(module.unavailable_reason) and callable(module.unsupported_reason), backend
        assert set(module.UPDATES) == {"sgd", "adamw", "lars", "lamb", "lamb_clip"}, backend
        for update, fn in module.UPDATES.items():
            assert fn.__name__ == update and fn.__module__ == module.__name__, (backend, update, fn)
    source = Path(_dispatch.__file__).read_text()
    assert "getattr(" not in source and "{opt}" not in source and ".format(" not in source
