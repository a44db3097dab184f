"""Memory of one training step, by category: the paper's Table 4 on any machine.

:func:`profile_memory` runs a full training step (forward, backward, optimizer step, zero_grad) of
a model and a :data:`fused_ft.METHODS` method, after one warm-up step (optimizer state exists, as in
any step after the first), and reports bytes for parameters, gradients, optimizer state,
activations/temporaries and the peak.

Two modes:

- ``simulated`` (any machine): the model is built on the meta device and every tensor the step
  creates is tracked by a ``TorchDispatchMode`` that counts storage bytes as they are allocated and
  freed (weak references on the storages), so ViT-H/14 profiles on a laptop in seconds. The
  optimizer step runs the fused kernels' memory model (:mod:`fused_ft.kernels.meta`: in place, no
  temporaries), which is what a GPU step with the Triton backend allocates. Attention is simulated
  as a fused (flash) kernel, as GPUs and CPUs run it: on meta tensors torch would otherwise take the
  math path and count the softmax matrices (86 MB too many for ViT-S/16 at batch 8, measured).
- ``measured`` (CUDA): the same step on the device, peak from ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import functools
import os
import re
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fused_ft._precision import BF16_UPDATE, param_dtype_of
from fused_ft._validation import check_positive_int
from fused_ft.vision.methods import create_optimizer, method as get_method
from fused_ft.vision.models import input_size

__all__ = ["MemoryProfile", "profile_memory", "training_step", "cuda_workspace_bytes", "optimizer_state_bytes",
           "CATEGORIES"]

# the parts of the peak, in the order of the table and plot
CATEGORIES = ("parameters", "gradients_at_peak", "optimizer_state", "activations")


@dataclass
class MemoryProfile:
    """Bytes of one training step.

    ``parameters``, ``optimizer_state`` and ``gradients`` (the most gradient memory alive at any
    moment: 4 B per trainable fp32 parameter, unless the step runs in backward) are what the step
    holds; ``gradients_at_peak + activations + parameters + optimizer_state == peak`` breaks the peak
    down, activations meaning everything else alive then (activations, temporaries, inputs, buffers).
    """

    model: str
    method: str
    mode: str
    batch_size: int
    image_size: int
    step_in_backward: bool
    grad_checkpointing: bool
    num_params: int
    trainable_params: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    peak: int
    gradients_at_peak: int
    param_dtype: str = "float32"
    bf16_update: str = "nearest"
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LiveStorages(TorchDispatchMode):
    """Counts the bytes of every storage alive, and classifies what is alive at the peak.

    Storages are keyed by their Python object (torch keeps one per storage while it lives), freed
    through a weak-reference callback. At each local maximum (the first free after a new peak) the
    live set is classified by ``classify(keys)``.
    """

    def __init__(self, classify) -> None:
        super().__init__()
        self.classify = classify
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.total = 0
        self.peak = 0
        self.peak_categories: dict[str, int] = {}
        self.grad_max = 0
        self._dirty = False

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))
        self.total += self.live[key]
        if self.total > self.peak:
            self.peak = self.total
            self._dirty = True

    def _free(self, key: int) -> None:
        if self._dirty:
            self.snapshot()
        self.refs.pop(key, None)
        self.total -= self.live.pop(key, 0)

    def snapshot(self) -> None:
        self._dirty = False
        self.peak_categories = self.classify(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """State tensors proportional to the parameters (not the per-parameter step counters on the CPU)."""
    return [v for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of any torch optimizer's state as the profiler counts them: tensors proportional to the
    parameters (momentum, moments, kahan's compensation), not step counters."""
    return sum(t.numel() * t.element_size() for t in _state_tensors(optimizer))


def _storage_key(t: torch.Tensor) -> int:
    return id(t.untyped_storage())


@functools.lru_cache(maxsize=4)
def _meta_model(name: str, num_classes: int, image_size: int | None) -> nn.Module:
    """Meta models hold no memory, so a table of many methods builds each model once."""
    from fused_ft.vision.models import create_model

    return create_model(name, num_classes, image_size=image_size, device="meta")


def _build(model_or_name: nn.Module | str, num_classes: int, image_size: int | None, device):
    from fused_ft.vision.models import create_model

    if isinstance(model_or_name, nn.Module):
        return model_or_name, type(model_or_name).__name__
    if device.type == "meta":
        return _meta_model(model_or_name, num_classes, image_size), model_or_name
    return create_model(model_or_name, num_classes, image_size=image_size, device=device), model_or_name


def _set_checkpointing(model: nn.Module, enable: bool) -> None:
    target = model.visual if hasattr(model, "visual") and not hasattr(model, "set_grad_checkpointing") else model
    if not hasattr(target, "set_grad_checkpointing"):
        if enable:
            raise ValueError(
                f"Invalid grad_checkpointing=True: {type(target).__name__} has no set_grad_checkpointing()")
        return
    target.set_grad_checkpointing(enable)


def profile_memory(
    model_or_name: nn.Module | str,
    method: str,
    batch_size: int = 1,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    grad_checkpointing: bool = False,
    step_in_backward: bool = False,
    *,
    num_classes: int = 1000,
    mode: str | None = None,
    param_dtype: str | torch.dtype = "fp32",
    bf16_update: str = "nearest",
    cuda_capability: tuple[int, int] | None = None,
) -> MemoryProfile:
    """Bytes of one steady-state training step of ``model_or_name`` with ``method``.

    Args:
        model_or_name: a model (on the meta device for ``simulated``) or a name for
            :func:`fused_ft.create_model` (``clip-vit-b16``, any timm/open_clip name).
        method: a :data:`fused_ft.METHODS` name.
        batch_size: images per step (the paper's Table 4 uses 1).
        image_size: input resolution (default: the model's).
        device: ``None``/``"meta"`` simulate; a CUDA device measures.
        grad_checkpointing: recompute activations in backward (timm/open_clip checkpointing).
        step_in_backward: update each parameter during backward and free its gradient.
        num_classes: size of the classification head.
        mode: ``simulated`` or ``measured``; default from ``device``.
        param_dtype: ``"fp32"`` or ``"bf16"``: the weights' dtype, with no fp32 master copy (inputs
            and activations follow it).
        bf16_update: how the optimizer stores bf16 weights (``nearest``, ``stochastic``, ``kahan``:
            see :class:`fused_ft.SGD`); kahan's 2-byte compensation counts as optimizer state.
        cuda_capability: simulate what a CUDA device of this compute capability adds, ``(9, 0)`` for
            H100/H200, ``(8, 0)`` for A100: the cuBLAS workspaces of the first forward and backward
            (:func:`cuda_workspace_bytes`), counted with ``activations`` and in ``extra["workspaces"]``.
            None (default): the step's own tensors only. A measured profile holds the real ones in its
            peak; its ``extra["workspaces"]`` is the model's figure for that device, for comparison.

    Example:
        >>> p = profile_memory("vit_tiny_patch16_224", "sgd-freeze-embed", image_size=64)
        >>> p.optimizer_state == 4 * p.trainable_params
        True
    """
    get_method(method)  # a clear error for an unknown method before any work
    workspaces = 0 if cuda_capability is None else cuda_workspace_bytes(cuda_capability)
    check_positive_int("batch_size", batch_size)
    dtype = param_dtype_of(param_dtype)
    BF16_UPDATE.check("bf16_update", bf16_update)
    device = torch.device(device or "meta")
    mode = mode or ("simulated" if device.type == "meta" else "measured")
    if mode not in ("simulated", "measured"):
        raise ValueError(f"Invalid mode: {mode!r} (choose from simulated, measured)")
    if mode == "measured" and device.type != "cuda":
        raise ValueError(f"Invalid device: {device} for mode='measured' (needs CUDA; simulate with device='meta')")
    if mode == "simulated" and device.type != "meta":
        raise ValueError(f"Invalid device: {device} for mode='simulated' (simulation builds the model on 'meta')")
    start = time.perf_counter()
    model, label = _build(model_or_name, num_classes, image_size, device)
    size = image_size or input_size(model)
    _set_checkpointing(model, grad_checkpointing)
    optimizer, train_step = training_step(model, method, batch_size, size, dtype, step_in_backward=step_in_backward,
                                          bf16_update=bf16_update, random_input=mode == "measured")
    params = list(model.parameters())
    with _fused_attention_on_meta():
        train_step()  # warm-up: creates the optimizer state
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state_bytes = optimizer_state_bytes(optimizer)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    if mode == "measured":
        peak, categories, grad_max = _measure(train_step, params, param_bytes, state_bytes, device)
        workspaces = _device_workspace_bytes(device)  # inside the measured peak: the model's figure, for comparison
    else:
        peak, categories, grad_max = _simulate(train_step, model, optimizer, params)
        peak += workspaces
        categories["activations"] += workspaces
    return MemoryProfile(
        model=label, method=method, mode=mode, batch_size=batch_size, image_size=size,
        step_in_backward=step_in_backward, grad_checkpointing=grad_checkpointing,
        num_params=sum(p.numel() for p in params), trainable_params=trainable,
        parameters=categories["parameters"], gradients=grad_max,
        optimizer_state=categories["optimizer_state"], activations=categories["activations"], peak=peak,
        gradients_at_peak=categories["gradients_at_peak"], param_dtype=str(dtype).removeprefix("torch."),
        bf16_update=bf16_update, seconds=time.perf_counter() - start,
        # bytes alive when the step starts; cuBLAS workspaces (modelled), part of activations
        extra={"baseline": categories["baseline"], "workspaces": workspaces},
    )


def cuda_workspace_bytes(capability: tuple[int, int], environ: Mapping[str, str] | None = None) -> int:
    """Bytes that the first forward and backward of a training step allocate on a CUDA device beyond the
    step's tensors, and keep: one cuBLAS workspace for each thread that runs matmuls (torch gives each
    thread its own cuBLAS handle and each handle a workspace from the caching allocator, so the forward
    on the caller's thread and the backward on autograd's device thread make two).

    One workspace is ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE:COUNT`` in KiB, summed as torch sums it) where
    set, else torch's default (``CublasHandlePool.cpp``): 32 MiB on compute capability 9.x (H100, H200), and
    in recent torch on 10.x and 12.x (Blackwell) too; 8 MiB + 128 KiB elsewhere. cuBLASLt shares the cuBLAS
    workspace unless ``TORCH_CUBLASLT_UNIFIED_WORKSPACE=0``, which gives each handle a cuBLASLt workspace of
    its own (``CUBLASLT_WORKSPACE_SIZE`` KiB, default 1 MiB). A size set in the process with
    ``torch.backends.cuda.cublas_workspace_size(n)`` is not seen here (a measured profile asks torch). On an
    H200 the simulated peak of CLIP ViT-B/16 missed about 75 MiB against the measured one before this term.

    Raises:
        ValueError: ``capability`` is not a (major, minor) pair of ints.
    """
    if (not isinstance(capability, tuple) or len(capability) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in capability)):
        raise ValueError(f"Invalid cuda_capability: {capability!r} (a (major, minor) pair such as (9, 0))")
    environ = os.environ if environ is None else environ
    config = environ.get("CUBLAS_WORKSPACE_CONFIG")
    sizes = [int(size) * 1024 * int(count) for size, count in re.findall(r":(\d+):(\d+)", config or "")]
    one = sum(sizes) if sizes else 32 * 2**20 if capability[0] in (9, 10, 12) else 8 * 2**20 + 128 * 2**10
    return _two_threads(one, environ)


def _two_threads(cublas_workspace: int, environ: Mapping[str, str]) -> int:
    """The workspaces of the forward's and autograd's handles: the cuBLAS one, and a cuBLASLt one of its own
    where ``TORCH_CUBLASLT_UNIFIED_WORKSPACE=0`` (``CUBLASLT_WORKSPACE_SIZE`` KiB, default 1 MiB)."""
    separate = environ.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "1").lower() in ("0", "false", "off", "no")
    return 2 * (cublas_workspace + (int(environ.get("CUBLASLT_WORKSPACE_SIZE", "1024")) * 1024 if separate else 0))


def _device_workspace_bytes(device: torch.device) -> int:
    """The model's workspaces for a real device, with the size torch reports where it can (torch >= 2.12)."""
    size = getattr(torch.backends.cuda, "cublas_workspace_size", None)
    if size is None:
        return cuda_workspace_bytes(torch.cuda.get_device_capability(device))
    with torch.cuda.device(device):
        return _two_threads(size(), os.environ)


def training_step(model: nn.Module, method: str, batch_size: int, image_size: int, dtype: torch.dtype, *,
                  step_in_backward: bool = False, bf16_update: str = "nearest", random_input: bool = True,
                  backend: str = "auto"):
    """The optimizer and the training step that :func:`profile_memory` measures: ``model`` (trained in
    ``dtype``, on its device) with ``method``'s optimizer, one batch of ``batch_size`` images of
    ``image_size`` pixels, and a step that runs forward, backward, ``step()`` and ``zero_grad()``.
    ``random_input=False`` leaves the batch uninitialised (meta tensors have no values)."""
    model.train()
    model.to(dtype)
    device = next(model.parameters()).device
    optimizer = create_optimizer(model, method, step_in_backward=step_in_backward, bf16_update=bf16_update,
                                 backend=backend)
    x = torch.empty(batch_size, 3, image_size, image_size, device=device, dtype=dtype)
    if random_input:
        x.normal_()
    y = torch.zeros(batch_size, dtype=torch.long, device=device)

    def train_step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return optimizer, train_step


@contextmanager
def _fused_attention_on_meta():
    """Route meta-tensor ``F.scaled_dot_product_attention`` to the flash kernel's op (meta kernels exist
    for it and its backward), so simulated attention memory is that of a fused kernel."""
    original = nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or kwargs:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        nn.functional.scaled_dot_product_attention = original


def _simulate(train_step, model: nn.Module, optimizer, params) -> tuple[int, dict[str, int], int]:
    param_keys = {_storage_key(p) for p in params}  # buffers (BatchNorm statistics) count with activations
    grad_max = [0]

    def note_gradients() -> None:
        grad_max[0] = max(grad_max[0], sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None))

    def classify(live: dict[int, int]) -> dict[str, int]:
        note_gradients()
        grad_keys = {_storage_key(p.grad) for p in params if p.grad is not None}
        state_keys = {_storage_key(t) for t in _state_tensors(optimizer)}
        out = dict.fromkeys(CATEGORIES, 0)
        for key, nbytes in live.items():
            category = ("parameters" if key in param_keys else "gradients_at_peak" if key in grad_keys
                        else "optimizer_state" if key in state_keys else "activations")
            out[category] += nbytes
        return out

    tracker = _LiveStorages(classify)
    for t in [*params, *model.buffers(), *_state_tensors(optimizer)]:
        tracker.track(t)
    baseline = tracker.total
    hooks = [p.register_post_accumulate_grad_hook(lambda p: note_gradients()) for p in params if p.requires_grad]
    try:
        with _fused_attention_on_meta(), tracker:
            train_step()
        if tracker._dirty:
            tracker.snapshot()
    finally:
        for h in hooks:
            h.remove()
        # the weak-reference callbacks make a cycle through the tracker, which holds the optimizer
        # via classify: break it, so the optimizer (and its step-in-backward hooks) go when we return
        tracker.refs.clear()
        tracker.classify = None
    tracker.peak_categories["baseline"] = baseline
    return tracker.peak, tracker.peak_categories, grad_max[0]


def _measure(train_step, params, param_bytes: int, state_bytes: int, device) -> tuple[int, dict[str, int], int]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    grad_bytes = [0]

    def count(p):
        grad_bytes[0] = max(grad_bytes[0], sum(q.grad.numel() * q.grad.element_size() for q in params
                                               if q.grad is not None))

    hooks = [p.register_post_accumulate_grad_hook(count) for p in params if p.requires_grad]
    try:
        train_step()
        torch.cuda.synchronize(device)
    finally:
        for h in hooks:
            h.remove()
    peak = torch.cuda.max_memory_allocated(device)
    other = max(0, peak - param_bytes - state_bytes - grad_bytes[0])
    return peak, {"parameters": param_bytes, "gradients_at_peak": grad_bytes[0], "optimizer_state": state_bytes,
                  "activations": other, "baseline": base}, grad_bytes[0]
