"""`python -m cli`: the `medrega` command as dvc.yaml's stages run it (through scripts/medrega).

The same application as the console script, plus one duty that only a stage command can take:
a stage that fails inside a `dvc exp run` in the workspace puts the workspace back as it was
before the experiment (medrega/experiments.py), whatever the failure (bad input, a bug, Ctrl-C).
Outside a DVC experiment that step does nothing.
"""
from __future__ import annotations

from cli import app


def main() -> None:
    from medrega import experiments

    try:
        app(prog_name="medrega")
    except SystemExit as done:  # typer always ends with one; a non-zero code is a failure
        if done.code not in (0, None):
            experiments.on_stage_failure()
        raise
    except BaseException:  # an uncaught bug (exit 1 with its traceback) or an interrupt
        experiments.on_stage_failure()
        raise


if __name__ == "__main__":
    main()
