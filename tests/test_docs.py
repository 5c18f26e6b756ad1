"""The README is checked against the code, whatever it says: every `medrega`, `make` and `dvc`
command it shows (code blocks, with the flags their comments name, and inline code) exists with
those flags; every params key it names (`tune.launcher.kind`, `-S evaluate.x=...`) is in the
schema; what it calls `cache: false` is `cache: false` in dvc.yaml. Behaviour the README states
(exit codes, dvc.lock in git, experiments) is tested where it happens: tests/test_entry_points.py,
tests/test_experiments.py, tests/test_experiment_restore.py."""
from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import shlex
import typing
from pathlib import Path

import yaml

from tests.conftest import REPO

README = REPO / "README.md"
PROGRAMS = ("medrega", "dvc", "make")
SEPARATORS = {"&&", "||", ";", "|", "&"}
PLACEHOLDERS = {"...", "…"}  # `medrega ...`: any command; what follows is not checked


def _segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line: tokens split at && || ; | &."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not shell, prose
        return []
    out, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            out.append(current)
            current = []
        else:
            current.append(token)
    return [seg for seg in out + [current] if seg]


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
    """('medrega', args) for `.venv/bin/medrega args`, after leading VAR=value assignments."""
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=\S*", tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    name = Path(tokens[0]).name if tokens[0].startswith((".venv/bin/", "./.venv/bin/")) else tokens[0]
    if name not in PROGRAMS:
        return None
    # `[--aws-profile medrega]`: an optional part is still part of the command
    return name, [t.strip("[]") for t in tokens[1:] if t.strip("[]")]


def readme_commands(text: str) -> list[tuple[str, list[str], str]]:
    """(program, args, where) for every command the README shows. In code blocks a comment's
    `--flags` belong to the command on its line (`medrega status  # --json for tools`)."""
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            comment_at = re.search(r"(^|\s)#(\s|$)", line)
            code = line[:comment_at.start()] if comment_at else line
            comment = line[comment_at.end():] if comment_at else ""
            for seg in _segments(code):
                hit = _program(seg)
                if hit:
                    extra = re.findall(r"(?<![\w-])--[a-z][\w-]*", comment)
                    found.append((hit[0], hit[1] + extra, line.strip()))
            found += [(*hit, line.strip()) for span in re.findall(r"`([^`]+)`", comment)
                      for seg in _segments(span) if (hit := _program(seg))]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    for span in re.findall(r"`([^`\n]+)`", prose):
        for seg in _segments(span):
            hit = _program(seg)
            if hit:
                found.append((hit[0], hit[1], span))
    return found


# -- what each program accepts -------------------------------------------------------------------

@functools.cache
def _help_exit(path: tuple[str, ...]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from cli import app

    shown = CliRunner().invoke(app, [*path, "--help"])
    return shown.exit_code, shown.output[-300:]


def _medrega_errors(args: list[str]) -> list[str]:
    """The command path must exist and every --flag must be one of that command's options."""
    import typer.main

    from cli import app

    command, path, rest = typer.main.get_command(app), [], list(args)
    rest = rest[:next((i for i, t in enumerate(rest) if t in PLACEHOLDERS), len(rest))]
    while rest and hasattr(command, "list_commands") and not rest[0].startswith("-"):
        sub = command.get_command(command.context_class(command), rest[0])
        if sub is None:
            return [f"no command `medrega {' '.join(path + [rest[0]])}`"]
        command, path, rest = sub, path + [rest[0]], rest[1:]
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    bad = [t.split("=", 1)[0] for t in rest if t.startswith("-") and t.split("=", 1)[0] not in options]
    errors = [f"`medrega {' '.join(path)}` has no option {flag}" for flag in bad]
    code, output = _help_exit(tuple(path))
    if code != 0:
        errors.append(f"`medrega {' '.join(path)} --help` exits {code}: {output}")
    return errors


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _dvc_errors(args: list[str]) -> list[str]:
    """DVC's own argument parser: the subcommand path must exist, every --flag be one of its."""
    from dvc.cli.parser import get_main_parser

    parser, path, rest = get_main_parser(), [], list(args)
    rest = rest[:next((i for i, t in enumerate(rest) if t in PLACEHOLDERS), len(rest))]
    while rest and rest[0] in _subparsers(parser):
        parser, path, rest = _subparsers(parser)[rest[0]], path + [rest[0]], rest[1:]
    if rest and _subparsers(parser) and not rest[0].startswith("-"):
        return [f"no command `dvc {' '.join(path + [rest[0]])}`"]
    options = {o for a in parser._actions for o in a.option_strings}
    bad = [t.split("=", 1)[0] for t in rest if t.startswith("-") and t.split("=", 1)[0] not in options]
    return [f"`dvc {' '.join(path)}` has no option {flag}" for flag in bad]


def _make_errors(args: list[str]) -> list[str]:
    """Targets must be Makefile rules; VAR=value must name a variable the Makefile uses."""
    makefile = (REPO / "Makefile").read_text()
    rules = {t for line in re.findall(r"^([^\s#:=][^:=]*):(?!=)", makefile, re.MULTILINE) for t in line.split()}
    errors = []
    for arg in args:
        if "=" in arg:
            var = arg.split("=", 1)[0]
            if not re.search(rf"\b{re.escape(var)}\b", makefile):
                errors.append(f"the Makefile has no variable {var}")
        elif not arg.startswith("-") and arg not in rules:
            errors.append(f"the Makefile has no target {arg!r}")
    return errors


CHECKERS = {"medrega": _medrega_errors, "dvc": _dvc_errors, "make": _make_errors}


def test_the_readme_shows_commands_of_all_three_programs():
    # the extractor finds what is there (a regression in it would make the next test vacuous)
    found = {program for program, _, _ in readme_commands(README.read_text(encoding="utf-8"))}
    assert found == set(PROGRAMS), found


def test_every_command_in_the_readme_exists_with_its_flags():
    problems = []
    for program, args, where in readme_commands(README.read_text(encoding="utf-8")):
        problems += [f"{where!r}: {e}" for e in CHECKERS[program](args)]
    assert problems == [], "\n".join(problems)


def test_the_checkers_refuse_what_does_not_exist():
    assert _medrega_errors(["pipeline", "--no-such-flag"]) and _medrega_errors(["no-such-command"])
    assert _dvc_errors(["exp", "run", "--no-such-flag"]) and _dvc_errors(["exp", "no-such-command"])
    assert _make_errors(["no-such-target"]) and _make_errors(["ui", "NO_SUCH_VARIABLE=1"])
    assert not _medrega_errors(["remote", "s3", "--bucket", "b", "--no-default"])
    assert not _dvc_errors(["exp", "run", "-S", "evaluate.max_new_tokens=4", "--queue"])


# -- params keys and caching ------------------------------------------------------------------------

def _models(annotation) -> list[type]:
    """The config sections inside a field's type (`X | None`, `list[X]`)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def key_exists(key: str) -> bool:
    """`tune.launcher.kind` is a params key; an UPPERCASE part stands for any name
    (`evaluate.plugins.NAME.model_path`)."""
    from medrega.config import Config

    models: list[type] = [Config]
    for part in key.split("."):
        fields = [(name, f) for m in models for name, f in m.model_fields.items()]
        matched = [f for name, f in fields if part.isupper() or part in (name, f.alias)]
        if not matched:
            return False
        models = [m for f in matched for m in _models(f.annotation)]
    return True


def readme_params_keys(text: str) -> list[str]:
    """Dotted params keys the README names: `model.checkpoint`, `tune.launcher.kind: slurm`,
    and the keys of `dvc exp run -S key=value`. Files (`data.dvc`) and modules are not keys."""
    from medrega.config import SECTIONS

    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    spans = re.findall(r"`([^`\n]+)`", prose)
    keys = [m.group(1) for span in spans if (m := re.fullmatch(rf"((?:{'|'.join(SECTIONS)})(?:\.\w+)+)(?:\s*[:=].*)?", span))]
    # `dvc exp run -S evaluate.x=8`, `-S +register.y=true`, `-S params.yaml:tune.z=1`, in code or prose
    sets = re.findall(r"(?:-S|--set-param)[ =]\+?(?:[\w.-]+:)?([A-Za-z_][\w.]*)=", text)
    keys += [k for k in sets if k.split(".")[0] in SECTIONS]
    return [k for k in keys if not (REPO / k).exists() and not _is_module(k)]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def test_every_params_key_in_the_readme_is_in_the_schema():
    text = README.read_text(encoding="utf-8")
    keys = readme_params_keys(text)
    assert keys, "found no params key in the README (the extractor is broken)"
    assert [k for k in keys if not key_exists(k)] == []
    assert not key_exists("tune.launcher.no_such_key") and key_exists("evaluate.plugins.NAME.model_path")


def _uncached_outputs() -> set[str]:
    """Outputs dvc.yaml declares `cache: false`, with `${...}` filled from params.yaml."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def fill(path: str) -> str:
        return re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(params, m.group(1))), path)

    out = set()
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for entry in stage.get("outs", []) + stage.get("metrics", []):
            if isinstance(entry, dict):
                out |= {fill(path) for path, opts in entry.items() if opts and opts.get("cache") is False}
    return out


def _lookup(params: dict, dotted: str):
    for part in dotted.split("."):
        params = params[part]
    return params


def test_what_the_readme_calls_cache_false_is_cache_false_in_dvc_yaml():
    # a sentence that says `cache: false` names the files it means
    uncached = _uncached_outputs()
    claims = []
    for sentence in re.split(r"(?<=[.!?:;])\s+", README.read_text(encoding="utf-8")):
        if "cache: false" in sentence:
            claims += [p for p in re.findall(r"`([\w./-]+\.\w+)`", sentence)
                       if "/" in p or p.startswith("params.")]
    assert [c for c in claims if c not in uncached and c not in ("dvc.lock", "data.dvc")] == []
    assert "params.resolved.yaml" in uncached
