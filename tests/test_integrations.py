"""fused_ft inside the training loops people use, with the real libraries: timm's optimizer factory,
HF transformers' Trainer, Lightning and Accelerate. These deep-copy, wrap, pickle and checkpoint the
optimizer: each run is checkpointed halfway, resumed in new objects (as a new process would), and the
resumed run must end on the same weights, bit for bit, as the run that was never interrupted.

The libraries are imported inside the tests (transformers and lightning take seconds each): only the
worker that runs a test pays for its import.
"""
from __future__ import annotations

import logging

import pytest
import torch

import fused_ft
from fused_ft.testing.specs import OPTIMIZERS
from tests.helpers import assert_close_tensorwise

STEPS = 8  # checkpointed after STEPS // 2


def tiny_vit(seed: int = 0, drop_rate: float = 0.0) -> torch.nn.Module:
    """A 2-block timm ViT on 16-px images (about 9k parameters): blocks for layer decay, a cls token,
    position embedding, biases and norms for timm's and HF's weight-decay filtering."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=2,
                             embed_dim=16, num_heads=2, num_classes=3, drop_rate=drop_rate)


def images(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{what}: {len(differ)} of {len(sa)} tensors differ, first {differ[:3]}"


def assert_trained(model: torch.nn.Module, seed: int = 0) -> None:
    """Most weights moved from their initial values (two runs that never stepped are equal and prove nothing)."""
    initial = tiny_vit(seed).state_dict()
    moved = [k for k, v in model.state_dict().items() if (v - initial[k]).abs().max() > 1e-5]
    assert len(moved) > len(initial) // 2, moved


# ---------------------------------------------------------------------------------------------- timm


TIMM_NAMES = {"sgd": "fusedftsgd", "adamw": "fusedftadamw", "lars": "fusedftlars", "lamb": "fusedftlamb"}
TIMM_LRS = {"sgd": 0.05, "adamw": 1e-3, "lars": 1.0, "lamb": 1e-3}


@pytest.mark.parametrize("timm_name", sorted(TIMM_NAMES))
def test_timm_factory_builds_the_groups_of_timms_own_entry_and_steps_like_it(timm_name):
    """create_optimizer_v2 with weight decay (none on biases, norms, pos_embed, cls_token) and layer
    decay gives fused_ft's class the groups, hyperparameters and defaults that timm's own entry of the
    same family gets (timm's "sgd" is Nesterov momentum 0.9), and timm's scheduler, which applies each
    group's lr_scale, drives both to the same weights within the parity tolerance."""
    import timm.optim
    import timm.scheduler

    from fused_ft.integrations.timm import register

    register()
    name = TIMM_NAMES[timm_name]
    models = {n: tiny_vit() for n in (name, timm_name)}
    kw = dict(lr=TIMM_LRS[timm_name], weight_decay=0.05, layer_decay=0.75)
    opts = {n: timm.optim.create_optimizer_v2(m, n, **kw) for n, m in models.items()}
    fused, ref = opts[name], opts[timm_name]
    assert type(fused) is fused_ft.optim.OPTIMIZER_CLASSES[timm_name]
    assert type(ref) is not type(fused)

    def named_groups(opt, model):
        names = {id(p): n for n, p in model.named_parameters()}
        return [({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
                for g in opt.param_groups]

    fused_groups, ref_groups = named_groups(fused, models[name]), named_groups(ref, models[timm_name])
    assert len(fused_groups) == len(ref_groups) > 4  # per block, with and without decay
    for (fh, fp), (rh, rp) in zip(fused_groups, ref_groups):
        assert fp == rp
        assert {k: fh.get(k, "missing") for k in rh} == rh  # fused_ft adds only its own keys (frozen, bf16_*)
        assert not fh["frozen"]
    assert {g[0]["weight_decay"] for g in fused_groups} == {0.0, 0.05}
    assert fused_groups[0][0]["lr_scale"] < fused_groups[-1][0]["lr_scale"] == 1.0

    scheds = {n: timm.scheduler.CosineLRScheduler(o, t_initial=STEPS, warmup_t=2, warmup_lr_init=1e-3,
                                                  t_in_epochs=False) for n, o in opts.items()}
    x, y = images(4 * STEPS)
    fused_model, ref_model = models[name], models[timm_name]
    for step in range(STEPS):
        # one gradient, computed on fused_ft's model and given to both: what differs is the optimizer
        fused.zero_grad()
        torch.nn.functional.cross_entropy(fused_model(x[4 * step:4 * step + 4]), y[4 * step:4 * step + 4]).backward()
        for p, q in zip(fused_model.parameters(), ref_model.parameters()):
            q.grad = p.grad.clone()
        for n in opts:
            opts[n].step()
            scheds[n].step_update(step + 1)
    assert [g["lr"] for g in fused.param_groups] == [g["lr"] for g in ref.param_groups]
    # the registry's tolerance, relative to each tensor's scale: the default backend (C++ on CPU) rounds
    # differently from torch's and timm's loops
    for (n, p), q in zip(fused_model.named_parameters(), ref_model.parameters()):
        assert_close_tensorwise(p, q, rtol=OPTIMIZERS[timm_name].reference_rtol, what=f"{name} vs {timm_name}: {n}")
    assert_trained(models[name])


def test_timm_register_is_idempotent_and_refuses_to_replace_another_optimizer(caplog):
    import timm.optim
    from timm.optim._optim_factory import OptimInfo, OptimizerRegistry, default_registry

    from fused_ft.integrations.timm import NAMES, register

    register()
    with caplog.at_level(logging.WARNING, logger="timm"):
        register()  # timm logs "already registered, overwriting" on a second registration: none here
    assert not caplog.records
    assert timm.optim.list_optimizers("fusedft*") == sorted(NAMES) == sorted(TIMM_NAMES.values())
    assert default_registry.get_optimizer_info("fusedsgd").opt_class == "apex.optimizers.FusedSGD"  # apex's kept
    for family, name in TIMM_NAMES.items():
        cls = fused_ft.optim.OPTIMIZER_CLASSES[family]
        assert default_registry.get_optimizer_class(name, bind_defaults=False) is cls
    # a name with "_" would never reach the registry: timm keeps what follows the last "_"
    assert type(timm.optim.create_optimizer_v2(tiny_vit(), "fusedft_sgd", lr=0.1)) is torch.optim.SGD
    looked_ahead = timm.optim.create_optimizer_v2(tiny_vit(), "lookahead_fusedftadamw", lr=0.1)
    assert type(looked_ahead._base_optimizer) is fused_ft.AdamW

    other = OptimizerRegistry()
    from timm.optim._optim_factory import _register_lamb_lars, _register_sgd_variants, _register_adam_variants

    for fill in (_register_sgd_variants, _register_adam_variants, _register_lamb_lars):
        fill(other)
    other.register(OptimInfo(name="fusedftlamb", opt_class=torch.optim.Adam))
    with pytest.raises(ValueError, match="already has 'fusedftlamb' as <class 'torch.optim.adam.Adam'>"):
        register(other)
    assert other.list_optimizers("fusedft*") == ["fusedftlamb"]  # refused whole: nothing registered


# ----------------------------------------------------------------------------- HF transformers.Trainer


@pytest.fixture
def fresh_accelerate_state():
    """transformers' Trainer and Accelerator share accelerate's process-wide state, which refuses another
    mixed-precision setting once set: every test that makes one starts and ends with none."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


class Classifier(torch.nn.Module):
    """A timm model as HF's Trainer takes one: keyword inputs, a dict with the loss out."""

    def __init__(self, drop_rate: float = 0.0):
        super().__init__()
        self.net = tiny_vit(drop_rate=drop_rate)

    def forward(self, pixel_values, labels):
        logits = self.net(pixel_values)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def hf_train(out, how: str, resume=None) -> tuple[torch.nn.Module, list]:
    """STEPS steps of HF's Trainer, checkpointing every STEPS // 2, with a shuffling sampler and dropout
    (both restored on resume from the checkpoint's RNG state). The model, and the optimizer's groups by
    parameter name."""
    from transformers import Trainer, TrainingArguments

    model = Classifier(drop_rate=0.1)
    x, y = images(4 * STEPS)
    data = [{"pixel_values": xi, "labels": yi} for xi, yi in zip(x, y)]
    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=4, save_strategy="steps",
                             save_steps=STEPS // 2, learning_rate=3e-3, weight_decay=0.05, lr_scheduler_type="cosine",
                             warmup_steps=2, seed=0, use_cpu=True, report_to="none", disable_tqdm=True,
                             logging_strategy="no", dataloader_num_workers=0)
    if how == "cls_and_kwargs":  # the Trainer builds the groups (no decay on biases, norms) and the schedule
        cls, kw = fused_ft.AdamW, dict(optimizer_cls_and_kwargs=(fused_ft.AdamW, {"betas": (0.9, 0.99)}))
    else:  # the user builds both
        opt = fused_ft.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS)
        cls, kw = fused_ft.SGD, dict(optimizers=(opt, sched))
    trainer = Trainer(model=model, args=args, train_dataset=data, **kw)
    trainer.train(resume_from_checkpoint=resume)
    assert type(trainer.optimizer.optimizer) is cls and trainer.state.global_step == STEPS
    names = {id(p): n for n, p in model.named_parameters()}
    return model, [({k: g[k] for k in ("weight_decay", "betas") if k in g}, {names[id(p)] for p in g["params"]})
                   for g in trainer.optimizer.param_groups]


@pytest.mark.parametrize("how", ["cls_and_kwargs", "optimizers"])
def test_hf_trainer_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, monkeypatch, how,
                                                                                    fresh_accelerate_state):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    whole, groups = hf_train(tmp_path / "whole", how)
    assert_trained(whole.net)
    assert {p.name for p in (tmp_path / "whole").iterdir()} == {f"checkpoint-{STEPS // 2}", f"checkpoint-{STEPS}"}
    resumed, _ = hf_train(tmp_path / "resumed", how, resume=tmp_path / "whole" / f"checkpoint-{STEPS // 2}")
    assert_same_weights(resumed, whole, f"HF Trainer ({how}) resumed at step {STEPS // 2}")
    if how == "cls_and_kwargs":  # the Trainer's groups (decay on weights only) and the kwargs reached fused_ft
        weights = {n for n, p in whole.named_parameters() if p.ndim > 1}
        others = {n for n, _ in whole.named_parameters()} - weights
        assert groups == [({"weight_decay": 0.05, "betas": (0.9, 0.99)}, weights),
                          ({"weight_decay": 0.0, "betas": (0.9, 0.99)}, others)]


# --------------------------------------------------------------------------------------------- Lightning


def lightning_fit(root, ckpt_path=None) -> torch.nn.Module:
    """Two epochs of 4 batches; ModelCheckpoint saves after each epoch."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_vit()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = fused_ft.LARS(self.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=STEPS)  # cycles momentum too
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = Module()
    # Lightning's checkpoints hold no RNG state: the data come in order, so that a resumed epoch sees the same
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*images(4 * STEPS // 2)), batch_size=4)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    assert trainer.global_step == STEPS and type(trainer.optimizers[0]) is fused_ft.LARS
    return module


@pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers")  # num_workers=0 is the point
@pytest.mark.filterwarnings("ignore:The dirpath has changed from")  # the resumed run writes elsewhere, on purpose
@pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.* is deprecated")  # Lightning 2.6 on torch 2.14, not ours
def test_lightning_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    whole = lightning_fit(tmp_path / "whole")
    assert_trained(whole.net)
    resumed = lightning_fit(tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "epoch=0.ckpt")
    assert_same_weights(resumed, whole, "Lightning resumed after epoch 0")


# -------------------------------------------------------------------------------------------- Accelerate


def test_accelerate_bf16_save_state_load_state_continues_as_the_uninterrupted_run(tmp_path, fresh_accelerate_state):
    """accelerator.prepare(model, optimizer, scheduler) under bf16 autocast on CPU, with dropout (its RNG
    state travels in save_state); a new Accelerator, model and optimizer load the state after step 4."""
    from accelerate import Accelerator

    x, y = images(4 * STEPS)
    seen = set()

    def setup():
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        model = tiny_vit(drop_rate=0.1)
        model.head.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        opt = fused_ft.LAMB(model.parameters(), lr=1e-2, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
        return accelerator, *accelerator.prepare(model, opt, sched)

    def steps(accelerator, model, opt, sched, first, last):
        model.train()
        for i in range(first, last):
            loss = torch.nn.functional.cross_entropy(model(x[4 * i:4 * i + 4]), y[4 * i:4 * i + 4])
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()

    accelerator, whole, opt, sched = setup()
    steps(accelerator, whole, opt, sched, 0, STEPS // 2)
    accelerator.save_state(tmp_path / "half")  # changes nothing: the run goes on uninterrupted
    steps(accelerator, whole, opt, sched, STEPS // 2, STEPS)
    assert type(opt.optimizer) is fused_ft.LAMB and seen == {torch.bfloat16}  # autocast really ran in bf16
    assert_trained(whole)

    accelerator, resumed, opt, sched = setup()
    accelerator.load_state(tmp_path / "half")
    steps(accelerator, resumed, opt, sched, STEPS // 2, STEPS)
    assert_same_weights(resumed, whole, f"Accelerate resumed at step {STEPS // 2}")
