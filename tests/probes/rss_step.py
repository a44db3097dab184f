"""Peak resident memory of one CPU training step, measured by the kernel (VmHWM), in a fresh process.

Run with MALLOC_MMAP_THRESHOLD_ set low so that glibc returns every large tensor to the OS when it is
freed; then RSS follows the live tensors. Prints JSON: bytes alive before the step (RSS) and the
peak during it. Usage: python rss_step.py MODEL METHOD BATCH IMAGE_SIZE STEP_IN_BACKWARD
"""
import json
import sys

import torch

import fused_ft


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    name, method = sys.argv[1], sys.argv[2]
    batch, size, in_backward = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = fused_ft.create_model(name, 1000, image_size=size)
    optimizer = fused_ft.create_optimizer(model, method, step_in_backward=in_backward)
    x = torch.randn(batch, 3, size, size)
    y = torch.zeros(batch, dtype=torch.long)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()
    before = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        reset = True
    except OSError:  # kernels that refuse it: the warm-up steps reached the same peak, which then stands
        reset = False
    step()
    print(json.dumps({"before": before, "peak": _status("VmHWM"), "reset": reset}))


if __name__ == "__main__":
    main()
