"""The command line: every stage takes a resolved config or resolves one; failures exit with
the code of their kind and leave a failure file the flow reads."""
import pytest
from typer.testing import CliRunner

from cli import app
from medrega import errors

STAGES = ["generate", "validate", "materialize", "align", "tune", "evaluate", "register"]


@pytest.mark.parametrize("command", STAGES)
def test_every_stage_takes_a_resolved_config_or_a_profile(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--config" in result.output and "--profile" in result.output


def test_bad_input_exits_3_names_the_file_and_leaves_a_failure_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tests.conftest import REPO

    repo_params = REPO / "params.yaml"
    result = CliRunner().invoke(app, ["validate", "--params", str(repo_params), "--data", str(tmp_path / "nothing"),
                                      "--out", str(tmp_path / "v")])
    assert result.exit_code == 3, result.output
    assert "nothing" in result.output and "index readable" in result.output
    failure = errors.read_failure("validate", tmp_path)
    assert failure["kind"] == "bad_input" and failure["exit_code"] == 3 and "nothing" in failure["message"]


def test_a_config_error_exits_3_naming_file_and_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("tune:\n  max_step: 10\n")
    result = CliRunner().invoke(app, ["config", "show", "--params", str(bad)])
    assert result.exit_code == 3
    assert str(bad) in result.output and "tune.max_step: unknown key" in result.output


def test_config_resolve_writes_what_config_show_reads(tmp_path):
    from tests.conftest import REPO

    out = tmp_path / "resolved.yaml"
    assert CliRunner().invoke(app, ["config", "resolve", "--params", str(REPO / "params.yaml"),
                                    "--profile", "h800-cluster", "--out", str(out)]).exit_code == 0
    shown = CliRunner().invoke(app, ["config", "show", "--config", str(out)])
    assert shown.exit_code == 0 and "profile: h800-cluster" in shown.output
    refused = CliRunner().invoke(app, ["config", "show", "--config", str(out), "--profile", "tiny"])
    assert refused.exit_code == 3 and "already resolved" in refused.output
