"""Smoke test of an installed fused_ft, run by the installed environment's python (tests/test_install.py
and ``make dist-check``); not collected by pytest.

It checks what a user who ran ``pip install fused_ft`` without extras gets: the package imports from
that environment (not from a source tree), timm, open_clip and matplotlib were not pulled in, the C++
extension is loaded the expected way, ``backend='cpu'`` is what auto picks on CPU, one step of each
optimizer on the ``cpu`` backend equals the reference (torch.optim for SGD and AdamW; timm's Lars and
Lamb where timm is installed, else fused_ft's reference backend), and the doctor's report has the
extension as available.

    python tests/install_smoke.py --prefix VENV [--origin "just in time"] [--cache DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

EXTRAS = ("timm", "open_clip", "matplotlib")
SHAPES = [(), (0,), (3, 5), (1027,), (2, 3, 4)]  # 0-dim, empty, odd sizes, above and below a SIMD width


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def _two_steps(make, seed: int = 0) -> list[torch.Tensor]:
    params = _params(seed)
    optimizer = make(params)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(2):  # the second step reads the state the first one wrote
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach() for p in params]


def check_optimizers() -> list[str]:
    import fused_ft

    have_timm = importlib.util.find_spec("timm") is not None
    if have_timm:
        from timm.optim import Lamb, Lars
    cases = {
        "SGD": (lambda p: fused_ft.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True, backend="cpu"),
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True), "torch.optim"),
        "AdamW": (lambda p: fused_ft.AdamW(p, lr=1e-2, weight_decay=1e-2, backend="cpu"),
                  lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2), "torch.optim"),
        "LARS": (lambda p: fused_ft.LARS(p, lr=0.1, momentum=0.9, weight_decay=1e-4, backend="cpu"),
                 (lambda p: Lars(p, lr=0.1, momentum=0.9, weight_decay=1e-4)) if have_timm else
                 (lambda p: fused_ft.LARS(p, lr=0.1, momentum=0.9, weight_decay=1e-4, backend="reference")),
                 "timm" if have_timm else "fused_ft reference"),
        "LAMB": (lambda p: fused_ft.LAMB(p, lr=1e-2, weight_decay=1e-2, backend="cpu"),
                 (lambda p: Lamb(p, lr=1e-2, weight_decay=1e-2)) if have_timm else
                 (lambda p: fused_ft.LAMB(p, lr=1e-2, weight_decay=1e-2, backend="reference")),
                 "timm" if have_timm else "fused_ft reference"),
    }
    lines = []
    for name, (ours, reference, against) in cases.items():
        got, expected = _two_steps(ours), _two_steps(reference)
        for i, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} param {i}: {m}")
        lines.append(f"{name}: 2 steps on backend='cpu' equal {against}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", required=True, type=Path, help="the environment fused_ft must come from")
    parser.add_argument("--origin", default="just in time", help="how the C++ extension must have been built")
    parser.add_argument("--cache", type=Path, help="the folder the just-in-time build must lie in")
    args = parser.parse_args()

    import fused_ft
    from fused_ft import available_backends, doctor
    from fused_ft.kernels import native

    where = Path(fused_ft.__file__).resolve()
    assert args.prefix.resolve() in where.parents, f"fused_ft imported from {where}, not from {args.prefix}"
    present = [m for m in EXTRAS if importlib.util.find_spec(m) is not None]
    assert not present, f"installed without extras, yet these are importable: {present}"
    info = native.INFO
    assert info.origin == args.origin, f"C++ extension: {info} (expected built {args.origin})"
    if args.cache is not None:
        assert args.cache.resolve() in Path(info.path).resolve().parents, f"{info.path} is not in {args.cache}"
    assert available_backends("cpu")[0] == "cpu", available_backends("cpu")
    lines = check_optimizers()
    report, ok = doctor.report()  # what `python -m fused_ft.doctor` prints (make dist-check runs that too)
    extension = next(line for line in report if line.startswith("C++ extension"))
    assert ok and f"available, built {args.origin}" in extension, "\n".join(report)
    print("\n".join([f"fused_ft from {where.parent}", f"no extras: none of {', '.join(EXTRAS)} importable",
                     *lines, "doctor:", *report, "smoke test passed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
