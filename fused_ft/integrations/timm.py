"""fused_ft's optimizers in timm's optimizer registry.

>>> import timm, timm.optim
>>> from fused_ft.integrations.timm import NAMES, register
>>> register()
>>> model = timm.create_model("resnet10t", num_classes=2)
>>> opt = timm.optim.create_optimizer_v2(model, "fusedftsgd", lr=0.1, weight_decay=1e-4)
>>> type(opt).__module__, [g["weight_decay"] for g in opt.param_groups]
('fused_ft.optim.sgd', [0.0, 0.0001])
>>> sorted(NAMES)
['fusedftadamw', 'fusedftlamb', 'fusedftlars', 'fusedftsgd']

Each name is built like timm's own entry of the same family (``sgd``, ``adamw``, ``lars``, ``lamb``): the
same defaults (timm's ``sgd`` is Nesterov SGD with momentum 0.9), the same arguments kept or dropped,
and so the same parameter groups and the same updates, with timm's weight-decay filtering (no decay
on biases and norms), ``layer_decay`` and ``lookahead_`` prefix.

The names have no underscore: timm's factory keeps only what follows the last ``_`` of the name
(``lookahead_adamw``), so ``"fusedft_sgd"`` would silently build ``torch.optim.SGD``. timm's own
``fusedsgd``/``fusedlamb`` are apex's and are left alone. Freeze-embed and the paper's other methods
build their groups themselves: use :func:`fused_ft.create_optimizer` for those.
"""
from __future__ import annotations

from fused_ft.optim import LAMB, LARS, SGD, AdamW

__all__ = ["NAMES", "register"]

# name -> (class, timm's entry it mirrors)
NAMES = {"fusedftsgd": (SGD, "sgd"), "fusedftadamw": (AdamW, "adamw"),
         "fusedftlars": (LARS, "lars"), "fusedftlamb": (LAMB, "lamb")}


def register(registry=None) -> None:
    """Add ``fusedftsgd``, ``fusedftadamw``, ``fusedftlars`` and ``fusedftlamb`` to timm's optimizer
    registry (``timm.optim._optim_factory.default_registry`` unless ``registry`` is given). Calling it
    again changes nothing (and logs nothing); a name that timm or someone else already gave another
    optimizer is refused, naming both."""
    try:
        from timm.optim import _optim_factory as factory
    except ImportError as e:
        raise ImportError("fused_ft.integrations.timm needs timm>=1.0.12 (its optimizer registry): "
                          "pip install 'fused_ft[vision]'") from e
    if not hasattr(factory, "default_registry"):
        raise ImportError("fused_ft.integrations.timm needs timm>=1.0.12 (its optimizer registry); "
                          f"timm {_timm_version()} has none: pip install -U timm")
    registry = factory.default_registry if registry is None else registry
    infos = []
    for name, (cls, mirrored) in NAMES.items():
        like = registry.get_optimizer_info(mirrored)
        info = factory.OptimInfo(
            name=name, opt_class=cls, description=f"fused_ft.{cls.__name__}: {like.description}",
            has_eps=like.has_eps, has_momentum=like.has_momentum, has_betas=like.has_betas,
            num_betas=like.num_betas, second_order=like.second_order,
            defaults=dict(like.defaults) if like.defaults else None)
        try:
            present = registry.get_optimizer_info(name)
        except ValueError:
            present = None
        if present is not None and present != info:
            raise ValueError(f"timm's optimizer registry already has {name!r} as {present.opt_class!r}; fused_ft."
                             f"integrations.timm.register() would replace it with {cls.__module__}.{cls.__name__}")
        if present is None:
            infos.append(info)
    for info in infos:  # all checked first: a refusal registers nothing
        registry.register(info)


def _timm_version() -> str:
    import timm

    return getattr(timm, "__version__", "?")
