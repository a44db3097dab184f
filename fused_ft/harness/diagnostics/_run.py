"""The diagnostic of the run a user is about to start: a model name and a data SPEC, as the harness reads them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fused_ft.harness.diagnostics._measure import DEFAULT_BATCHES, DEFAULT_BATCH_SIZE, LayerGradNorm, \
    grad_norms_over_head_seeds
from fused_ft.harness.diagnostics._verdict import NOISE, Verdict, verdict

NOISE_CLASSES = 10


@dataclass
class Diagnosis:
    """``runs``: one list of :class:`LayerGradNorm` per head seed; ``verdict`` over all of them."""

    model: str
    data: str
    runs: list[list[LayerGradNorm]]
    verdict: Verdict


def no_data_error(model: str) -> str:
    from fused_ft.harness.data import DATA_KINDS

    return (f"Invalid --data: none given for the pretrained {model}; a verdict about it needs the data it will be "
            f"fine-tuned on: --data {DATA_KINDS}, or --data noise (a smoke test, no advice)")


def diagnose(model: str, data: str, *, pretrained: Any = False, checkpoint: str | None = None,
             image_size: int | None = None, num_classes: int | None = None, head_seeds: Sequence[int] = (0, 1, 2),
             batches: int = DEFAULT_BATCHES, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
             device: str | None = None, progress: bool = False, **embedding_options) -> Diagnosis:
    """Layer gradient norms and the verdict for fine-tuning ``model`` on ``data``.

    ``data`` is a harness SPEC (:func:`fused_ft.harness.data.load_data`: ``shift-lab``, ``imagefolder:DIR``,
    ...), loaded with that dataset's preprocessing; the measurement reads ``batches`` minibatches of
    ``batch_size`` training images, drawn with ``seed``, with the test-time transform (no
    augmentation). The head has the data's number of classes and is built per head seed exactly as
    ``fused-ft finetune --seed S`` builds it. ``data="noise"`` measures on standard-normal images with
    ``num_classes`` (default 10) random labels: a smoke test of the model, with no advice.

    Raises:
        ValueError (DataError, PretrainedWeightsError): bad data, a ``num_classes`` the data
        contradicts, weights that cannot be loaded, an image size the model cannot take.
    """
    from fused_ft.harness.finetune import build_classifier, check_device, check_weights
    from fused_ft.vision.models import check_input_size, input_size

    check_weights(model, pretrained, checkpoint)
    check_device(device)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = image_size

    def build(classes: int):
        def build_model():
            built = build_classifier(model, classes, pretrained, checkpoint, image_size, progress)
            check_input_size(built, size or input_size(built), model)  # as the run checks it, before any batch
            return built.to(target)
        return build_model

    if data == NOISE:
        classes = num_classes or NOISE_CLASSES
        if size is None:  # the model's own resolution: build one to read it
            with torch.random.fork_rng(devices=[]):
                size = input_size(build_classifier(model, classes, pretrained, checkpoint, None, progress))
        gen = torch.Generator().manual_seed(seed)
        source = [(torch.randn(batch_size, 3, size, size, generator=gen),
                   torch.randint(0, classes, (batch_size,), generator=gen)) for _ in range(batches)]
    else:
        from fused_ft.harness.data import load_data

        bundle = load_data(data, image_size=image_size or 224)
        if num_classes is not None and num_classes != bundle.num_classes:
            raise ValueError(f"Invalid --num-classes: {num_classes} (the data {bundle.name} has "
                             f"{bundle.num_classes} classes; drop --num-classes)")
        classes, size = bundle.num_classes, bundle.image_size
        source = bundle.train_without_augmentation()
    runs = grad_norms_over_head_seeds(build(classes), source, head_seeds, batches=batches, batch_size=batch_size,
                                      seed=seed, progress=progress, **embedding_options)
    return Diagnosis(model, data, runs, verdict(runs, data=data))
