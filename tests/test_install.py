"""Installing fused_ft as users do, and its C++ extension built just in time.

What the checks stand for, and what they leave to ``make dist-check``:

- The wheel (built by ``python -m build`` from the sdist, with pip's build isolation, so without
  torch and without an ahead-of-time extension) installs with default pip settings into a fresh venv
  that already has torch; the extras stay out; tests/install_smoke.py steps every optimizer on the
  ``cpu`` backend and runs the doctor there. The venv sees the dev venv's torch through a ``.pth``
  line to a folder of links to torch and its dependencies only (never to fused_ft or the extras);
  pip never removes what lies outside the venv it installs into. Compiling the real csrc/ takes
  minutes on 2 cores, so the extension's cache is seeded with the ahead-of-time build of the same
  sources; ``make dist-check`` runs the same smoke test after a real just-in-time build into an
  empty cache.
- The compile, its cache and its lock are tested on a small extension through the same function.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fused_ft.kernels import _jit, native

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("timm", "open_clip_torch", "matplotlib")

# Runs a snippet with the ahead-of-time fused_ft._C hidden, as in a wheel built without torch.
HIDE_AOT = """
import importlib.abc, sys
class _HideAOT(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fused_ft._C":
            raise ImportError("cannot import name '_C' from 'fused_ft' (hidden by the test)")
sys.meta_path.insert(0, _HideAOT())
"""


def _env(**changes: str | None) -> dict:
    # as a user's shell has it: conftest's TRITON_INTERPRET=1 is the suite's, not theirs
    env = {k: v for k, v in os.environ.items()
           if k not in ("FUSED_FT_BUILD", "FUSED_FT_CACHE", "CXX", "TRITON_INTERPRET")}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


def _wheel_env(**changes: str | None) -> dict:
    # the installed wheel, not a source tree that PYTHONPATH puts first (and whose fused_ft.egg-info, written
    # by python -m build, makes pip take fused_ft as installed already)
    return {k: v for k, v in _env(**changes).items() if k != "PYTHONPATH"}


def _seed_cache(cache: Path) -> Path:
    """The just-in-time build's folder for this torch and these sources, holding the ahead-of-time build of
    the same sources (compiling csrc/ again would take minutes)."""
    aot = sorted((ROOT / "fused_ft").glob("_C.*.so"))
    assert aot, "the ahead-of-time build fused_ft/_C.*.so is missing: run make (pip install -e . with torch)"
    arguments = native.jit_arguments()
    directory = _jit.build_directory(arguments["name"], arguments["sources"] + arguments["headers"],
                                     arguments["cflags"], arguments["ldflags"], root=cache / "extensions")
    directory.mkdir(parents=True)
    shutil.copy(aot[0], directory / "_C.so")
    (directory / _jit.MARKER).write_text(json.dumps({"seeded by": __file__}))
    return directory


def test_build_turned_off_or_no_compiler_costs_are_said_once(tmp_path):
    code = HIDE_AOT + """
import warnings, torch, fused_ft
from fused_ft.kernels import native
q = torch.ones(3, requires_grad=True); q.grad = torch.ones(3)
fused_ft.SGD([q], lr=0.5).step()  # auto on CPU: would warn again that backend='cpu' is missing
try:
    fused_ft.SGD([q], lr=0.5, backend="cpu").step()
except fused_ft.BackendUnavailableError as exc:
    print(exc)
print(native.INFO.error)
"""
    runs = {
        "off": subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env(FUSED_FT_BUILD="0", FUSED_FT_CACHE=str(tmp_path / "off"))),
        "no compiler": subprocess.Popen([sys.executable, "-W", "default", "-c", code], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True,
                                        env=_env(CXX=str(tmp_path / "no-such-c++"), FUSED_FT_CACHE=str(tmp_path))),
    }
    out = {name: proc.communicate(timeout=300) for name, proc in runs.items()}
    assert all(proc.returncode == 0 for proc in runs.values()), out

    stdout, stderr = out["off"]
    assert "NativeExtensionWarning" not in stderr and "building" not in stderr, stderr  # asked for: no warning
    assert re.search(r"backend='cpu' needs the C\+\+ extension.*FUSED_FT_BUILD=0.*unset FUSED_FT_BUILD", stdout)
    assert not (tmp_path / "off").exists()  # nothing was built, nor a folder made

    stdout, stderr = out["no compiler"]
    assert stderr.count("Warning") == 1, stderr  # one warning: the import's; auto's fallback adds none
    assert re.search(r"NativeExtensionWarning: fused_ft's C\+\+ extension is unavailable: no C\+\+ compiler "
                     r".*backend='cpu' is unavailable.*runs in Python, several times slower per step\. "
                     r"Fix: install a C\+\+ compiler", stderr), stderr
    assert "building" not in stderr and "no C++ compiler" in stdout.splitlines()[-1]


TINY = """#include <pybind11/pybind11.h>
int twice(int x) { return 2 * x; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("twice", &twice); }
"""

WORKER = """
import sys, time
from pathlib import Path
from fused_ft.kernels import _jit
tmp = Path(sys.argv[1])
(tmp / f"ready-{sys.argv[2]}").touch()
while not (tmp / "go").exists():
    time.sleep(0.01)
module, directory = _jit.load("tiny", [tmp / "tiny.cpp"], [], ["-O0"], [], root=tmp / "cache")
print(directory, module.twice(21))
"""


def _workers(tmp_path: Path, names: list[str], **popen) -> list[subprocess.Popen]:
    (tmp_path / "go").unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(), **popen) for name in names]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in names):  # all imported: start them at once
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    return procs


def test_processes_that_start_at_once_build_once_and_a_killed_build_blocks_nobody(tmp_path, capfd):
    (tmp_path / "tiny.cpp").write_text(TINY)
    # a build killed mid-way (an OOM-killed rank): it holds the lock when it dies, and leaves no marker
    [killed] = _workers(tmp_path, ["killed"], start_new_session=True)
    for line in killed.stderr:
        if "building" in line:
            break
    os.killpg(killed.pid, signal.SIGKILL)  # its own session: the compiler it started dies with it
    killed.wait(timeout=60)
    assert not list((tmp_path / "cache").glob(f"*/{_jit.MARKER}"))

    # 4 processes against that cache at the same moment: one builds, the others wait and load its build
    procs = _workers(tmp_path, [str(i) for i in range(4)])
    results = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    outputs = {out.strip() for out, _ in results}
    assert len(outputs) == 1 and next(iter(outputs)).endswith(" 42"), results
    stderr = "".join(err for _, err in results)
    assert stderr.count("building the C++ extension tiny") == 1, stderr
    assert stderr.count("built tiny in") == 1 and stderr.count("waiting for another process") >= 1, stderr

    # later, this process loads the cached build without a word
    module, directory = _jit.load("tiny", [tmp_path / "tiny.cpp"], [], ["-O0"], [], root=tmp_path / "cache")
    assert f"{directory} {module.twice(21)}" == outputs.pop()
    assert capfd.readouterr().err == ""


def _torch_closure() -> list[importlib.metadata.Distribution]:
    """torch and what it requires, as installed in this environment."""
    from packaging.requirements import Requirement

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [Requirement("torch")]
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen[name] = importlib.metadata.distribution(name)
        todo += [Requirement(r) for r in seen[name].requires or []]
    return list(seen.values())


def _venv_with_torch(tmp_path: Path) -> Path:
    """A fresh venv whose only packages are links to this environment's torch and its dependencies."""
    shim = tmp_path / "torch-from-dev-venv"
    shim.mkdir()
    for dist in _torch_closure():
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "bin", "__pycache__"}
        for top in tops:
            if (base / top).exists() and not (shim / top).exists():
                (shim / top).symlink_to(base / top)
    assert not list(shim.glob("fused_ft*")) and not any(list(shim.glob(f"{e}*")) for e in EXTRAS)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = list(venv.glob("lib/python*/site-packages"))
    (site / "torch-from-dev-venv.pth").write_text(f"{shim}\n")
    return venv


def test_the_wheel_installs_into_a_venv_with_torch_and_steps_on_the_cpu_backend(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], capture_output=True,
                           text=True, timeout=600, env=_env())
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    [wheel], [sdist] = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    csrc = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("fused_ft/csrc/")) == csrc
    assert not [n for n in names if n.endswith((".so", ".pyd", ".o"))], names  # pure: no torch at build time
    assert wheel.name.endswith("-py3-none-any.whl")
    assert all(f"csrc/{name}" in subprocess.run(["tar", "tzf", str(sdist)], capture_output=True, text=True).stdout
               for name in csrc)

    venv = _venv_with_torch(tmp_path)
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", str(wheel)],
                             capture_output=True, text=True, timeout=600, env=_wheel_env())
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    [site] = list(venv.glob("lib/python*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"fused_ft", "ninja"} <= installed and "torch" not in installed, installed
    assert not installed & set(EXTRAS), installed

    cache = tmp_path / "cache"
    _seed_cache(cache)  # the wheel's copies of csrc/ give the same key, else the smoke test sees a build
    smoke = subprocess.run([str(python), str(ROOT / "tests" / "install_smoke.py"), "--prefix", str(venv),
                            "--cache", str(cache)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           env=_wheel_env(FUSED_FT_CACHE=str(cache)))
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert "smoke test passed" in smoke.stdout and "building" not in smoke.stderr, smoke.stderr


def test_a_missing_extra_is_named_in_one_line(monkeypatch, capsys, tmp_path):
    import fused_ft
    from fused_ft import cli
    from fused_ft.harness import diagnostics, sweep
    from fused_ft.memory import report
    from fused_ft._extras import MissingExtraError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails as where it is not installed
    with pytest.raises(MissingExtraError, match=r"^the timm model 'resnet10t' needs timm, which is not "
                                                r"installed: pip install 'fused_ft\[vision\]'$"):
        fused_ft.create_model("timm:resnet10t", 2)
    assert cli.main(["grad-norms", "--model", "resnet10t", "--data", "noise"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"fused-ft grad-norms: error: .*needs timm, which is not installed: "
                        r"pip install 'fused_ft\[vision\]'\n", err), err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plots = [(report.plot_memory_table, "plotting the memory table"),
             (sweep.plot_sweep, "plotting a sweep"), (diagnostics.plot_grad_norms, "plotting gradient norms")]
    for plot, what in plots:
        with pytest.raises(MissingExtraError, match=rf"^{what} needs matplotlib, which is not installed: "
                                                    r"pip install 'fused_ft\[plots\]'$"):
            plot([], tmp_path / "plot.png")


def test_grad_norms_without_matplotlib_measures_writes_and_says_its_verdict(monkeypatch, capsys, tmp_path):
    """The plot is grad-norms' by-product: without [plots] the measurement, its CSV and JSON and the verdict
    still come, and the PNG is skipped in one line naming the extra (it used to fail after the work)."""
    from fused_ft import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "norms"
    assert cli.main(["grad-norms", "--model", "vit_tiny_patch16_224", "--image-size", "32", "--num-classes", "3",
                     "--data", "noise", "--batches", "2", "--batch-size", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("fused-ft grad-norms: skipped grad_norms.png: plotting gradient norms needs matplotlib, "
                            "which is not installed: pip install 'fused_ft[plots]'\n")
    assert sorted(p.name for p in out.iterdir()) == ["grad_norms.csv", "verdict.json"]
    assert f"wrote {out / 'grad_norms.csv'}, {out / 'verdict.json'}\n" in captured.out
    assert "\nverdict: " in captured.out
