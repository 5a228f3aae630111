"""Each setting has one default: the CLI's shared options carry the spec's values."""

from crv import cli
from crv.attribution.engine import AttributionConfig


def test_cli_options_default_to_the_attribution_spec():
    spec = AttributionConfig()
    assert cli.MAX_FEATURE_NODES == spec.max_feature_nodes and cli.CAP_OPTION.default == spec.max_feature_nodes
    assert cli.BATCH_OPTION.default == spec.batch_size
    for command in ("attribute", "evaluate"):
        callback = next(c.callback for c in cli.app.registered_commands if c.name == command)
        assert callback.__defaults__ is not None and cli.CAP_OPTION in callback.__defaults__, command
