"""The accuracy harness: finetune, sweep, dry_run, demo, distributed (DDP, FSDP2), data/ and diagnostics/.
May import every part below it (ground, kernels, optim, vision, memory); above it are only cli, doctor, fused_ft.
Needs the [vision] extra, and [plots] for the --plot PNGs.
"""
