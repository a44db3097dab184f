import os

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
