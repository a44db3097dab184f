"""``make compat``: the core suite under the oldest torch pyproject.toml declares and the newest on PyPI;
with ``--triton-floor``, the Triton-interpreter tests at the triton backend's floor.

One venv per torch version under ``.compat/<version>/`` (git-ignored), each installed from PyPI with its own
constraints file (torch and torchvision pinned), so that neither this machine's pip configuration (which
may cap torch) nor a dependency of the extras can move torch. In each venv:

1. torch (and the torchvision built for it, where PyPI has one), then fused_ft itself, non-editable, with
   ``--no-build-isolation``, so that setup.py builds the C++ extension ahead of time against that torch.
   It is built from a copy of the working tree (``src/``), so the repository's ``build/`` and in-place
   ``_C`` (compiled against the dev torch) are neither reused nor touched;
2. the just-in-time path: the copy's package (no ``_C`` in it) imported with an empty cache must build
   ``fused_ft._C`` with torch.utils.cpp_extension against that torch, and step on the ``cpu`` backend;
3. the core suite (CORE below), from ``run/`` (the tests without the package, so the installed one is
   imported), with a JUnit report for the counts.

``--triton-floor``: the Triton-interpreter tests alone under the torch whose Triton is the triton backend's
floor (``triton_floor`` below), the check behind ``MIN_TRITON``.

Too slow for CI (two CUDA builds of torch, several GB each, two compiles, two suites): run it by hand and
record the table in COMPAT.md. ``python3 tests/compat.py --help`` for the options.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# optimizers, lifecycle, interop/parity, the Triton interpreter and the C++ kernels, distributed
CORE = ["test_parity.py", "test_properties.py", "test_interop.py", "test_interop_default_backend.py",
        "test_lifecycle.py", "test_kernels.py", "test_frozen.py", "test_step_in_backward.py",
        "test_bf16_update.py", "test_validation.py", "test_distributed.py", "test_launch_path.py"]
# the files with Triton-interpreter tests (-k triton selects them: named so, or marked triton)
TRITON_TESTS = ["test_kernels.py", "test_bf16_update.py", "test_step_in_backward.py", "test_lifecycle.py",
                "test_launch_path.py"]
# fused_ft.kernels.triton_launch.MIN_TRITON = (3, 2) is the Triton of this torch
TRITON_FLOOR_TORCH = "2.6.0"

JIT_CHECK = r"""
import json, sys, time, warnings
t0 = time.perf_counter()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fused_ft
    from fused_ft.kernels import native
import torch
info = native.INFO
ok = info.origin == "just in time" and fused_ft.__file__.startswith(sys.argv[1])
if ok:
    p = torch.nn.Parameter(torch.ones(5))
    q = p.detach().clone().requires_grad_()
    mine = fused_ft.AdamW([p], lr=0.1, backend="cpu")
    ref = torch.optim.AdamW([q], lr=0.1)
    for _ in range(3):
        p.grad = torch.arange(5.0)
        q.grad = torch.arange(5.0)
        mine.step()
        ref.step()
    ok = torch.allclose(p, q)
print(json.dumps(dict(ok=bool(ok), origin=info.origin, path=info.path, built_against=info.torch_version,
                      error=info.error, warnings=[str(w.message) for w in caught],
                      seconds=round(time.perf_counter() - t0, 1))))
"""


def newest_torch(python: str) -> str:
    """The newest torch release on PyPI, as pip sees it from this Python (no local indexes, no caps)."""
    out = subprocess.run([python, "-m", "pip", "index", "versions", "torch"], env=pip_env(None),
                         capture_output=True, text=True, check=True).stdout
    return re.search(r"^torch \(([^)]+)\)", out, re.M).group(1)


def oldest_torch() -> str:
    """The floor of ``torch>=X`` in pyproject.toml's dependencies, as a full release (2.5 -> 2.5.0)."""
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([0-9.]+)"', text).group(1)
    parts = floor.split(".") + ["0"] * (3 - len(floor.split(".")))
    return ".".join(parts[:3])


def pip_env(constraints: Path | None) -> dict:
    """pip from PyPI alone: no config file (this machine's caps torch and adds local indexes), no find-links,
    and the venv's own constraints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_DEFAULT_TIMEOUT="180")
    if constraints is not None:
        env["PIP_CONSTRAINT"] = str(constraints)
    return env


def torchvision_for(torch_version: str, python: str) -> tuple[str | None, bool]:
    """The torchvision release built for ``torch_version`` (torch 2.N pairs with torchvision 0.(N+15)), and
    whether PyPI has it. Where it has not (yet), the newest torchvision, to be installed without its
    dependencies (it pins another torch): timm imports it, the optimizers do not."""
    minor, patch = (int(x) for x in torch_version.split("+")[0].split(".")[1:3])
    wanted = f"0.{minor + 15}"
    out = subprocess.run([python, "-m", "pip", "index", "versions", "torchvision"], env=pip_env(None),
                         capture_output=True, text=True).stdout
    match = re.search(r"Available versions: (.*)", out)
    versions = [v.strip() for v in match.group(1).split(",")] if match else []
    paired = [v for v in versions if v == wanted or v.startswith(wanted + ".")]
    if paired:
        same_patch = f"{wanted}.{patch}"  # torch 2.5.1 -> torchvision 0.20.1
        return (same_patch if same_patch in paired else paired[0]), True
    return (versions[0] if versions else None), False


def run(cmd: list[str], log: Path, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    with log.open("a") as out:
        out.write("\n+ " + " ".join(str(c) for c in cmd) + "\n")
        out.flush()
        return subprocess.run(["nice", *map(str, cmd)], stdout=out, stderr=subprocess.STDOUT, **kwargs)


def copy_tree(target: Path, with_package: bool) -> None:
    """The working tree's tracked and untracked-but-not-ignored files (uncommitted edits included)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    if target.exists():
        shutil.rmtree(target)
    for name in filter(None, files):
        if not with_package and name.startswith("fused_ft/"):
            continue
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def prepare_venv(version: str, base: Path, python: str, reinstall: bool, constraint: str,
                 what: str = "") -> tuple[Path, Path, Path, str | None, bool, dict]:
    """``base/version``, created (afresh with ``reinstall``), with an empty ``compat.log`` and a constraints
    file pinning torch, its torchvision where PyPI has one, and ``constraint``: (venv, log, python,
    torchvision, whether it is the one built for this torch, pip's environment)."""
    venv = base / version
    log = venv / "compat.log"
    py = venv / "bin" / "python"
    if reinstall and venv.exists():
        shutil.rmtree(venv)
    if not py.exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    log.write_text("")
    print(f"== torch {version}{what}: {venv} (log: {log})", flush=True)
    vision, paired = torchvision_for(version, str(py))
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={version}\n" + (f"{constraint}\n" if constraint else "")
                           + (f"torchvision=={vision}\n" if paired else ""))
    return venv, log, py, vision, paired, pip_env(constraints)


def one_version(version: str, base: Path, python: str, workers: int, reinstall: bool) -> dict:
    venv, log, py, vision, paired, env = prepare_venv(version, base, python, reinstall, "")
    stamp = venv / ".torch-installed"
    result: dict = dict(torch=version)
    t0 = time.perf_counter()
    if not stamp.exists():
        step = run([py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools>=77", "wheel", "ninja",
                    f"torch=={version}", *([f"torchvision=={vision}"] if paired else [])], log, env=env)
        if step.returncode == 0 and not paired and vision:
            # no torchvision release for this torch yet: the newest, without its (other) torch pin
            step = run([py, "-m", "pip", "install", "-q", "--no-deps", f"torchvision=={vision}"], log, env=env)
        if step.returncode != 0:
            return dict(result, status=f"torch install failed (see {log})")
        stamp.touch()
    result["install_torch_s"] = round(time.perf_counter() - t0)
    result["torchvision"] = (vision or "none") + ("" if paired else " (--no-deps: none built for this torch yet)")

    # fused_ft, non-editable, extension built ahead of time against this torch
    src, tests = venv / "src", venv / "run"
    copy_tree(src, with_package=True)
    copy_tree(tests, with_package=False)
    t0 = time.perf_counter()
    wheels = venv / "wheel"
    shutil.rmtree(wheels, ignore_errors=True)
    step = run([py, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", wheels, src], log,
               env=env, cwd=venv)
    if step.returncode == 0:  # the wheel with its dependencies, [all,test] extras included, within the constraints
        wheel = next(wheels.glob("fused_ft-*.whl"))
        step = run([py, "-m", "pip", "install", "-q", f"{wheel}[all,test]"], log, env=env, cwd=venv)
        if step.returncode == 0:  # the same version number as an earlier run's wheel: replace it
            step = run([py, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel], log, env=env,
                       cwd=venv)
    result["install_fused_ft_s"] = round(time.perf_counter() - t0)
    if step.returncode != 0:
        return dict(result, status=f"fused_ft install failed (see {log})")

    probe = ("import json, sys, torch, fused_ft; from fused_ft.kernels import native; "
             "import importlib.metadata as m\n"
             "def v(n):\n"
             "    try: return m.version(n)\n"
             "    except m.PackageNotFoundError: return None\n"
             "print(json.dumps(dict(python=sys.version.split()[0], torch=torch.__version__, triton=v('triton'), "
             "timm=v('timm'), numpy=v('numpy'), origin=native.INFO.origin, built_against=native.INFO.torch_version, "
             "error=native.INFO.error, file=fused_ft.__file__)))")
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=venv)
    if out.returncode != 0:
        return dict(result, status="import fused_ft failed: " + out.stderr.strip().splitlines()[-1])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(python=info["python"], triton=info["triton"], timm=info["timm"], numpy=info["numpy"])
    result["aot"] = info["origin"] == "ahead of time" and info["built_against"] == info["torch"].split("+")[0]
    result["aot_detail"] = info
    with log.open("a") as f:
        f.write(json.dumps(info) + "\n")
        run([py, "-m", "fused_ft.doctor"], log, cwd=venv)

    # the just-in-time build: the copy's package, which has no _C, into an empty cache
    cache = venv / "jit-cache"
    shutil.rmtree(cache, ignore_errors=True)
    jit_env = dict(os.environ, PYTHONPATH=str(src), FUSED_FT_CACHE=str(cache))
    jit_env.pop("FUSED_FT_BUILD", None)
    out = subprocess.run(["nice", py, "-c", JIT_CHECK, str(src)], capture_output=True, text=True, env=jit_env,
                         cwd=venv)
    with log.open("a") as f:
        f.write("\n+ JIT check\n" + out.stdout + out.stderr)
    try:
        jit = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        jit = dict(ok=False, error=(out.stderr.strip().splitlines() or ["no output"])[-1])
    result["jit"] = jit["ok"]
    result["jit_detail"] = jit

    # the core suite, against the installed package
    pytest_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUSED_FT_CACHE")}
    pytest_env["FUSED_FT_CACHE"] = str(venv / "cache")
    result.update(run_suite(py, venv, tests, CORE, workers, log, pytest_env))
    result["status"] = "ok" if result["pytest_rc"] == 0 and result["aot"] and result["jit"] else "FAILED"
    return result


def run_suite(py: Path, venv: Path, cwd: Path, files: list[str], workers: int, log: Path, env: dict,
              select: list[str] = ()) -> dict:
    """pytest on ``files`` (those that exist under ``cwd/tests``): counts from its JUnit report."""
    report = venv / "junit.xml"
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    step = run([py, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:cacheprovider", f"--junitxml={report}",
                *select, *[f"tests/{name}" for name in files if (cwd / "tests" / name).exists()]],
               log, cwd=cwd, env=env)
    result = dict(suite_s=round(time.perf_counter() - t0), pytest_rc=step.returncode)
    if report.exists():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result.update(passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                      failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"])
        result["not_passed"] = sorted(
            f"{case.get('classname')}::{case.get('name')} [{child.tag}] {(child.get('message') or '')[:200]}"
            for case in suite.iter("testcase") for child in case if child.tag in ("failure", "error", "skipped"))
    return result


def triton_floor(version: str, base: Path, python: str, workers: int, reinstall: bool) -> dict:
    """The Triton-interpreter tests alone under ``version``, the torch whose Triton is fused_ft's MIN_TRITON:
    the check behind that floor. No C++ extension (FUSED_FT_BUILD=0: the triton tests do not need it) and
    numpy<2.4, whose refusal of int() on 1-element arrays breaks older Triton interpreters
    (triton-lang/triton#9171; the interpreter only, not compiled kernels). See COMPAT.md."""
    venv, log, py, vision, paired, pip = prepare_venv(version, base, python, reinstall, "numpy<2.4",
                                                      ", Triton-interpreter tests only")
    result: dict = dict(torch=version, scope="triton interpreter tests", torchvision=vision or "none")
    t0 = time.perf_counter()
    step = run([py, "-m", "pip", "install", "-q", f"torch=={version}", *([f"torchvision=={vision}"] if paired else []),
                "numpy", "tqdm", "ninja", "timm", "pillow", "hypothesis", "pytest", "pytest-xdist"], log, env=pip)
    result["install_torch_s"] = round(time.perf_counter() - t0)
    if step.returncode != 0:
        return dict(result, status=f"install failed (see {log})")
    src = venv / "src"
    copy_tree(src, with_package=True)
    probe = ("import json, sys, torch, triton, numpy; print(json.dumps(dict(python=sys.version.split()[0], "
             "triton=triton.__version__, numpy=numpy.__version__)))")
    info = json.loads(subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout)
    result.update(info)
    env = {k: v for k, v in os.environ.items() if k != "FUSED_FT_CACHE"}
    env.update(PYTHONPATH=str(src), FUSED_FT_BUILD="0")
    result.update(run_suite(py, venv, src, TRITON_TESTS, workers, log, env, select=["-k", "triton", "-W", "ignore"]))
    result["status"] = "ok" if result["pytest_rc"] == 0 and not result.get("skipped") else "FAILED"
    return result


def every_result(base: Path) -> list[dict]:
    """The last result of every venv under ``base``, oldest torch first."""
    found = [json.loads(p.read_text()) for p in base.glob("*/result.json")]
    return sorted(found, key=lambda r: [int(x) for x in r["torch"].split("+")[0].split(".")])


def table(results: list[dict]) -> str:
    head = ["torch", "python", "triton", "torchvision", "extension AOT", "extension JIT", "passed", "failed",
            "skipped", "errors", "suite wall", "status"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    yes = {True: "ok", False: "FAILED", None: "-"}
    for r in results:
        rows.append("| " + " | ".join(str(x) for x in (
            r["torch"] + (f" ({r['scope']}, numpy {r.get('numpy')})" if "scope" in r else ""), r.get("python", "-"),
            r.get("triton", "-"), r.get("torchvision", "-"), yes[r.get("aot")], yes[r.get("jit")], r.get("passed", "-"),
            r.get("failed", "-"), r.get("skipped", "-"),
            r.get("errors", "-"), f"{r['suite_s'] // 60} min {r['suite_s'] % 60} s" if "suite_s" in r else "-",
            r["status"])) + " |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help="torch versions (default: pyproject's floor and PyPI's newest)")
    parser.add_argument("--dir", default=str(ROOT / ".compat"), help="where the venvs go (default: .compat)")
    parser.add_argument("--python", default=sys.executable, help="the Python the venvs are made from")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default: 2)")
    parser.add_argument("--reinstall", action="store_true", help="remove each venv first")
    parser.add_argument("--table", action="store_true", help="only print the table of the venvs' last results")
    parser.add_argument("--triton-floor", action="store_true",
                        help=f"only the Triton-interpreter tests under torch {TRITON_FLOOR_TORCH} (Triton 3.2, the "
                             "triton backend's floor), numpy<2.4, no C++ extension")
    args = parser.parse_args()
    if args.triton_floor and args.versions:
        parser.error(f"--triton-floor takes no versions (it runs torch {TRITON_FLOOR_TORCH}): got {args.versions}")
    base = Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(every_result(base)))
        return 0
    if args.triton_floor:
        versions = [TRITON_FLOOR_TORCH]
    else:
        versions = args.versions or [oldest_torch(), newest_torch(args.python)]
    results = []
    for version in versions:
        t0 = time.perf_counter()
        if args.triton_floor:
            result = triton_floor(version, base, args.python, args.workers, args.reinstall)
        else:
            result = one_version(version, base, args.python, args.workers, args.reinstall)
        result["total_s"] = round(time.perf_counter() - t0)
        results.append(result)
        (base / version / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_detail")}, indent=1), flush=True)
    text = table(every_result(base))  # this run's rows beside the other venvs' last ones
    (base / "table.md").write_text(text + "\n")
    print("\n" + text + f"\n\n(written to {base / 'table.md'}; each venv's result.json and compat.log say more)")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
