"""Hook specifications: the contract between vaekit and its plugins.

Every hook is named ``vaekit_*``.  Implement hooks with the public marker
:data:`vaekit.hookimpl` in a module or object, and expose it through the
entry-point group ``vaekit`` (see ``docs/plugins.md``).  Built-in plugins in
``vaekit/plugins/`` use the very same hooks.

Hooks are grouped by lifecycle: *registration* hooks run once when the plugin
manager is created and fill registries; *command* hooks add CLI commands;
*fit* hooks run during :func:`vaekit.train`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import typer

    from .registry import Registry
    from .training import Trainer

hookspec = pluggy.HookspecMarker("vaekit")


# --- registration ---------------------------------------------------------------------------

@hookspec
def vaekit_register_encoders(registry: "Registry") -> None:
    """Register encoder plugins.

    :param registry: the encoder :class:`~vaekit.registry.Registry`; call
        ``registry.register(name, factory)``.  The factory is called as
        ``factory(input_shape, **options)`` and returns an
        :class:`~vaekit.interfaces.Encoder`.
    :returns: nothing; results are collected through ``registry``.
    """


@hookspec
def vaekit_register_decoders(registry: "Registry") -> None:
    """Register decoder plugins.

    :param registry: the decoder registry; factories are called as
        ``factory(latent_dim, output_shape, **options)`` and return a
        :class:`~vaekit.interfaces.Decoder`.
    :returns: nothing.
    """


@hookspec
def vaekit_register_priors(registry: "Registry") -> None:
    """Register priors p(z), each with the posterior family q(z|x) it pairs with.

    :param registry: the prior registry; factories are called as
        ``factory(latent_dim, **options)`` and return a
        :class:`~vaekit.interfaces.Prior`.
    :returns: nothing.
    """


@hookspec
def vaekit_register_likelihoods(registry: "Registry") -> None:
    """Register likelihoods p(x|z).

    :param registry: the likelihood registry; factories are called as
        ``factory(data_shape, **options)`` and return a
        :class:`~vaekit.interfaces.Likelihood`.
    :returns: nothing.
    """


@hookspec
def vaekit_register_regularizers(registry: "Registry") -> None:
    """Register regularizers (penalties, input corruptions, latent transforms).

    :param registry: the regularizer registry; factories are called as
        ``factory(latent_dim, data_shape, **options)`` and return a
        :class:`~vaekit.interfaces.Regularizer`.
    :returns: nothing.
    """


@hookspec
def vaekit_register_objectives(registry: "Registry") -> None:
    """Register training objectives (the loss a run minimises: ``elbo``, ``iwae``, ...).

    :param registry: the objective registry; factories are called as
        ``factory(config, **options)`` (``config``: the run's :class:`~vaekit.config.RunConfig`)
        and return a :class:`~vaekit.interfaces.Objective`.
    :returns: nothing.
    """


@hookspec
def vaekit_register_datasets(registry: "Registry") -> None:
    """Register datasets.

    :param registry: the dataset registry; factories are called as
        ``factory(**options)`` and return a :class:`~vaekit.data.DataBundle`.
    :returns: nothing.
    """


# --- commands -------------------------------------------------------------------------------

@hookspec
def vaekit_register_commands(app: "typer.Typer") -> None:
    """Add commands or command groups to the ``vaekit`` CLI.

    :param app: the root Typer application; use ``@app.command()`` or
        ``app.add_typer(...)``.  Raise :class:`vaekit.VaekitError` for bad input
        so the CLI prints one line and exits with code 1.
    :returns: nothing.
    """


# --- fit lifecycle --------------------------------------------------------------------------

@hookspec
def vaekit_fit_start(trainer: "Trainer") -> None:
    """Called once before the first training step (also when a run resumes), after ``--init`` and
    ``--pretrain`` have set the starting weights, so it sees the pretrained model (a clustering
    regularizer can initialize its centroids from the codes here).

    :param trainer: the :class:`~vaekit.training.Trainer`; ``trainer.model``,
        ``trainer.config``, ``trainer.data`` and ``trainer.run_dir`` are set.
    :returns: nothing.
    """


@hookspec
def vaekit_epoch_end(trainer: "Trainer", epoch: int, metrics: "dict[str, Any]") -> None:
    """Called after each epoch's evaluation, before its checkpoint: the record, with what plugins add,
    is committed with the checkpoint (docs/runs.md), so a resumed run never loses or repeats it.

    :param trainer: the running trainer.
    :param epoch: the epoch just finished, counting from 1.
    :param metrics: the epoch's metrics record as written to ``metrics.jsonl``
        (train means of every loss term, test ELBO, throughput); a plugin may
        add entries, which are written too.
    :returns: nothing.
    """


@hookspec
def vaekit_fit_end(trainer: "Trainer", metrics: "dict[str, Any]") -> None:
    """Called once after the last epoch, after the final checkpoint and figures.

    :param trainer: the trainer.
    :param metrics: the last epoch's metrics.
    :returns: nothing.
    """
