"""Every shell command in the README runs here and prints what the README says it prints.

Commands run as written, through the console script's own ``cli.main``, in an empty folder, with three
substitutions, each because the real thing is not here: ``/data/mytask`` is a generated 2-class
ImageFolder; commands that would train for hours or download weights run with ``--dry-run`` (the
README's own dry-run output is compared line by line); torchrun's 8 processes are one process that
sees ``WORLD_SIZE=8`` (a dry run joins no process group). ``make demo`` and ``make test`` are checked
for what they run (CI runs ``make test`` itself; demo parts 1 and 2 are checked in test_docs.py).
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from fused_ft import cli
from tests.helpers import readme_block

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DATA = "/data/mytask"


def _commands() -> list[list[str]]:
    """The README's bash commands as argv lists: continuations joined, comments dropped, and
    ``fused-ft finetune ...`` expanded to the README's previous finetune command (without its --out)."""
    commands, last_finetune = [], None
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(re.sub(r"(^|\s)#.*$", "", line))
            if not argv:
                continue
            if argv[:3] == ["fused-ft", "finetune", "..."]:
                out = last_finetune.index("--out")
                argv = last_finetune[:out] + last_finetune[out + 2:] + argv[3:]
            elif argv[:2] == ["fused-ft", "finetune"]:
                last_finetune = argv
            commands.append(argv)
    return commands


COMMANDS = _commands()


def test_every_readme_command_has_a_check():
    assert len(COMMANDS) >= 10
    for argv in COMMANDS:
        assert _kind(argv) in CHECKS, f"README command without a check in {__file__}: {shlex.join(argv)}"


def _kind(argv: list[str]) -> str:
    if argv[0] == "torchrun":
        return "torchrun"
    if argv[0] == "make":
        return "make"
    return argv[1] if argv[0] == "fused-ft" else argv[0]


def _run(argv: list[str], tmp_path, monkeypatch, capsys, image_folder) -> tuple[int, list[str], list[str]]:
    monkeypatch.chdir(tmp_path)
    args = [a.replace(DATA, str(image_folder)) for a in argv]
    code = cli.main(args)
    captured = capsys.readouterr()
    out = captured.out.replace(str(image_folder), DATA).splitlines()
    return code, out, captured.err.splitlines()


def _make(argv, tmp_path, monkeypatch, capsys, image_folder):
    # what the target runs, not a second venv and test suite inside this one (CI runs `make test`)
    recipe = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    expected = {"demo": "/bin/fused-ft demo", "test": "-m pytest -n 2 --dist worksteal"}[argv[1]]
    assert expected in recipe, recipe


def _grad_norms(argv, tmp_path, monkeypatch, capsys, image_folder):
    """The README shows a real run (shift-lab models pretrained for 2 minutes); here the pretraining is
    tiny, so the command's path and output format are checked, not the README's numbers."""
    import functools

    from fused_ft.harness.data import shift_lab

    monkeypatch.setenv("FUSED_FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shift_lab, "PretrainRecipe",
                        functools.partial(shift_lab.PretrainRecipe, examples=64, epochs=1, batch_size=32))
    code, out, err = _run(argv[1:] + ["--batches", "2"], tmp_path, monkeypatch, capsys, image_folder)
    assert code == 0, err
    out_dir = argv[argv.index("--out") + 1].rstrip("/")
    assert out[0].split()[:6] == ["#", "layer", "role", "params", "grad", "norm"] and "95% interval" in out[0]
    assert out[-2] == f"wrote {out_dir}/grad_norms.csv, {out_dir}/verdict.json and {out_dir}/grad_norms.png"
    assert re.fullmatch(r"verdict: embedding gradient norm = [\d.]+x the median middle layer \(95% interval "
                        r"[\d.]+-[\d.]+x over 3 head seeds x 2 minibatches; outlier at >= 3x\): "
                        r"(freeze-embed is (recommended|not needed)|not separable).*", out[-1])
    assert (tmp_path / out_dir / "grad_norms.png").read_bytes()[:4] == b"\x89PNG"


def _memory(argv, tmp_path, monkeypatch, capsys, image_folder):
    code, out, err = _run(argv[1:], tmp_path, monkeypatch, capsys, image_folder)
    assert code == 0, err
    models, methods = argv[argv.index("--models") + 1].split(","), argv[argv.index("--methods") + 1].split(",")
    if "--format" not in argv:  # the table of the README's part-1 block
        assert out[0].split() == readme_block("make demo part 1")[0].split()
        assert [line.split()[:2] for line in out[2:]] == [[m, meth] for m in models for meth in methods]
    else:
        rows = [line for line in out if line.startswith("| ")][1:]
        modes = argv[argv.index("--bf16-update") + 1].split(",")
        assert [r.split(" | ")[:2] for r in rows] == [
            [f"| {m}", f"{meth} bf16/{mode} (in-backward)"] for m in models for meth in methods for mode in modes]
        assert out[-1] == "wrote mem.png" and (tmp_path / "mem.png").read_bytes()[:4] == b"\x89PNG"


def _dry_run(argv, tmp_path, monkeypatch, capsys, image_folder):
    """Training for hours or downloading weights is not for a test: the same command as a dry run,
    which checks all of it, prints the plan and writes nothing."""
    args = argv[1:] + ([] if "--dry-run" in argv else ["--dry-run"])
    code, out, err = _run(args, tmp_path, monkeypatch, capsys, image_folder)
    assert code == 0, err
    assert out[0] == "dry run: checked, nothing trained or written"
    if args[0] == "finetune" and "--resume" not in args:
        assert out == readme_block("the dry run of the first command above")
    if args[0] == "sweep":  # 4 methods x 6 lrs x 3 seeds, the table's folder untouched
        assert out[-2].startswith("  runs    72 (seed 0, 1, 2):") and out[-1] == "  out     runs/sweep: 0 runs " \
            "finished, 0 to resume, 72 new"
    assert list(tmp_path.iterdir()) == []


def _torchrun(argv, tmp_path, monkeypatch, capsys, image_folder):
    ranks = int(argv[argv.index("--nproc-per-node") + 1])
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    monkeypatch.setenv("RANK", "0")
    command = argv[argv.index("-m") + 2:]
    code, out, err = _run(command + ["--dry-run"], tmp_path, monkeypatch, capsys, image_folder)
    assert code == 0, err
    assert out[-2].endswith(f"of 256 images over {ranks} ranks")
    assert out[2].startswith("  model   openclip-vit-h14: ") and "tag laion2b_s32b_b79k" in out[2]


def _pip(argv, tmp_path, monkeypatch, capsys, image_folder):
    """Installing is for make dist-check and tests/test_install.py (fresh venvs): here, that the README
    installs this folder with extras that pyproject.toml declares."""
    assert argv[:2] == ["pip", "install"] and len(argv) == 3, argv
    target, _, extras = argv[2].partition("[")
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    declared = set(re.findall(r"^([\w-]+) = \[", section, re.M))
    assert target == "." and set(filter(None, extras.rstrip("]").split(","))) <= declared, (argv, declared)


def _doctor(argv, tmp_path, monkeypatch, capsys, image_folder):
    """The README shows the doctor in make dist-check's fresh venv; here (``fused-ft doctor``, the same
    report) the same rows in the same order, and the extension available."""
    assert argv == ["python", "-m", "fused_ft.doctor"], argv
    code, out, err = _run(["doctor"], tmp_path, monkeypatch, capsys, image_folder)
    assert code == 0, out + err
    rows = [re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out]
    printed = iter(label for label, _ in rows)
    assert all(re.split(r"\s{2,}", line.strip(), maxsplit=1)[0] in printed
               for line in readme_block("python -m fused_ft.doctor")), out
    assert dict(rows)["C++ extension"].startswith("available, built "), out


CHECKS = {"make": _make, "grad-norms": _grad_norms, "memory": _memory, "finetune": _dry_run, "sweep": _dry_run,
          "torchrun": _torchrun, "pip": _pip, "python": _doctor}


@pytest.mark.parametrize("argv", COMMANDS, ids=[f"{i}-{_kind(a)}" for i, a in enumerate(COMMANDS)])
def test_readme_command_runs_and_prints_what_the_readme_shows(argv, tmp_path, monkeypatch, capsys, image_folder):
    CHECKS[_kind(argv)](argv, tmp_path, monkeypatch, capsys, image_folder)
