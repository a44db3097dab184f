"""The CLI's promise: a bad input exits with status 2 and one line on stderr, no traceback, no files.

Each case of the issue's list runs `fused-ft` in a subprocess, in an empty directory, as a user would;
the cases found later run through cli.main in-process (see FOUND_CASES). (Resume and damaged checkpoints
are also tested against real runs in tests/test_finetune.py.)
"""
import io
import subprocess
import sys

import pytest
import torch
from PIL import Image

CASES = {
    "unknown method": ["finetune", "--method", "sgdx", "--lr", "0.1"],
    "no learning rate": ["finetune", "--method", "sgd"],
    "negative learning rate": ["finetune", "--method", "sgd", "--lr", "-1"],
    "seeds not integers": ["sweep", "--seeds", "a"],
    "zero jobs": ["sweep", "--jobs", "0"],
    "bad bf16 update": ["memory", "--param-dtype", "bf16", "--bf16-update", "round"],
    "bad param dtype": ["memory", "--param-dtype", "fp16"],
    "unknown model": ["memory", "--models", "no_such_model", "--methods", "sgd"],
    "unknown memory method": ["memory", "--models", "vit_tiny_patch16_224", "--methods", "adam"],
    "plot into a missing folder": ["memory", "--models", "vit_tiny_patch16_224", "--plot", "no/such/dir/m.png"],
    "plot onto a folder": ["memory", "--models", "vit_tiny_patch16_224", "--plot", "."],
    "sweep plot into a missing folder": ["sweep", "--plot", "missing/s.png"],
    # these load the data first: the run directory must not be created before the model is built
    "checkpoint for a shift-lab model": ["finetune", "--method", "sgd", "--lr", "0.01", "--checkpoint", "/no/such.pt"],
    "unknown model to fine-tune": ["finetune", "--model", "no_such_model", "--method", "sgd", "--lr", "0.01"],
    "missing checkpoint in a dry run": ["finetune", "--model", "vit_tiny_patch16_224", "--method", "sgd", "--lr",
                                        "0.01", "--checkpoint", "/no/such.pt", "--dry-run"],
}
# Found by trying every option with a bad value (each gave a traceback, or exit 0 having done nothing).
# They run in-process through cli.main, which the console script calls: a subprocess per case cost the
# suite a minute of imports, and an uncaught exception fails the test just as a traceback would.
FOUND_CASES = {
    "device that does not exist": ["finetune", "--method", "sgd", "--lr", "0.01", "--device", "foo"],
    "fsdp without torchrun": ["finetune", "--method", "sgd", "--lr", "0.01", "--fsdp"],
    "fsdp without torchrun, dry run": ["finetune", "--method", "sgd", "--lr", "0.01", "--fsdp", "--dry-run"],
    "embedding pattern that is no regex": ["grad-norms", "--model", "vit_tiny_patch16_224", "--embed-pattern", "["],
    "image size the model cannot take": ["grad-norms", "--model", "vit_tiny_patch16_224", "--image-size", "7"],
    "zero images per minibatch": ["grad-norms", "--model", "vit_tiny_patch16_224", "--batch-size", "0"],
    "no methods": ["sweep", "--methods", ",", "--dry-run"],
    "negative data workers": ["finetune", "--method", "sgd", "--lr", "0.01", "--num-workers", "-1"],
    "shift-lab pretraining optimizer that does not exist": ["finetune", "--method", "sgd", "--lr", "0.01",
                                                            "--pretrained", "bogus"],
    "the same, dry run (it passed)": ["finetune", "--method", "sgd", "--lr", "0.01", "--pretrained", "bogus",
                                      "--dry-run"],
    "a 224-px model on 32-px data": ["finetune", "--model", "vit_tiny_patch16_224", "--method", "sgd", "--lr", "0.01"],
    "repeated seeds": ["sweep", "--seeds", "0,0", "--dry-run"],
    "repeated learning rates": ["sweep", "--lr-sweep", "0.01,0.01", "--dry-run"],
}
if not torch.cuda.is_available():  # what CI is: a machine without a GPU asked for one
    FOUND_CASES["cuda on a machine without one"] = ["finetune", "--method", "sgd", "--lr", "0.01", "--device", "cuda"]

# bad inputs that need files to exist first: (args, {path: bytes}); the files must come out unchanged
_NOT_AN_IMAGE = b"not an image"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


_PNG = _png()
_FOLDER = {f"data/{split}/a/0.png": _PNG for split in ("train", "id_val", "id_test", "ood_test")}
_TOO_SMALL = ["finetune", "--model", "vit_tiny_patch16_224", "--data", "imagefolder:data", "--image-size", "7",
              "--method", "sgd", "--lr", "0.01"]
FOUND_CASES_WITH_FILES = {
    "image size the model cannot take, on real images": (_TOO_SMALL, _FOLDER),
    "the same, dry run": (_TOO_SMALL + ["--dry-run"], _FOLDER),
}
CASES_WITH_FILES = {
    "--out is a file": (["finetune", "--method", "sgd", "--lr", "0.01", "--out", "afile"], {"afile": b"x"}),
    "sweep --out is a file": (["sweep", "--out", "afile"], {"afile": b"x"}),
    "grad-norms --out inside a file": (["grad-norms", "--model", "vit_tiny_patch16_224", "--out", "afile/gn"],
                                       {"afile": b"x"}),
    "damaged checkpoint on --resume": (["finetune", "--method", "sgd", "--lr", "0.01", "--out", "run", "--resume"],
                                       {"run/checkpoint.pt": b"PK\x03\x04 truncated"}),
    "unreadable image": (["finetune", "--model", "vit_tiny_patch16_224", "--data", "imagefolder:data", "--method",
                          "sgd", "--lr", "0.01", "--out", "run"],
                         {f"data/{split}/a/0.png": _NOT_AN_IMAGE for split in ("train", "id_val", "id_test")}),
    "missing data folder": (["finetune", "--data", "imagefolder:nowhere", "--method", "sgd", "--lr", "0.01"], {}),
}


def _run(args, cwd):
    return subprocess.run([sys.executable, "-m", "fused_ft.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def _create(root, files):
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return _files(root)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("fused-ft ") and "error:" in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("args,files", [(a, {}) for a in CASES.values()] + list(CASES_WITH_FILES.values()),
                         ids=list(CASES) + list(CASES_WITH_FILES))
def test_bad_input_gives_one_line_and_status_2(args, files, tmp_path):
    before = _create(tmp_path, files)
    result = _run(args, tmp_path)
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    if args[-2:] == ["--lr", "-1"]:  # the optimizers' own rule and words (the CLI said "> 0", the API ">= 0")
        assert "Invalid lr: -1.0 (must be >= 0)" in line
    assert _files(tmp_path) == before  # nothing written, nothing changed


@pytest.mark.parametrize("args,files", [(a, {}) for a in FOUND_CASES.values()] + list(FOUND_CASES_WITH_FILES.values()),
                         ids=list(FOUND_CASES) + list(FOUND_CASES_WITH_FILES))
def test_more_bad_input_gives_one_line_and_status_2_in_process(args, files, tmp_path, monkeypatch, capsys):
    from fused_ft import cli

    before = _create(tmp_path, files)
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(args)
    except SystemExit as exit_:  # argparse's errors exit
        code = exit_.code
    assert code == 2
    _one_error_line(capsys.readouterr().err)
    assert _files(tmp_path) == before


def test_a_plain_timm_name_that_open_clip_also_knows_is_timms(tmp_path):
    # the README's example: convnext_base is a timm model and an open_clip tower; a bare name is timm's
    result = _run(["memory", "--models", "convnext_base", "--methods", "sgd-freeze-embed", "--format", "csv"],
                  tmp_path)
    assert result.returncode == 0, result.stderr
    assert "convnext_base,sgd-freeze-embed" in result.stdout
