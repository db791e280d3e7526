"""``vaekit run``: train a model and write a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import RunConfig
from ..registry import PluginSpec


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def run(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML file with run settings; flags override it.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Dataset name (mnist, digits, …) or a path (.npy/.npz, IDX, image folder).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="Encoder plugin, e.g. 'conv' or 'mlp:hidden=512,256'.")] = None,
    decoder: Annotated[Optional[str], typer.Option(help="Decoder plugin (default: the encoder's mirror, e.g. mlp:hidden=500,2000 gets mlp:hidden=2000,500).")] = None,
    prior: Annotated[Optional[str], typer.Option(help="Prior plugin: 'gaussian' (VAE) or 'none' (autoencoder).")] = None,
    likelihood: Annotated[Optional[str], typer.Option(help="Likelihood plugin: 'bernoulli' or 'gaussian:sigma=0.1'.")] = None,
    regularizer: Annotated[Optional[list[str]], typer.Option(help="Regularizer plugin; repeat for several.")] = None,
    objective: Annotated[Optional[str], typer.Option(help="Training objective: 'elbo' (default; options beta, warmup=N, cycles=M, ratio, free_bits=λ) or 'iwae:k=5'.")] = None,
    latent_dim: Annotated[Optional[int], typer.Option(help="Latent dimension d.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Weight β of the KL term (the elbo objective's β unless it sets its own).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Number of epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Mini-batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (runs are deterministic on the CPU).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    binarize: Annotated[Optional[str], typer.Option(help="dynamic, static, none, or auto (the likelihood's default).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, bf16 (autocast; CPU and CUDA) or fp16 (autocast + gradient scaler; for CUDA).")] = None,
    condition: Annotated[Optional[str], typer.Option(help="none, or label: a conditional VAE (Sohn et al. 2015) on the dataset's labels.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<time>-<encoder>-<prior>).")] = None,
    no_fused_op: Annotated[bool, typer.Option("--no-fused-op", help="Use the eager reparameterize + KL formula instead of the fused op (sets the prior's fused=false).")] = False,
    init: Annotated[Optional[Path], typer.Option(help="Start from this run's weights, matched by name (fine-tuning); tensors it lacks keep their initialization.")] = None,
    pretrain: Annotated[Optional[str], typer.Option(help="Pretraining before training, e.g. 'layerwise:epochs=5,mask=0.2' (stacked autoencoder).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Also checkpoint every N optimizer steps mid-epoch (default 0: at each epoch's end only); --resume continues at the exact batch.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps in all, with a checkpoint (mid-epoch if it falls there); --resume --max-steps M continues to M (0: no limit).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Read training batches in N DataLoader worker processes (data read from disk; results do not depend on N). Default 0.")] = None,
    compile: Annotated[Optional[str], typer.Option(help="torch.compile the training step: off (default), default, reduce-overhead (CUDA graphs on a GPU) or max-autotune; the first steps compile (time reported). May change on --resume.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Resize every image of an image folder to H x H pixels (the file dataset's image_size option).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its last checkpoint (one that never checkpointed starts again from epoch 1); only --epochs and --max-steps (recorded) and --workers may change.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out: deletes vaekit's own files there (config.json, weights, trainer state, metrics.jsonl, figures), nothing else.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Per-epoch lines only, no progress bar.")] = False,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Write no PNG figures at the end (they can fail without losing the run anyway).")] = False,
) -> None:
    """Train an (variational) autoencoder and write config.json, model.safetensors, metrics and figures."""
    from ..training import resume as resume_run
    from ..training import train

    if resume is not None:
        # any flag given on the command line, whatever its value (--beta 0, --seed 0, --no-fused-op)
        allowed = {"resume", "epochs", "max_steps", "workers", "compile", "quiet", "no_progress", "no_figures"}
        given = [p.opts[0] for p in ctx.command.params if p.name not in allowed
                 and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]
        if given:
            from ..errors import ConfigError

            raise ConfigError(f"--resume continues a run as configured; only --epochs may change (got {given[0]}), "
                              "with --max-steps, --workers and --compile")
        result = resume_run(resume, epochs=epochs, max_steps=max_steps, workers=workers, compile=compile, quiet=quiet,
                            progress=not no_progress, figures=not no_figures)
    else:
        base = RunConfig.from_toml(config) if config is not None else RunConfig()
        cfg = base.replace(
            data=data, encoder=encoder, decoder=decoder, prior=prior, likelihood=likelihood,
            regularizers=regularizer, objective=objective, latent_dim=latent_dim, beta=beta, epochs=epochs, batch_size=batch_size,
            lr=lr, seed=seed, device=device, binarize=binarize, precision=precision, condition=condition, out=None if out is None else str(out),
            init=None if init is None else str(init), pretrain=pretrain, checkpoint_every=checkpoint_every,
            max_steps=max_steps, workers=workers, compile=compile,
        )
        if image_size is not None:  # an option of the dataset (file:image_size=H); another dataset says it has none
            cfg = cfg.replace(data=PluginSpec(cfg.data.name, {**cfg.data.options, "image_size": image_size}))
        if no_fused_op:  # the prior's own option; a prior without one says so
            cfg = cfg.replace(prior=PluginSpec(cfg.prior.name, {**cfg.prior.options, "fused": False}))
        cfg = RunConfig.from_dict(cfg.to_dict())  # re-validate the flags
        result = train(cfg, quiet=quiet, progress=not no_progress, figures=not no_figures, overwrite=overwrite)
    from ..distributed import env_rank

    if not quiet and env_rank() == 0:  # under torchrun: rank 0 alone
        typer.echo(f"run written to {result.run_dir}")
