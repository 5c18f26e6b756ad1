import pytest
from typer.testing import CliRunner

from medrega.cli import app

STAGES = ["generate", "validate", "materialize", "align", "tune", "evaluate", "register", "pipeline"]


@pytest.mark.parametrize("command", STAGES)
def test_every_stage_has_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--params" in result.output or command == "pipeline"


def test_bad_input_exits_3_with_the_file_named(tmp_path):
    # validate on a folder with no dataset index: a clear message and the bad-input code
    result = CliRunner().invoke(app, ["validate", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "v")])
    assert result.exit_code == 3
    assert "nothing" in result.output
