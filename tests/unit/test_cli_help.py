"""The entry points the README leads with answer --help with their own usage, options and examples."""

import pytest

from cluster.cli import main


@pytest.mark.parametrize(("command", "usage"), [
    ("batch", "usage: personalize batch [-h] [-v] config [overrides ...]"),
    ("sweep", "usage: personalize sweep [-h] [-v] config [overrides ...]"),
    ("stack", "usage: personalize stack [-h]"),
])
def test_ray_subcommands_answer_help(command, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith(usage) and "examples:" in out and f"personalize {command} " in out.split("examples:")[1]
