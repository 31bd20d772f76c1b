"""The console script: ``--help`` everywhere, one clear line on errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fraudactors import cli


def _subcommands() -> dict[str, object]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices: dict[str, object] = getattr(sub, "choices", {}) or {}
    return choices


def _script() -> list[str]:
    exe = Path(sys.executable).with_name("fraudactors")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("fraudactors")
    return [found] if found else [sys.executable, "-m", "fraudactors"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}


def test_console_script_help_lists_the_commands() -> None:
    proc = subprocess.run([*_script(), "--help"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "usage: fraudactors" in proc.stdout
    for name in cli.COMMANDS:
        assert name in proc.stdout


def test_demo_is_available() -> None:
    assert "demo" in _subcommands()


def test_every_declared_command_is_in_the_parser() -> None:
    assert set(_subcommands()) == set(cli.COMMANDS)


def test_a_command_whose_module_is_missing_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ghost", "fraudactors.no_such_module")
    with pytest.raises(ModuleNotFoundError, match="no_such_module") as info:
        cli.build_parser()
    assert any("the 'ghost' command (fraudactors.no_such_module) cannot be imported" in note
               for note in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = __import__(cli.COMMANDS[command], fromlist=["HELP"])
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: fraudactors {command}" in out
    assert module.HELP.split()[0] in out


def test_demo_help_shows_its_options() -> None:
    proc = subprocess.run([*_script(), "demo", "--help"], capture_output=True, text=True, timeout=60,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    for option in ("--rate", "--duration", "--report", "--config"):
        assert option in proc.stdout


def test_version() -> None:
    proc = subprocess.run([*_script(), "--version"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0
    assert proc.stdout.startswith("fraudactors ")


def test_unknown_command_fails() -> None:
    proc = subprocess.run([*_script(), "no-such-command"], capture_output=True, text=True, timeout=60,
                          env=_env())
    assert proc.returncode != 0
    assert "no-such-command" in proc.stderr


@pytest.mark.parametrize("argv", [["demo", "--rate", "0"], ["demo", "--duration", "-1"],
                                  ["demo", "--rate", "nan"], ["demo", "--rate", "fast"],
                                  ["demo", "--seed", "-1"], ["demo", "--redis-cluster", "-2"],
                                  ["loadgen", "--warmup", "-5"], ["bench", "state", "--seed", "-3"]])
def test_demo_rejects_bad_numbers(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code != 0
    assert argv[1] in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "flag"), [(["train", "--synthetic", "--seed", "-1"], "--seed"),
                                            (["train", "--synthetic", "--merchants", "0"], "--merchants"),
                                            (["train", "--synthetic", "--out", "/dev/null/models"], "--out")])
def test_train_refuses_bad_arguments_before_any_work(argv: list[str], flag: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1


def test_a_report_path_that_is_a_directory_is_refused_before_the_run(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["loadgen", "--report", str(tmp_path), "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and err.count("\n") == 1


def test_a_load_that_schedules_no_transaction_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["loadgen", "--rate", "0.5", "--duration", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "loadgen.rate" in err and "schedules no transaction" in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "flag"), [
    (["bench", "state", "--records", "0"], "--records"), (["bench", "state", "--users", "0"], "--users"),
    (["bench", "pool", "--concurrency", "0"], "--concurrency"), (["bench", "pool", "--rows", "abc"], "--rows"),
    (["bench", "pool", "--rows", "1,0"], "--rows"), (["bench", "pool", "--calls", "0"], "--calls"),
    (["bench", "drain", "--records", "-5"], "--records"), (["bench", "drain", "--partitions", "0"], "--partitions"),
    (["bench", "scaleout", "--timeout", "0"], "--timeout"), (["bench", "drain", "--peer-records", "0"], "--peer-records"),
])
def test_bench_refuses_counts_below_one_before_any_work(argv: list[str], flag: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Before, --records 0 and --concurrency 0 hung, --rows abc was a traceback, -5 ran."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"fraudactors {' '.join(argv[:2])}: error: argument {flag}"), last


def test_demo_refuses_a_load_that_schedules_nothing_before_starting_any_service(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--rate", "0.5", "--duration", "1", "--report", str(tmp_path / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert "loadgen.rate" in err and err.count("\n") == 1
    assert "starting embedded" not in out


@pytest.mark.parametrize(("argv", "flag"), [(["demo", "--profile", "step", "--steps", "0"], "--steps"),
                                            (["loadgen", "--steps", "-1"], "--steps"),
                                            (["demo", "--engine-timeout", "0"], "--engine-timeout"),
                                            (["demo", "--engine-timeout", "-3"], "--engine-timeout")])
def test_demo_and_loadgen_refuse_bad_steps_and_engine_timeout(argv: list[str], flag: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err.strip().splitlines()[-1]
