import pytest

from vaekit.config import RunConfig
from vaekit.errors import ConfigError
from vaekit.registry import PluginSpec


def test_toml_config_with_tables_and_strings(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text(
        'encoder = { name = "mlp", hidden = [256, 128] }\n'
        'prior = "gaussian"\nlatent-dim = 8\nepochs = 3\nregularizers = ["a:weight=2"]\n'
    )
    cfg = RunConfig.from_toml(p)
    assert cfg.encoder == PluginSpec("mlp", {"hidden": [256, 128]})
    assert cfg.latent_dim == 8 and cfg.epochs == 3
    assert cfg.regularizers == [PluginSpec("a", {"weight": "2"})]
    assert cfg.decoder is None  # the encoder's mirror (vaekit.model.decoder_spec)
    assert cfg.replace(epochs=5, beta=None).epochs == 5


@pytest.mark.parametrize(
    "text,message",
    [("epochz = 3", "unknown config key 'epochz'; did you mean 'epochs'"), ("epochs = 'many'", "epochs"),
     ("epochs = [", "cannot read config file"), ("device = 'tpu'", "one of auto, cpu, cuda"),
     ("batch-size = 0", "batch-size must be at least 1"),
     ("pretrain = 'layerwise:epochs=0'", "epochs must be at least 1"),
     ("pretrain = 'layerwise:epoch=3'", "pretraining method 'layerwise' has no option 'epoch'.*did you mean 'epochs'"),
     ("pretrain = 'greedy'", "unknown pretraining method 'greedy'; known pretraining methods: layerwise"),
     ("pretrain = { name = 'layerwise', mask = 1.0 }", r"mask must be in \[0, 1\)"),
     ("init = 'runs/a'\npretrain = 'layerwise'", "--init and --pretrain both set the starting weights")],
)
def test_bad_config_files(tmp_path, text, message):
    p = tmp_path / "run.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_toml(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_toml(tmp_path / "nope.toml")


def test_round_trip_through_dict():
    cfg = RunConfig(encoder="conv:channels=16,32", regularizers=["x"], latent_dim=3, pretrain="layerwise:epochs=2")
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
