"""Built-in plugins, registered through the same hooks as third-party ones."""

DEFAULT_PLUGINS = (
    "vaekit.plugins.encoders",
    "vaekit.plugins.decoders",
    "vaekit.plugins.priors",
    "vaekit.plugins.likelihoods",
    "vaekit.plugins.regularizers",
    "vaekit.plugins.autoencoders",
    "vaekit.plugins.objectives",
    "vaekit.plugins.datasets",
)
