"""What every fused_ft optimizer shares: frozen groups, two-phase steps, backend dispatch.

A step runs in two phases. The plan phase checks every group (hyperparameters, gradients,
backend) and touches nothing; only when all groups pass does the update phase create state and
change parameters. So a step that raises leaves parameters and state exactly as they were.

Frozen groups (``frozen=True``) are skipped before anything else: no launch, no state (zero
bytes, not zero-filled tensors), no gradient needed. Turning ``frozen`` off later (gradual
unfreezing) creates their state lazily on the next step, as for a new parameter.

With ``step_in_backward=True`` each parameter is updated by a post-accumulate-grad hook as soon as
its gradient is complete, and the gradient is freed right away: only a few gradients are alive at
once (the idea of torch's "optimizer step in backward" recipe). ``step()`` then only updates
parameters that took gradients before they had a hook (unfrozen since the last step) and hooks them;
keep calling it, schedulers count it. Closures, GradScaler and gradient accumulation across backward passes cannot work.

Parameters in bf16/fp16 keep their optimizer state in fp32 and every backend does its math in
fp32, storing the parameter once (the "fp32 math, one final store" rule of optimi/apex). How that
store rounds bf16 parameters is the group's ``bf16_update`` (see :mod:`fused_ft._precision`).
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch.optim import Optimizer

from fused_ft import _dispatch
from fused_ft._native import _C
from fused_ft._precision import BF16_UPDATE, COMPENSATION_KEY, LOW_PRECISION, Rounding, stream_key
from fused_ft import _dtensor
from fused_ft._validation import BOOL, OPTIONAL_BOOL, Rule, check_group, check_params

__all__ = ["FusedOptimizer", "GroupPlan", "SHARED_ARGS_DOC", "UpdateFn"]

# A backend's update function (see fused_ft._dispatch): tensor lists and resolved scalars in, nothing out.
UpdateFn = Callable[..., None]

# The Args lines every optimizer shares, substituted for ``{shared_args}`` in each class docstring.
SHARED_ARGS_DOC = """backend (str): ``"auto"`` (default), ``"reference"``, ``"triton"`` or ``"cpu"``.
        step_in_backward (bool): update each parameter during backward, as soon as its gradient
            is complete, and free the gradient (see :mod:`fused_ft.optim._base`) (default: False).
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
    if group.get("capturable"):
        raise ValueError(
            "Invalid capturable: True (fused_ft does not support CUDA graph capture yet; "
            "use torch.optim with capturable=True)"
        )
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("Invalid fused=True with foreach=True: choose one")  # torch.optim's type


def _refuse_grad(index: int, i: int, p: torch.Tensor) -> None:
    # built only on failure: formatting this for every parameter cost ~2% of a ViT-B SGD step
    raise ValueError(
        f"Invalid grad: group {index} param {i} (shape {tuple(p.shape)}) has a sparse gradient; fused_ft "
        "optimizers need dense gradients (torch.optim.SparseAdam handles sparse ones)"
    )


def _by_device(index: int, params: list[torch.Tensor]) -> dict[torch.device, tuple[list, list, frozenset]]:
    """The parameters that have gradients, their gradients and their dtypes, by device; sparse
    gradients refused.

    This is most of a step's host work, and torch's own fused step is the bar, so it checks what
    torch lets through and no more, in one C++ pass where the extension is built: torch's grad setter
    and autograd keep a gradient shaped, typed and placed like its parameter, but allow sparse ones.
    (A `.data` swap that breaks those rules is caught by the kernel backends' layout check, flat_ok.)
    """
    if _C is not None:
        kept, grads, sparse, one_device, dtypes = _C.params_with_grads(params)
    else:
        grads = [p.grad for p in params]
        sparse = next((i for i, g in enumerate(grads) if g is not None and g.is_sparse), -1)
        kept = [p for p, g in zip(params, grads) if g is not None]
        grads = [g for g in grads if g is not None]
        one_device, dtypes = len({p.device for p in kept}) <= 1, {p.dtype for p in kept}
    if sparse >= 0:
        _refuse_grad(index, sparse, params[sparse])
    if not kept:
        return {torch.device("cpu"): ([], [], frozenset())}  # groups without grads still tick (LAMB's step)
    if one_device:
        return {kept[0].device: (kept, grads, frozenset(dtypes))}
    by_device: dict[torch.device, tuple[list, list, frozenset]] = {}
    for p, g in zip(kept, grads):
        entry = by_device.setdefault(p.device, ([], [], set()))
        entry[0].append(p)
        entry[1].append(g)
        entry[2].add(p.dtype)
    return {device: (ps, gs, frozenset(ds)) for device, (ps, gs, ds) in by_device.items()}


@dataclass
class GroupPlan:
    """One param group's share of a step, on one device, checked and ready to run."""

    group: dict
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    backend: str
    update: UpdateFn
    dtypes: frozenset = frozenset()
    clip: Any = None  # LAMB: the global gradient clipping, in the backend's form (set by _before_updates)


class FusedOptimizer(Optimizer):
    """Base of fused_ft.SGD, AdamW, LARS and LAMB (see those for the math)."""

    _NAME: ClassVar[str]  # the key into fused_ft.optim.OPTIMIZER_CLASSES and the backends' UPDATES
    _RULES: ClassVar[Mapping[str, Rule]]
    _CROSS_CHECKS: ClassVar[Sequence[Callable[[Mapping[str, Any]], None]]] = ()
    # True where the update needs norms of whole tensors (LARS/LAMB trust ratios): on sharded
    # parameters only the reference backend, which all-reduces them, can run it
    _WHOLE_TENSOR_NORMS: ClassVar[bool] = False

    def __init__(
        self, params: Iterable, defaults: dict[str, Any], *, backend: str = "auto", step_in_backward: bool = False,
        bf16_update: str = "nearest", bf16_seed: int | None = None,
    ) -> None:
        self.backend = _dispatch.check_backend_name(backend)
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"Invalid step_in_backward: {step_in_backward!r} (must be a bool)")
        self.step_in_backward = step_in_backward
        self._hooks: list = []
        self._hooked: set[int] = set()
        self._round_seen: dict[int, set[int]] = {}
        self._checked_groups: dict[int, dict] = {}  # id(group) -> the hyperparameters that last passed
        if step_in_backward:
            self._check_step_in_backward(defaults)
            # GradScaler then passes its scale to step(), which refuses it (see step()) instead of
            # letting scaled gradients update the weights during backward
            self._step_supports_amp_scaling = True
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

    # -- groups ---------------------------------------------------------------------------------
    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        check_group(group, {**IMPLEMENTATION_RULES, **self._RULES}, (check_implementation_flags, *self._CROSS_CHECKS))

    @functools.cached_property
    def _rule_names(self) -> frozenset[str]:
        return frozenset(IMPLEMENTATION_RULES) | frozenset(self._RULES)

    def _check_group_for_step(self, group: dict) -> None:
        """``_check_hyperparameters`` where the group's checked values changed since they last passed:
        a scheduler that changes lr is caught at the next step, an unchanged group costs one dict
        comparison (the full check was a tenth of a small model's step). Tensor values are compared
        by identity and version, so an in-place change is seen too; a list is copied for the same
        reason. Only the keys the rules check count (LAMB's group step changes every step)."""
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
                if p.requires_grad and id(p) not in self._hooked:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(group)))
                    self._hooked.add(id(p))

    def _make_hook(self, group: dict) -> Callable[[torch.Tensor], None]:
        # a weak reference: a hook must not keep its optimizer alive, nor update parameters for an
        # optimizer that is gone (a model often outlives its optimizer: LP-FT, a second profile)
        owner = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            self = owner()
            if self is None or group["frozen"] or p.grad is None:
                return
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
            with torch.no_grad():
                plans = self._plan_group(index, group, [p])
                self._before_updates(plans)
                for plan in plans:
                    self._update_group(plan)
            p.grad = None  # freed now: this is where the memory goes

        return hook

    def _starts_round(self, group: dict, params: list[torch.Tensor]) -> bool:
        """In step-in-backward mode: does updating ``params`` start a new step of ``group``?

        A step of a group is one backward pass; it starts when a parameter of the group is updated
        a second time (or for the first time ever).
        """
        seen = self._round_seen.setdefault(id(group), set())
        ids = {id(p) for p in params}
        new_round = not seen or bool(seen & ids)
        if new_round:
            seen.clear()
        seen |= ids
        return new_round

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and groups; the backend choice travels too
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # called by unpickling (with "backend") and by load_state_dict (without: keep ours)
        state = dict(state)
        self.backend = state.pop("backend", getattr(self, "backend", "auto"))
        super().__setstate__(state)
        self._checked_groups = {}  # load_state_dict brings new groups: check them at the next step
        # State dicts from torch.optim/timm lack fused_ft's own keys (frozen, ...): use the defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every loaded state tensor to its parameter's dtype: kahan's int16 compensations
        # would become bf16 numbers, so they are set aside and put back as they were
        compensations = {k: s[COMPENSATION_KEY] for k, s in state_dict.get("state", {}).items()
                         if isinstance(s, dict) and COMPENSATION_KEY in s}
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        by_id = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"])))
        for k, comp in compensations.items():
            self.state[by_id[k]][COMPENSATION_KEY] = comp.to(device=by_id[k].device, copy=True)
        # fused_ft keeps low-precision params' state in fp32.
        for p, p_state in self.state.items():
            if p.dtype in LOW_PRECISION:
                for key, value in p_state.items():
                    if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                        p_state[key] = value.float()

    # -- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        if self.step_in_backward:
            self._ensure_hooks()
            if closure is not None:
                raise ValueError(
                    "Invalid closure: step_in_backward=True updates parameters during backward, so step() "
                    "cannot re-evaluate the model; call loss.backward() yourself and drop the closure"
                )
            if getattr(self, "grad_scale", None) is not None:
                raise ValueError(
                    "Invalid use with torch.amp.GradScaler: step_in_backward=True applies gradients during "
                    "backward, before GradScaler can unscale or skip them; use bf16 autocast (no scaler) or "
                    "step_in_backward=False"
                )
            # the hooks consumed (and freed) every gradient they saw; what is left came to parameters
            # that took gradients before they were hooked (unfrozen since the last step): update those here
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [plan for index, group in enumerate(self.param_groups) if not group["frozen"]
                 for plan in self._plan_group(index, group)]
        self._before_updates(plans)
        for plan in plans:
            self._update_group(plan)
        return loss

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
            plans.append(GroupPlan(group, params, grads, name, update, dtypes))
        return plans

    def _before_updates(self, plans: list[GroupPlan]) -> None:
        """Hook for work that spans groups (LAMB's global gradient clipping)."""

    def _update_group(self, plan: GroupPlan) -> None:
        raise NotImplementedError

    def _rounding(self, plan: GroupPlan) -> Rounding | None:
        """How this update stores the plan's bf16 parameters (None: to nearest). Called by each
        ``_update_group`` after it created its own state: it advances the group's random stream
        (``bf16_step``, one per update call) or creates kahan's compensation buffers."""
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
        for p, g in zip(plan.params, plan.grads):
            if p.dtype != torch.bfloat16:
                compensations.append(_dtensor.local(g))  # a stand-in of the right size, never touched
                continue
            state = self.state[p]
            comp = state.get(COMPENSATION_KEY)
            if comp is None:
                comp = state[COMPENSATION_KEY] = torch.zeros_like(p, dtype=torch.int16,
                                                                  memory_format=torch.preserve_format)
            compensations.append(_dtensor.local(comp))
        return Rounding(mode, compensations=compensations)
