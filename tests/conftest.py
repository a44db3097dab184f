import os

import pytest
import torch

# Triton kernels run in Triton's CPU interpreter here (no GPU on dev or CI machines). The flag is
# read when @triton.jit decorates the kernels, so it must be set before fused_ft imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# pytest-xdist runs one worker per core: more torch threads than cores makes OpenMP spin-wait
# and slows the suite by an order of magnitude on a 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A tiny ImageFolder: 2 classes (dark / bright squares), train/id_val/id_test and two OOD splits."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    g = torch.Generator().manual_seed(0)
    for split, n in [("train", 24), ("id_val", 8), ("id_test", 8), ("ood_test", 8), ("ood_test_b", 6)]:
        for label, level in [("dark", 60), ("bright", 190)]:
            (root / split / label).mkdir(parents=True)
            for i in range(n // 2):
                pixels = (level + 40 * torch.randn(40, 40, 3, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")
    return root
