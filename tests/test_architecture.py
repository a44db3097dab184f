"""The package's layering: each part imports only the parts below it (checked statically, and for
optim and kernels also by importing them alone), what `import fused_ft` loads, no import cycle between
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

# The parts, bottom to top: a module imports from its own part and from parts of lower rank only.
# integrations/ and testing/ stand beside vision/ (the same rank, so neither imports the other or vision):
# they use the optimizers, and no part of the package imports them. fused_ft._C is the compiled extension
# that kernels/native.py loads.
RANKS = {"ground": 0, "kernels": 1, "optim": 2, "vision": 3, "integrations": 3, "testing": 3, "memory": 4,
         "harness": 5, "top": 6}
GROUND = {"fused_ft._validation", "fused_ft._precision", "fused_ft._dtensor", "fused_ft._extras", "fused_ft._tables"}
TOP = {"fused_ft", "fused_ft.cli", "fused_ft.doctor"}
FOLDERS = ("kernels", "optim", "vision", "integrations", "testing", "memory", "harness")
EXTRAS = ("timm", "open_clip", "matplotlib", "torchvision")


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


def _part(module: str) -> str:
    """The part a fused_ft module belongs to; AssertionError for a module in none (a new root module, say)."""
    if module in GROUND:
        return "ground"
    if module in TOP:
        return "top"
    if module == "fused_ft._C":
        return "kernels"
    folder = module.split(".")[1]
    assert folder in FOLDERS, f"{module} lies in no part"
    return folder


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """The fused_ft modules a file imports: ``from fused_ft.x import y`` is fused_ft.x.y where y is a module."""
    found = []
    for module, names in _imports(name, path):
        if module != "fused_ft" and not module.startswith("fused_ft."):
            continue
        submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules or f"{module}.{n}" == "fused_ft._C"]
        found += submodules if names and len(submodules) == len(names) else [module, *submodules]
    return found


def _unit(module: str) -> str | None:
    return next((u for u in UNITS if module == u or module.startswith(u + ".")), None)


def test_import_fused_ft_loads_no_test_data_and_nothing_it_does_not_need():
    # fused_ft.testing: the test registry; torch.distributed.tensor: 0.6 s (sympy) that only sharded
    # parameters need, and they come with it imported
    # timm, open_clip, matplotlib, torchvision: the extras, imported only by the functions that need them
    code = ("import sys, fused_ft, fused_ft.cli; print(sorted(m for m in sys.modules "
            "if m.startswith('fused_ft.testing') or m == 'torch.distributed.tensor' "
            f"or m.split('.')[0] in {EXTRAS!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_module_belongs_to_a_part():
    unplaced = []
    for name in _modules():
        try:
            _part(name)
        except AssertionError:
            unplaced.append(name)
    assert not unplaced, f"place these in a folder (or in GROUND/TOP, and RANKS): {unplaced}"


def test_each_part_imports_only_the_parts_below_it():
    # function-level imports count too: a lazy upward import is still an upward dependency
    modules = _modules()
    upward = []
    for name, path in modules.items():
        source = _part(name)
        targets = _imported_modules(name, path, modules)
        if name == "fused_ft.optim._dispatch":  # the backend modules it imports by name
            targets += list(_dispatch._MODULES.values())
        for target in targets:
            part = _part(target)
            if part != source and RANKS[part] >= RANKS[source]:
                upward.append(f"{name} ({source}) imports {target} ({part})")
    assert not upward, upward


def test_optim_and_kernels_load_alone_with_torch_alone():
    # fused_ft/__init__.py imports every part, so a plain `import fused_ft.optim` would load vision, memory
    # and harness whatever optim imports: an empty package object stands in for it
    names = sorted(n for n in _modules() if _part(n) in ("ground", "kernels", "optim"))
    code = ("import importlib, importlib.util, sys, types\n"
            "spec = importlib.util.find_spec('fused_ft')\n"
            "package = types.ModuleType('fused_ft')\n"
            "package.__path__ = list(spec.submodule_search_locations)\n"
            "sys.modules['fused_ft'] = package\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('fused_ft.') or m.split('.')[0] in "
            f"{EXTRAS!r}))\n")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = ast.literal_eval(loaded)
    assert "fused_ft.optim.sgd" in loaded and "fused_ft.kernels.cpu" in loaded, loaded  # the imports ran
    extras = [m for m in loaded if m.split(".")[0] in EXTRAS]
    above = [m for m in loaded if m.startswith("fused_ft.") and _part(m) not in ("ground", "kernels", "optim")]
    assert not extras, f"importing optim and kernels alone loads an extra's modules: {extras}"
    assert not above, f"importing optim and kernels alone loads parts above them: {above}"


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
        assert module.SCALER_IN_KERNEL <= {"sgd", "adamw", "lars", "lamb"}, backend
        for update, fn in module.UPDATES.items():
            assert fn.__name__ == update and fn.__module__ == module.__name__, (backend, update, fn)
    source = Path(_dispatch.__file__).read_text()
    assert "getattr(" not in source and "{opt}" not in source and ".format(" not in source
