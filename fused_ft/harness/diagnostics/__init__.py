"""Layer-gradient diagnostics (Kumar et al., Sec. 3.2, Eq. 3.1, Appendix F): does a model need freeze-embed?

``G_l = mean over minibatches B of ||g_l(B)||_2`` at the current (pretrained) weights, on the
fine-tuning data, for every layer ``l`` of :func:`fused_ft.vision.layers.model_layers`, also divided by the
layer's parameter norm and by ``sqrt(#params)``. When the embedding's ``G`` is an outlier against
the middle layers, SGD over-trains it and freezing it is recommended.

The randomly initialised head moves every layer's gradient, so the measurement repeats over
several head seeds (:func:`grad_norms_over_head_seeds`) and :func:`verdict` gives the embedding's
ratio with a bootstrap interval over head seeds and minibatches; an interval that straddles the
threshold is "not separable". :func:`diagnose` does all of it for a model name and a data SPEC, as
``fused-ft grad-norms`` and ``fused-ft sweep`` do.
"""
from fused_ft.harness.diagnostics._measure import (LayerGradNorm, as_batches, grad_norms_over_head_seeds,
                                                   layer_grad_norms, sample_batches)
from fused_ft.harness.diagnostics._report import LayerSummary, plot_grad_norms, render_table, summarize, write_csv
from fused_ft.harness.diagnostics._run import Diagnosis, diagnose, no_data_error
from fused_ft.harness.diagnostics._verdict import NOISE, OUTLIER_RATIO, PAPER, Verdict, bootstrap_grad_norms, verdict

__all__ = ["LayerGradNorm", "LayerSummary", "Verdict", "Diagnosis", "layer_grad_norms", "grad_norms_over_head_seeds",
           "diagnose", "no_data_error", "verdict", "summarize", "render_table", "sample_batches", "as_batches",
           "write_csv", "plot_grad_norms", "bootstrap_grad_norms", "OUTLIER_RATIO", "NOISE", "PAPER"]
