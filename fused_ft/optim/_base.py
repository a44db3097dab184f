"""What every fused_ft optimizer shares: frozen groups, two-phase steps, backend dispatch.

A step runs in two phases. The plan phase checks every group (hyperparameters, gradients,
backend) and touches nothing; only when all groups pass does the update phase create state and
change parameters. So a step that raises leaves parameters and state exactly as they were.

Frozen groups (``frozen=True``) are skipped before anything else: no launch, no state (zero
bytes, not zero-filled tensors), no gradient needed. Turning ``frozen`` off later (gradual
unfreezing) creates their state lazily on the next step, as for a new parameter.

With ``step_in_backward=True`` a post-accumulate-grad hook puts each parameter whose gradient is
complete into a bucket; a bucket holding ``bucket_bytes`` of gradients (25 MiB, DDP's default) is
updated in one call and its gradients freed, and the last one when autograd finishes the backward
(``queue_callback``): at most one bucket of gradients is alive beyond those autograd still needs (the
idea of torch's "optimizer step in backward" recipe, bucketed as DDP buckets its all-reduces, so that
the host plans a bucket, not each parameter). ``step()`` then only updates parameters that took
gradients before they had a hook (unfrozen since the last step), frees those gradients and hooks the
parameters; call it after every backward pass, schedulers count it. A closure passed to ``step()``
runs, and its backward makes the updates. Nothing between ``backward()`` and ``step()`` can act on
gradients that are already applied, so the first iteration in a process (of each copy, of each resumed
run) keeps its gradients for ``step()``, which checks the loop before any change: a GradScaler, or a
change to the gradients (clipping, unscaling), is refused (see ``_check_loop``); then it applies them
in the buckets the hooks would have used. Gradient accumulation across backward passes cannot work: a
second gradient for a parameter before ``step()`` raises in backward, before it is applied, and
``step()`` drops it. The hooks find each parameter's group when they run, so they follow
``load_state_dict``, ``add_param_group`` and a replaced ``param_groups`` list.

Parameters in bf16/fp16 keep their optimizer state in fp32 and every backend does its math in
fp32, storing the parameter once (the "fp32 math, one final store" rule of optimi/apex). How that
store rounds bf16 parameters is the group's ``bf16_update`` (see :mod:`fused_ft._precision`).

The lifecycle contract (what survives what) is :class:`FusedOptimizer`'s docstring.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch.optim import Optimizer

from fused_ft.optim import _dispatch
from fused_ft.kernels.native import _C
from fused_ft._precision import BF16_UPDATE, COMPENSATION_KEY, Rounding, stream_key
from fused_ft import _dtensor
from fused_ft.optim import _checkpoint, _state
from fused_ft.optim._state import Slot
from fused_ft._validation import BOOL, OPTIONAL_BOOL, Rule, check_group, check_params

__all__ = ["FusedOptimizer", "GroupPlan", "SHARED_ARGS_DOC", "UpdateFn", "present", "skipped_step"]

# A backend's update function (see fused_ft.optim._dispatch): tensor lists and resolved scalars in, nothing out.
UpdateFn = Callable[..., None]

# The Args lines every optimizer shares, substituted for ``{shared_args}`` in each class docstring.
SHARED_ARGS_DOC = """backend (str): ``"auto"`` (default), ``"reference"``, ``"triton"`` or ``"cpu"``.
        step_in_backward (bool): update parameters during backward, in buckets of 25 MiB of gradients
            taken in the order they complete (``optimizer.bucket_bytes`` sets the size), and free their
            gradients; the last bucket when the backward ends. The first iteration waits for ``step()``,
            which refuses a GradScaler or clipping first (see :mod:`fused_ft.optim._base`) (default: False).
        bf16_update (str): how bf16 parameters are stored after each update (fp32 ones ignore it,
            fp16 ones refuse it): ``"nearest"`` (default), ``"stochastic"`` (unbiased stochastic
            rounding; no state) or ``"kahan"`` (a 2-byte compensation per parameter, state
            ``kahan_comp``, that makes updates fp32-exact). See :mod:`fused_ft._precision`.
        bf16_seed (int, optional): seed of stochastic rounding's random bits, kept in each param
            group and its state_dict; with the group's update count (``bf16_step``) it fixes every
            bit (default: None, drawn from torch's generator when ``bf16_update="stochastic"``)."""

# Arguments that select torch's own implementations; shared by every optimizer's rules.
IMPLEMENTATION_RULES: Mapping[str, Rule] = {
    "frozen": BOOL,
    "foreach": OPTIONAL_BOOL,
    "fused": OPTIONAL_BOOL,
    "differentiable": BOOL,
    "capturable": BOOL,
    "bf16_update": BF16_UPDATE,
    "bf16_seed": Rule(kind="int", low=0),
}


def _check_rounding_dtypes(group: Mapping[str, Any], dtypes: Iterable[torch.dtype], index: int) -> None:
    """bf16_update changes how bf16 parameters are stored; fp32 ones ignore it (a bf16 model often keeps
    a few fp32 tensors), fp16 ones are refused: its 5-bit exponent makes fp16 weights without an fp32
    master copy a different problem (loss scaling), which torch.amp solves."""
    mode = group.get("bf16_update", "nearest")
    if mode != "nearest" and torch.float16 in set(dtypes):
        raise ValueError(
            f"Invalid bf16_update={mode!r} for float16 parameters (group {index}): it applies to bfloat16 "
            "parameters; keep fp16 models in fp32 with torch.autocast, or convert them to bfloat16"
        )


def check_implementation_flags(group: Mapping[str, Any]) -> None:
    """torch's implementation switches, accepted where they mean something for fused_ft."""
    if group.get("differentiable"):
        raise ValueError(
            "Invalid differentiable: True (fused_ft updates parameters in place outside autograd; "
            "use the torch.optim optimizer for differentiable=True)"
        )
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("Invalid fused=True with foreach=True: choose one")  # torch.optim's type


def _sparse_grad_error(index: int, i: int, p: torch.Tensor, note: str = "") -> ValueError:
    # built only on failure: formatting this for every parameter cost ~2% of a ViT-B SGD step
    return ValueError(
        f"Invalid grad: group {index} param {i} (shape {tuple(p.shape)}) has a sparse gradient; fused_ft "
        f"optimizers need dense gradients (nn.Embedding(sparse=False), or torch.optim.SparseAdam for sparse ones){note}"
    )


def _by_device(index: int, params: list[torch.Tensor]) -> dict[torch.device, tuple[list, list, frozenset]]:
    """The parameters that have gradients, their gradients and their dtypes, by device; sparse
    gradients refused.

    This is most of a step's host work, and torch's own fused step is the bar, so it checks what
    torch lets through and no more, in one C++ pass where the extension is built: torch's grad setter
    and autograd keep a gradient shaped, typed and placed like its parameter, but allow sparse ones.
    (A `.data` swap that breaks those rules is caught by the kernel backends' layout check, flat_ok.)
    """
    if _C is not None and not torch.compiler.is_compiling():  # Dynamo traces the Python twin; a C++ call is opaque
        kept, grads, sparse, one_device, dtypes = _C.params_with_grads(params)
    else:
        grads = [p.grad for p in params]
        sparse = next((i for i, g in enumerate(grads) if g is not None and g.is_sparse), -1)
        kept = [p for p, g in zip(params, grads) if g is not None]
        grads = [g for g in grads if g is not None]
        one_device, dtypes = len({p.device for p in kept}) <= 1, {p.dtype for p in kept}
    if sparse >= 0:
        raise _sparse_grad_error(index, sparse, params[sparse])
    if not kept:  # groups without grads still tick (LAMB's step); planned on their parameters' device, where a
        # named backend runs (on the CPU, backend='triton' was refused for a CUDA group without gradients)
        return {params[0].device if params else torch.device("cpu"): ([], [], frozenset())}
    if one_device:
        return {kept[0].device: (kept, grads, frozenset(dtypes))}
    by_device: dict[torch.device, tuple[list, list, frozenset]] = {}
    for p, g in zip(kept, grads):
        entry = by_device.setdefault(p.device, ([], [], set()))
        entry[0].append(p)
        entry[1].append(g)
        entry[2].add(p.dtype)
    return {device: (ps, gs, frozenset(ds)) for device, (ps, gs, ds) in by_device.items()}


def present(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that are not None: the loop's device tensors (GradScaler's, a capturable step
    count) go only to an update that takes them, so one that does not (reference, cpu) never sees them."""
    return {k: v for k, v in kwargs.items() if v is not None}


def skipped_step(found_inf: torch.Tensor) -> torch.Tensor:
    """1.0 where GradScaler skipped the step, else 0.0, on the device: what a device step count takes back
    (GradScaler sums the devices' flags, so found_inf may read 2.0 for one skipped step)."""
    return found_inf.reshape(()).clamp(max=1.0)


@dataclass
class GroupPlan:
    """One param group's share of a step, on one device, checked and ready to run."""

    group: dict
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    backend: str
    update: UpdateFn
    dtypes: frozenset = frozenset()
    # the parameters' state tensors by key (see fused_ft.optim._state), None where not created yet
    state: dict = field(default_factory=dict)
    clip: Any = None  # LAMB: the global gradient clipping, in the backend's form (set by _before_updates)
    # GradScaler's grad_scale and found_inf on the plan's device, where the kernels take them (see _take_scaler)
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None

    def scaler_args(self) -> dict[str, torch.Tensor]:
        """GradScaler's tensors as keyword arguments of a functional update, where the kernels take them."""
        return present(grad_scale=self.grad_scale, found_inf=self.found_inf)


class FusedOptimizer(Optimizer):
    """Base of fused_ft.SGD, AdamW, LARS and LAMB (see those for the math).

    The lifecycle contract, the same for every subclass (``tests/test_lifecycle.py``):

    - ``state_dict()`` / ``load_state_dict()``: torch.optim's format, exchanged both ways with
      torch.optim and timm.optim, in every format those still load (a step saved as a number). fp32
      state of bf16/fp16 parameters and kahan's int16 compensations come back bit for bit (torch casts
      loaded state to the parameter's dtype); bf16 state from a torch checkpoint widens to fp32.
      save -> load -> save gives equal dicts. A state dict saved from other parameters (group count,
      group sizes, state shapes) is refused before anything changes. Loaded tensors are copies where
      they are converted; where nothing needs converting they are shared with the dict, as in torch.
    - ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the whole optimizer: the copy steps, keeps its
      backend and ``step_in_backward`` (hooking its own parameters), and its hooks (torch's, below)
      start empty, as torch.optim's copies do.
    - torch's hooks: ``register_step_pre_hook``/``post_hook`` run around ``step()`` (not around the
      updates that ``step_in_backward`` makes during backward); ``register_state_dict_pre_hook``/
      ``post_hook`` as in torch; ``register_load_state_dict_pre_hook``/``post_hook``: pre-hooks see
      the dict as given, post-hooks see the final state (fp32 buffers, int16 compensations), and what
      they write stays.
    - ``add_param_group``, a replaced ``param_groups`` list, frozen groups turned on or off: state is
      created lazily for parameters that have none, as torch does; ``step_in_backward`` hooks find
      each parameter's group when they run.
    - A step that raises has changed nothing: hyperparameters, gradients, backends and state (keys,
      shapes, devices, dtypes) are checked for every group before any update. State a step can
      create on its own is created (a momentum buffer when momentum is turned on, ``max_exp_avg_sq``
      when amsgrad is, a compensation when ``bf16_update`` turns to kahan); state that cannot
      continue the run it came from is refused, naming the group, parameter, shape, key and fix.
    """

    _NAME: ClassVar[str]  # the key into fused_ft.optim.OPTIMIZER_CLASSES and the backends' UPDATES
    _RULES: ClassVar[Mapping[str, Rule]]
    _CROSS_CHECKS: ClassVar[Sequence[Callable[[Mapping[str, Any]], None]]] = ()
    # True where the update needs norms of whole tensors (LARS/LAMB trust ratios): on sharded
    # parameters only the reference backend, which all-reduces them, can run it
    _WHOLE_TENSOR_NORMS: ClassVar[bool] = False
    # every per-parameter state key holding a tensor shaped like its parameter, whatever the options
    _ELEMENT_STATE: ClassVar[tuple[str, ...]] = ()
    # torch.amp.GradScaler then sets grad_scale and found_inf on the optimizer and calls step() (torch's fused
    # optimizers' contract) instead of unscaling with a foreach and reading found_inf on the host: see _take_scaler
    _step_supports_amp_scaling: ClassVar[bool] = True

    def __init__(
        self, params: Iterable, defaults: dict[str, Any], *, backend: str = "auto", step_in_backward: bool = False,
        bf16_update: str = "nearest", bf16_seed: int | None = None,
    ) -> None:
        self.backend = _dispatch.check_backend_name(backend)
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"Invalid step_in_backward: {step_in_backward!r} (must be a bool)")
        self.step_in_backward = step_in_backward
        if step_in_backward:
            self._check_step_in_backward(defaults)
        self._init_runtime()
        if bf16_seed is None:  # drawn only when used, so that other modes leave torch's generator alone
            bf16_seed = int(torch.randint(0, 2**31 - 1, ()).item()) if bf16_update == "stochastic" else 0
        defaults = {**defaults, "frozen": False, "bf16_update": bf16_update, "bf16_seed": bf16_seed}
        self._check_hyperparameters(defaults)
        if isinstance(params, torch.Tensor):
            raise TypeError(
                f"Invalid params: a single Tensor of shape {tuple(params.shape)} "
                "(pass an iterable of Tensors or of param-group dicts)"
            )
        params = list(params)
        if not params:
            raise ValueError("Invalid params: empty parameter list")
        super().__init__(params, defaults)

    def _init_runtime(self) -> None:
        """What belongs to this object in this process, never pickled or copied: hooks and caches."""
        self._hooks: dict[int, tuple[weakref.ref, Any]] = {}  # id(param) -> (the param, its hook's handle)
        self._hook = _make_hook(weakref.ref(self))
        self._located: tuple[Any, dict[int, tuple[int, dict]]] = (None, {})  # see _locate
        self._updated_in_backward: set[int] = set()  # ids of params a hook took since the last step()
        # step_in_backward's bucket: parameters whose hooks ran, in gradient-ready order, updated together
        self._bucket: list[tuple[int, dict, torch.Tensor]] = []
        self._bucket_bytes = 0
        self._end_queued = False  # the end-of-backward flush is queued for the running backward
        self._flushed_in_backward = False  # a bucket of the running backward was applied already
        self._ticked: set[int] = set()  # ids of groups that counted a step since the last step() (LAMB)
        self._checked_groups: dict[int, dict] = {}  # id(group) -> the hyperparameters that last passed
        # the first iteration's gradients in this process, kept for step(), which checks the loop around
        # them (see _check_loop) before it applies them: id(param) -> (param, its gradient, version)
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._loop_checked = False
        # later iterations: the sentinel (the smallest hooked parameter) keeps its applied gradient until
        # step() checks it: (param, gradient, version) or None
        self._sentinel: int | None = None
        self._kept: tuple[torch.Tensor, torch.Tensor, int] | None = None
        if self.step_in_backward:
            # (GradScaler's grad_scale and found_inf are refused by step(): see _check_loop)
            # Under torch.compile the hooks, autograd's end-of-backward callback and step() run eagerly, never
            # traced. A backward called in a compiled function is a graph break, and Dynamo traced the hooks and
            # the callback it ran as frames of their own, replaying their bookkeeping wrong (a compiled whole
            # step 0.02-0.03 away from the eager one after 3 steps, no error); a traced step() did too (a
            # compiled timm ViT iteration refused its next backward as accumulation). Wrapped here, not at
            # import: torch.compiler.disable imports torch._dynamo (and torch.distributed.tensor, 0.6 s). None
            # holds the optimizer itself (a bound method would): a dropped optimizer must be freed at once, or
            # its hooks go on updating the parameters (LP-FT's probe, a second profile of a cached model)
            owner = weakref.ref(self)
            self._hook = torch.compiler.disable(self._hook)
            self._end_callback = torch.compiler.disable(_make_hook(owner, FusedOptimizer._end_of_backward))
            self._eager_step = torch.compiler.disable(FusedOptimizer._step)

    # -- groups ---------------------------------------------------------------------------------
    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        check_group(group, {**IMPLEMENTATION_RULES, **self._RULES}, (check_implementation_flags, *self._CROSS_CHECKS))

    def _check_hyperparameters_traced(self, group: Mapping[str, Any]) -> None:
        """``_check_hyperparameters`` as Dynamo traces it, without ``capturable``: while it traces a
        torch.optim.Optimizer, Dynamo shows every group with capturable=True (its OptimizerVariable sets it for
        torch's own optimizers), a key our groups may lack; a check that read the key would guard on that view,
        and the real group would fail the guard at once (torch 2.14: "Guard failed on the same frame it was
        created"). capturable is checked eagerly, at construction and in every eager step."""
        rules = {name: rule for name, rule in {**IMPLEMENTATION_RULES, **self._RULES}.items() if name != "capturable"}
        check_group(group, rules, (check_implementation_flags, *self._CROSS_CHECKS))

    @functools.cached_property
    def _rule_names(self) -> frozenset[str]:
        return frozenset(IMPLEMENTATION_RULES) | frozenset(self._RULES)

    def _check_group_for_step(self, group: dict) -> None:
        """``_check_hyperparameters`` where the group's checked values changed since they last passed:
        a scheduler that changes lr is caught at the next step, an unchanged group costs one dict
        comparison (the full check was a tenth of a small model's step). Tensor values are compared
        by identity and version, so an in-place change is seen too; a list is copied for the same
        reason. Only the keys the rules check count (LAMB's group step changes every step).

        Under torch.compile the check runs when Dynamo traces the step, without the cache: the graph guards
        on every value that is not a tensor (a change retraces, and so rechecks, the step), a tensor value is
        checked eagerly only (see ``Rule``), and the cache's version counters cannot be read in a graph."""
        if torch.compiler.is_compiling():
            self._check_hyperparameters_traced(group)
            return
        seen = {k: (id(v), v._version) if isinstance(v, torch.Tensor) else tuple(v) if isinstance(v, list) else v
                for k, v in group.items() if k in self._rule_names}
        if self._checked_groups.get(id(group)) != seen:
            self._check_hyperparameters(group)
            self._checked_groups[id(group)] = seen

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as torch.optim does; the whole group is checked before anything is added."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Invalid param_group: {type(param_group).__name__} (must be a dict)")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set) or params is None:
            raise TypeError(f"Invalid params: {type(params).__name__} (must be an ordered iterable of Tensors)")
        params = list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        check_params(tensors, seen, len(self.param_groups))
        group = {**self.defaults, **param_group}
        self._check_hyperparameters(group)
        _check_rounding_dtypes(group, (t.dtype for t in tensors), len(self.param_groups))
        self._check_backend_for(group, tensors)
        super().add_param_group({**param_group, "params": params})
        if getattr(self, "step_in_backward", False):
            self._ensure_hooks()

    def _check_backend_for(self, group: Mapping[str, Any], params: list[torch.Tensor]) -> None:
        """Refuse now what step() would: a named backend that cannot run on these parameters' devices,
        and fused=True with the reference backend (not fused)."""
        backend = getattr(self, "backend", "auto")
        if group.get("fused") and backend == "reference":
            raise ValueError(
                "Invalid fused=True with backend='reference' (the reference backend is not fused); "
                "use backend='auto', 'cpu' or 'triton', or pass fused=None"
            )
        for device in {p.device for p in params}:
            reason = _dispatch.unavailable_reason(backend, device)
            if reason is not None:
                raise _dispatch.BackendUnavailableError(reason)

    # -- step in backward -----------------------------------------------------------------------
    def _check_step_in_backward(self, defaults: Mapping[str, Any]) -> None:
        """Refuse options that need every gradient before any update (LAMB's global clipping)."""

    def _ensure_hooks(self) -> None:
        """Hook every parameter that takes gradients; re-run at each step() so that parameters
        unfrozen later (gradual unfreezing, LP-FT) get theirs (torch refuses hooks on tensors
        without requires_grad, so they cannot all be hooked up front; until hooked, step() updates them)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    hooked = self._hooks.get(id(p))
                    if hooked is None or hooked[0]() is not p:  # an id can be reused once its tensor is gone
                        self._hooks[id(p)] = (weakref.ref(p), p.register_post_accumulate_grad_hook(self._hook))

    def _locate(self, p: torch.Tensor) -> tuple[int, dict] | None:
        """The index and dict of ``p``'s group now, or None when ``p`` is not in this optimizer. Read
        when a hook runs, never captured: load_state_dict replaces the group dicts, and users replace
        param_groups. The map is rebuilt when the groups' structure changes (O(groups) to compare)."""
        key = tuple((id(g), id(g["params"]), len(g["params"])) for g in self.param_groups)
        if self._located[0] != key:
            self._located = (key, {id(q): (i, g) for i, g in enumerate(self.param_groups) for q in g["params"]})
        return self._located[1].get(id(p))

    # Gradients a step_in_backward optimizer keeps before it updates their parameters together, as DDP
    # buckets its all-reduces (its default size). Measured on the CPU (75 Linear(64, 64), batch 8, SGD with
    # momentum, backend='cpu'): one update per hooked parameter cost 110 us of host work each, 3.5x the plain
    # step's iteration time; bucketed, the host work is one plan per bucket. The memory cost is at most one
    # bucket of gradients beyond those autograd still needs. Set ``optimizer.bucket_bytes`` to change it.
    BUCKET_BYTES: ClassVar[int] = 25 * 2**20

    def _update_in_backward(self, p: torch.Tensor) -> None:
        """A parameter's hook, run as soon as its gradient is complete: the parameter joins the bucket,
        which is applied when it holds ``bucket_bytes`` of gradients, and at the end of the backward."""
        if not self._end_queued:
            self._start_backward(p)
        # the groups cannot change within a backward: the map _start_backward refreshed holds for it
        # (looked up anew per hook, the groups' key cost 5 us of the 14 us a hooked parameter took)
        key = id(p)
        located = self._located[1].get(key)
        grad = p.grad
        if located is None or grad is None:
            return  # not (or no longer) this optimizer's: a parameter removed from the groups
        index, group = located
        if group["frozen"]:
            return
        if grad.is_sparse or key in self._updated_in_backward or key in self._held:
            refusal = self._refusal_in_backward(index, group, p)
            self._drop_bucket()  # refused: what this backward had not applied yet stays unapplied
            raise refusal
        if not self._loop_checked:  # the first iteration: step() applies this gradient, after _check_loop
            self._held[key] = (p, grad, grad._version)
            return
        self._add_to_bucket(index, group, p, grad, key)

    def _start_backward(self, p: torch.Tensor) -> None:
        """The first hook of a backward: what holds for the whole backward, checked once, and the
        end-of-backward callback that applies the last bucket."""
        if _capturing():
            _refuse_graph_capture(self, "step_in_backward update", "the hooks plan each bucket on the host",
                                  "use step_in_backward=False, capture the forward and backward only and call step() "
                                  "outside the graph")
        _refuse_data_parallel(p)
        self._locate(p)
        hooked = [q for g in self.param_groups if not g["frozen"] for q in g["params"] if q.requires_grad]
        self._sentinel = id(min(hooked, key=torch.Tensor.numel)) if hooked else None
        torch.autograd.Variable._execution_engine.queue_callback(self._end_callback)
        self._end_queued = True

    def _refusal_in_backward(self, index: int, group: dict, p: torch.Tensor) -> Exception:
        if p.grad.is_sparse:
            return _sparse_grad_error(index, _position(group, p), p,
                                      "; with step_in_backward=True, buckets of parameters whose gradients came "
                                      "earlier in this backward were already updated" if self._flushed_in_backward
                                      else "")
        return RuntimeError(
            f"Invalid gradient accumulation with step_in_backward=True: group {index} param "
            f"{_position(group, p)} (shape {tuple(p.shape)}) got a second gradient before optimizer.step(), "
            "and step_in_backward applies each gradient in the backward that makes it; call "
            "optimizer.step() after every backward pass (loops that never call step() are not supported), or use "
            "step_in_backward=False to accumulate gradients"
        )

    def _add_to_bucket(self, index: int, group: dict, p: torch.Tensor, grad: torch.Tensor, key: int) -> None:
        """``p`` (its gradient ``grad``, its ``id`` ``key``: the hook has read both) joins the bucket."""
        self._bucket.append((index, group, p))
        self._bucket_bytes += grad.numel() * grad.element_size()  # (nbytes fails on symbolic shapes)
        self._updated_in_backward.add(key)
        if self._bucket_bytes >= getattr(self, "bucket_bytes", self.BUCKET_BYTES):
            self._apply_bucket()

    def _apply_held(self) -> None:
        """The first iteration's gradients, once step() has checked the loop: applied in the buckets and
        the order the hooks would have used, so that its updates (and stochastic rounding's bits) are
        those of an iteration updated in backward (a resumed or copied run equals the uninterrupted one)."""
        held, self._held = self._held, {}
        for p, _, _ in held.values():
            located = self._locate(p)
            if located is not None and p.grad is not None and not located[1]["frozen"]:
                self._add_to_bucket(*located, p, p.grad, id(p))
        self._apply_bucket()
        if self._kept is not None:  # applied, and checked (whole in the first iteration; after a closure)
            self._kept[0].grad = None
            self._kept = None
        self._flushed_in_backward = False
        self._loop_checked = self._loop_checked or bool(held)

    def _drop_held(self) -> None:
        """A refused iteration's gradients: the held ones are never applied, the kept one was."""
        for q, _, _ in [*self._held.values(), *([self._kept] if self._kept else [])]:
            q.grad = None
        self._held.clear()
        self._kept = None

    def _end_of_backward(self) -> None:
        self._end_queued = False
        try:
            self._apply_bucket()
        finally:
            self._flushed_in_backward = False

    def _drop_bucket(self) -> None:
        for _, _, q in self._bucket:
            self._updated_in_backward.discard(id(q))
        self._drop_held()
        self._bucket, self._bucket_bytes = [], 0
        self._end_queued = False  # a backward that raised runs no end-of-backward callback

    def _apply_bucket(self) -> None:
        """Update the bucket's parameters (one plan per group, every group planned before any update, as
        step() does) and free their gradients: this is where the memory goes."""
        bucket, self._bucket, self._bucket_bytes = self._bucket, [], 0
        if not bucket:
            return
        by_group: dict[int, tuple[dict, list[torch.Tensor]]] = {}
        for index, group, q in bucket:
            by_group.setdefault(index, (group, []))[1].append(q)
        with torch.no_grad():
            plans = [plan for index, (group, params) in by_group.items()
                     for plan in self._plan_group(index, group, params)]
            self._before_updates(plans)
            for plan in plans:
                self._update_group(plan)
        self._flushed_in_backward = True
        for _, _, q in bucket:
            if id(q) == self._sentinel:  # kept (not applied again) until step() has checked it
                self._kept = (q, q.grad, q.grad._version)
            else:
                q.grad = None

    def _first_tick(self, group: dict) -> bool:
        """Does ``group`` count a step now? Once per step(): at its first update since the last step()
        (in backward, its first parameter's hook; else step() itself)."""
        if id(group) in self._ticked:
            return False
        self._ticked.add(id(group))
        return True

    # -- pickling, copies and state dicts ---------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and groups; fused_ft's constructor choices travel too
        state = {**super().__getstate__(), "backend": self.backend, "step_in_backward": self.step_in_backward}
        if "bucket_bytes" in self.__dict__:  # a copy's buckets, and so its stochastic rounding's bits, are the same
            state["bucket_bytes"] = self.bucket_bytes
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # called by unpickling and deepcopy (with "backend" and "step_in_backward"; a pickle from before
        # step_in_backward travelled lacks it: False) and by load_state_dict (without either: keep ours)
        state = dict(state)
        restoring = "_hooks" not in self.__dict__  # a new object, not a load into this one
        self.backend = state.pop("backend", getattr(self, "backend", "auto"))
        self.step_in_backward = state.pop("step_in_backward", getattr(self, "step_in_backward", False))
        if "bucket_bytes" in state:
            self.bucket_bytes = state.pop("bucket_bytes")
        super().__setstate__(state)
        _checkpoint.drop_torch_default(self)
        if restoring:
            self._init_runtime()
        self._checked_groups = {}  # new groups: check them at the next step
        _checkpoint.upgrade(self)
        if self.step_in_backward:
            self._ensure_hooks()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as torch.optim does, keeping fp32 state of bf16/fp16 parameters and kahan's
        compensations exact; refuse a state dict of other parameters (``ValueError``) before any change.

        The state dict may come from this class, torch.optim's or timm.optim's matching class, in any
        format those still load. See the class docstring for the whole contract.
        """
        kept: list = []
        own_flags = _checkpoint.implementation_flags(self)

        def set_aside(optimizer, loaded):  # after the user's pre-hooks: they may rewrite the dict
            _checkpoint.check_loadable(self, loaded)
            loaded, exact = _checkpoint.set_aside_exact_state(self, loaded)
            kept.extend(exact)
            return loaded

        def put_back(optimizer):  # before the user's post-hooks: they see the final state
            _checkpoint.put_back_exact_state(self, kept)
            _checkpoint.restore_implementation_flags(self, own_flags)

        pre = self.register_load_state_dict_pre_hook(set_aside)
        post = self.register_load_state_dict_post_hook(put_back, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    # -- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.

        Raises:
            RuntimeError: inside a CUDA graph capture that a replay would get wrong (see ``_capture_refusal``),
                before any change.
        """
        if self.step_in_backward and torch.compiler.is_compiling():
            return self._eager_step(self, closure)  # see _init_runtime
        return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        capturing = _capturing()
        if capturing and self.step_in_backward:
            _refuse_graph_capture(self, "step()", "step_in_backward updates in backward hooks, planned on the host",
                                  _CAPTURE_ADVICE)
        if self.step_in_backward:
            self._ensure_hooks()
            # a closure runs as torch.optim runs it (below): its backward makes the updates, in the hooks,
            # with the gradients at these weights, as torch's step after the closure would (Lightning passes
            # one to every step, in manual optimization too)
            self._check_loop()
            self._apply_bucket()  # left by a backward that ended without its end-of-backward callback
            self._end_queued = False
            # the hooks consumed (and freed) every gradient they saw; what is left came to parameters
            # that took gradients before they were hooked (unfrozen since the last step): update those
            # here, and free them as the hooks do (left in place, the next backward would add to them).
            # A gradient left on a parameter a hook already updated is a second one, refused in
            # backward: it is dropped, never applied.
            if self._updated_in_backward:  # (the sentinel's kept gradient among them)
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None and id(p) in self._updated_in_backward:
                            p.grad = None
            self._kept = None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if self.step_in_backward:
                self._check_loop()  # what the closure did after its backward (Lightning clips there)
        if self.step_in_backward:
            self._apply_held()
        plans = [plan for index, group in enumerate(self.param_groups) if not group["frozen"]
                 for plan in self._plan_group(index, group)]
        if capturing:
            for plan in plans:
                reason = self._capture_refusal(plan)
                if reason is None and self._scaled() and not self._scaler_in_kernel(plan):
                    reason = ("takes GradScaler's found_inf on the host (see _take_scaler: the triton kernels of SGD, "
                              "LARS, AdamW with capturable=True and LAMB with capturable=True take it on the device, "
                              "without stochastic rounding)")
                if reason is not None:
                    index = next(i for i, g in enumerate(self.param_groups) if g is plan.group)
                    _refuse_graph_capture(self, "step()", f"group {index} {reason}", _CAPTURE_ADVICE)
        if self._take_scaler(plans):
            self._before_updates(plans)
            for plan in plans:
                self._update_group(plan)
        if self.step_in_backward:
            for plan in plans:
                for p in plan.params:
                    p.grad = None
        self._updated_in_backward.clear()
        self._ticked.clear()
        return loss

    def _check_loop(self) -> None:
        """Refuse what step_in_backward would silently get wrong, where each gradient is applied and freed
        during backward: nothing between ``backward()`` and ``step()`` can act on the gradients.

        - a ``torch.amp.GradScaler`` (it sets ``grad_scale`` and ``found_inf`` before step()): scaled
          gradients would update the weights, and an overflow would not be skipped;
        - any change to the gradients after backward (``clip_grad_norm_``, ``clip_grad_value_`` and
          ``GradScaler.unscale_`` write them in place; an assigned gradient replaces one): it would act
          on gradients already applied and freed (``clip_grad_norm_`` would return 0 and clip nothing).

        The first iteration's hooks keep every gradient for step() (a plain step's peak memory, once), so
        both are refused there before any change. Later iterations keep one applied gradient alive until
        step(): the sentinel's, the smallest hooked parameter's; a clip or scaler first used then is
        refused at that step(), after its backward's updates (the message says so).
        The check reads version counters: it costs no sync and sees no values. A refused iteration's
        kept gradients are dropped, and the scaler's attributes with them, so the next one starts clean."""
        later = " (this backward's gradients were applied as they came)" if self._loop_checked else ""
        if getattr(self, "found_inf", None) is not None or getattr(self, "grad_scale", None) is not None:
            for name in ("grad_scale", "found_inf"):  # GradScaler removes them only when step() returns
                self.__dict__.pop(name, None)
            self._drop_held()
            raise ValueError(
                "Invalid use with torch.amp.GradScaler: step_in_backward=True applies gradients during backward, "
                f"before GradScaler can unscale or skip them{later}; use bf16 autocast (no scaler) or "
                "step_in_backward=False"
            )
        for p, grad, version in [*self._held.values(), *([self._kept] if self._kept else [])]:
            if p.grad is not None and (p.grad is not grad or p.grad._version != version):
                index, group = self._locate(p)
                self._drop_held()
                raise RuntimeError(
                    f"Invalid change to gradients between backward() and step() with step_in_backward=True: group "
                    f"{index} param {_position(group, p)} (shape {tuple(p.shape)}) has a gradient changed after its "
                    f"backward (clip_grad_norm_, clip_grad_value_, GradScaler.unscale_, ...){later}; each gradient "
                    "is applied and freed during backward, so such a change would act on nothing; use "
                    "step_in_backward=False to clip or rescale gradients"
                )

    def _take_scaler(self, plans: list[GroupPlan]) -> bool:
        """Take GradScaler's ``grad_scale`` and ``found_inf`` (1-element fp32 tensors it sets on the optimizer
        before calling step(); ``grad_scale`` None after ``unscale_``) as torch's fused optimizers take them.
        Returns False when the step is skipped (nothing changes: weights, state, step counts, gradients).

        Where every plan's kernels take them (``_scaler_in_kernel``), they go to the kernels, which divide
        each gradient by ``grad_scale`` as they load it (storing it back unscaled) and skip the whole update
        on the device when ``found_inf`` is set: no host sync. Otherwise ``found_inf`` is read on the host,
        once (a sync on a GPU, as GradScaler itself makes for torch.optim's for-loop and foreach
        implementations), and the gradients are unscaled in place as ``GradScaler.unscale_`` does."""
        if not self._scaled():
            return True
        grad_scale, found_inf = self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")
        if plans and all(self._scaler_in_kernel(plan) for plan in plans):
            for plan in plans:  # (a group without gradients this step: its parameters' device, for LAMB's count)
                params = plan.params or plan.group["params"]
                if not params:
                    continue  # an empty group
                device = params[0].device
                plan.grad_scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
                plan.found_inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
            return True
        if found_inf is not None and found_inf.item():
            return False
        if grad_scale is not None:
            for plan in plans:
                if plan.grads:
                    _unscale_(plan, grad_scale.double().reciprocal().float().to(plan.grads[0].device))
        return True

    def _scaled(self) -> bool:
        """Has GradScaler set its grad_scale or found_inf on this optimizer for this step()?"""
        return self.__dict__.get("grad_scale") is not None or self.__dict__.get("found_inf") is not None

    def _capture_refusal(self, plan: GroupPlan, device_lr: bool = False) -> str | None:
        """Why a CUDA graph replaying this plan's update would get it wrong (a host value baked into the graph,
        a host read), or None where a replay equals an eager step: the triton backend, whose launches read no
        host value that changes from step to step (float hyperparameters are fixed at capture; with
        ``device_lr``, a tensor ``lr`` on the device is read there), once the state exists (a warm-up step
        before capturing, as torch's capturable optimizers need), without stochastic rounding (its random
        stream advances on the host). Subclasses add their own (step counts)."""
        if not plan.params:  # a group without gradients this step launches nothing
            return None
        if plan.backend != "triton":
            return (f"runs the {plan.backend!r} backend, which reads host values in each step; the triton backend "
                    "(CUDA) captures")
        if any(t is None for column in plan.state.values() for t in column):
            return ("has parameters without optimizer state yet, which their first step creates on the host; run "
                    "one step before capturing")
        if plan.group["bf16_update"] == "stochastic" and torch.bfloat16 in plan.dtypes:
            return "uses bf16_update='stochastic', whose random stream advances on the host"
        device = plan.params[0].device
        for name in sorted(self._RULES):
            value = plan.group.get(name)
            if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
                return f"has tensors in {name}, which the step reads on the host; pass floats"
            if isinstance(value, torch.Tensor) and not (name == "lr" and device_lr and value.device == device):
                where = f"a tensor lr on {device}" if name == "lr" and device_lr else "a float"
                return f"has a tensor {name}, which the step reads on the host; pass {where}"
        return None

    def _scaler_in_kernel(self, plan: GroupPlan) -> bool:
        """Do the plan's kernels take GradScaler's grad_scale and found_inf (see ``_take_scaler``)? Not with
        stochastic rounding of bf16 parameters: its stream's counter advances on the host with each update, and
        a step skipped on the device would advance it all the same."""
        if not plan.params:  # a group without gradients this step: nothing to unscale or skip
            return True
        stochastic = plan.group["bf16_update"] == "stochastic" and torch.bfloat16 in plan.dtypes
        return _dispatch.scaler_in_kernel(plan.backend, self._NAME) and not stochastic

    def _plan_group(self, index: int, group: dict, params: list[torch.Tensor] | None = None) -> list[GroupPlan]:
        self._check_group_for_step(group)
        by_device = _by_device(index, group["params"] if params is None else params)
        if group["bf16_update"] != "nearest":
            _check_rounding_dtypes(group, (d for _, _, dtypes in by_device.values() for d in dtypes), index)
        plans = []
        for device, (params, grads, dtypes) in by_device.items():  # a grad has its parameter's dtype
            backend = self.backend
            if self._WHOLE_TENSOR_NORMS and _dtensor.any_dtensor(params) and backend != "reference":
                if backend != "auto":
                    raise _dispatch.BackendUnavailableError(
                        f"backend={backend!r} cannot run {self._NAME.upper()} on sharded (DTensor) parameters: "
                        "its trust ratios need norms of whole parameters; use backend='auto' or 'reference'"
                    )
                backend = "reference"
            name, update = _dispatch.resolve(backend, self._NAME, device, group, dtypes)
            update = _dtensor.sharded_call(update, params)
            if group.get("fused") and name == "reference":
                if self.backend == "reference":
                    raise ValueError(
                        "Invalid fused=True with backend='reference' (the reference backend is not fused); "
                        "use backend='auto', 'cpu' or 'triton', or pass fused=None"
                    )
                raise _dispatch.BackendUnavailableError(
                    f"fused=True needs a fused kernel backend, but group {index} on {device} would run "
                    f"the reference backend: no kernel backend supports it here "
                    f"({_dispatch.available_backends(device)} available); pass fused=None to accept the reference "
                    "backend"
                )
            slots = self._state_slots(group)
            if group["bf16_update"] == "kahan" and torch.bfloat16 in dtypes:
                slots = (*slots, _state.COMPENSATION)
            state = _state.gather(self.state, index, group, params, slots)
            plans.append(GroupPlan(group, params, grads, name, update, dtypes, state))
        return plans

    def _state_slots(self, group: Mapping[str, Any]) -> tuple[Slot, ...]:
        """The per-parameter state a step of ``group`` reads (see fused_ft.optim._state)."""
        return ()

    def _before_updates(self, plans: list[GroupPlan]) -> None:
        """Hook for work that spans groups (LAMB's global gradient clipping)."""

    def _update_group(self, plan: GroupPlan) -> None:
        raise NotImplementedError

    def _rounding(self, plan: GroupPlan) -> Rounding | None:
        """How this update stores the plan's bf16 parameters (None: to nearest). Called by each
        ``_update_group`` after it created its own state: it advances the group's random stream
        (``bf16_step``, one per update call) or creates the kahan compensations the plan lacks."""
        group = plan.group
        mode = group["bf16_update"]
        if mode == "nearest" or torch.bfloat16 not in plan.dtypes:
            return None
        if mode == "stochastic":
            counter = group.get("bf16_step", 0)
            group["bf16_step"] = counter + 1
            shard = _dtensor.shard_index(plan.params) if _dtensor.any_dtensor(plan.params) else 0
            return Rounding(mode, key=stream_key(group["bf16_seed"], counter, shard))
        compensations = []
        for p, g, comp in zip(plan.params, plan.grads, plan.state[COMPENSATION_KEY]):
            if p.dtype != torch.bfloat16:
                compensations.append(_dtensor.local(g))  # a stand-in of the right size, never touched
                continue
            if comp is None:
                comp = self.state[p][COMPENSATION_KEY] = torch.zeros_like(p, dtype=torch.int16,
                                                                          memory_format=torch.preserve_format)
            compensations.append(_dtensor.local(comp))
        return Rounding(mode, compensations=compensations)


def _unscale_(plan: GroupPlan, inv_scale: torch.Tensor) -> None:
    """The host route's unscale, as ``GradScaler.unscale_`` does it (``g * inv_scale`` in fp32, stored back), except
    for fp16 gradients, which GradScaler refuses to unscale for torch's for-loop optimizers: unscaled in fp16, the
    small ones GradScaler exists for would flush to zero. The update takes fp32 unscaled copies of those instead
    (one fp32 copy of the fp16 gradients, for the step), and ``p.grad`` gets the unscaled values stored back, as
    torch's fused kernels leave it."""
    no_inf = torch.zeros(1, device=inv_scale.device)  # GradScaler's check is done already
    wide = [i for i, g in enumerate(plan.grads) if g.dtype == torch.float16]
    if len(wide) < len(plan.grads):
        torch._amp_foreach_non_finite_check_and_unscale_(
            [g for g in plan.grads if g.dtype != torch.float16], no_inf, inv_scale)
    for i in wide:
        unscaled = plan.grads[i].float() * inv_scale.reshape(())  # (a 0-dim gradient stays 0-dim)
        plan.grads[i].copy_(unscaled)
        plan.grads[i] = unscaled


def _position(group: dict, p: torch.Tensor) -> int:
    """``p``'s index in its group, for messages (a hook sees the parameter, not its place)."""
    return next(i for i, q in enumerate(group["params"]) if q is p)


@functools.lru_cache(maxsize=None)
def _cuda_present() -> bool:
    """torch.cuda.is_available(), asked once: 3.4 us a call, and every step() asks."""
    return torch.cuda.is_available()


_CAPTURE_ADVICE = "capture the forward and backward only and call step() outside the graph"


def _capturing() -> bool:
    """Is a CUDA graph capturing on the current stream? Under torch.compile the question is left to torch."""
    return not torch.compiler.is_compiling() and _cuda_present() and torch.cuda.is_current_stream_capturing()


def _refuse_graph_capture(optimizer: FusedOptimizer, what: str, reason: str, advice: str) -> None:
    """Refuse an update inside a CUDA graph capture that a replay would get wrong, as torch.optim refuses a
    capturable=False step (``Optimizer._cuda_graph_capture_health_check``): a host value baked into the graph
    would repeat the captured step's value in each replay (an AdamW step captured with its step count and bias
    corrections on the host: after 5 replays on an H200, ``state["step"]`` read 2 where torch's read 6, and the
    weights were 4e-3 away, no error)."""
    raise RuntimeError(f"Invalid CUDA graph capture of {type(optimizer).__name__}'s {what}: {reason}, so a replayed "
                       f"graph would repeat this step's values; {advice}")


def _refuse_data_parallel(p: torch.Tensor) -> None:
    """A hook's gradient is this rank's own when several processes train together: DDP all-reduces a gradient
    after it accumulates, so an update in the hook would apply the local gradient and the ranks would drift
    apart (measured: 2 gloo ranks, 3 steps, weights 1e-2 apart, no error). Checked at the first hook of a
    backward (the process group does not change within one), before any update. FSDP2 assigns reduced
    gradients to its sharded parameters directly, which runs no hook: step() updates them, correctly."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world > 1 and not _dtensor.any_dtensor([p]):
        raise RuntimeError(
            f"Invalid step_in_backward=True with torch.distributed (world size {world}): DDP all-reduces each "
            "gradient after it accumulates, so the update in backward would use this rank's local gradient and "
            "the ranks would drift apart; use step_in_backward=False with DDP"
        )


def _make_hook(owner: weakref.ref, method: Callable[..., None] | None = None) -> Callable[..., None]:
    """A callback of one optimizer that autograd runs: by default the post-accumulate-grad hook of its
    parameters (``_update_in_backward``), else ``method``. It holds a weak reference: a hook must not keep
    its optimizer alive, nor update parameters for an optimizer that is gone (a model often outlives its
    optimizer: LP-FT, a second profile)."""
    method = FusedOptimizer._update_in_backward if method is None else method

    def hook(*args) -> None:
        optimizer = owner()
        if optimizer is not None:
            method(optimizer, *args)

    return hook
