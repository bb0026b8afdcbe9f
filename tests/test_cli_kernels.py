"""The `tritongpt` command: help for every (sub)command, `kernels list` / `kernels compile` (and
`--emit-table` on a toy config table), and bad input reported as one line with exit code 2.

    python -m pytest -q tests/test_cli_kernels.py
"""

import argparse
import os
import shutil
import subprocess
import sys

import pytest
import triton

from tritongpt import cli
from tritongpt.kernels import registry


def command_paths(parser: argparse.ArgumentParser, prefix=()):
    """Every (sub)command path below `parser`, e.g. ("kernels",), ("kernels", "compile")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from command_paths(sub, (*prefix, name))


# every command and subcommand (a command's own parser is built only when it is the one given)
PATHS = [(name,) for name in cli.COMMANDS] + [path for name in cli.COMMANDS
                                              for path in command_paths(cli.build_parser(name))
                                              if path[0] == name and len(path) > 1]


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of cli.main(argv); argparse exits count as exit codes."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def console_script() -> list[str]:
    """The installed `tritongpt` entry point (next to this Python), else `python -m tritongpt`."""
    script = shutil.which("tritongpt", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "tritongpt"]


def without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_every_command_is_listed_in_help(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for name in cli.COMMANDS:
        assert name in out


def test_commands_cover_the_registered_modules():
    assert {p[0] for p in PATHS} == set(cli.COMMANDS)


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_help_of_each_command(path, capsys):
    code, out, err = run_main([*path, "--help"], capsys)
    assert code == 0, err
    assert out.startswith(f"usage: tritongpt {' '.join(path)}")
    if len(path) == 1:  # the module docstring starts with the exact commands to run
        module = __import__(cli.COMMANDS[path[0]][0], fromlist=["run"])
        first_command = next(line.strip() for line in module.__doc__.splitlines()[1:] if line.strip())
        assert first_command.startswith(("tritongpt ", "torchrun ", "python ")), first_command
        assert first_command.split("#")[0].strip() in out


def test_kernels_list(capsys):
    code, out, _ = run_main(["kernels", "list"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(registry.ops())
    for op, line in zip(registry.ops(), lines):
        assert line.split()[:3] == [op, f"--{op.replace('_', '-')}", f"TRITONGPT_{op.upper()}"]
        for name in registry.backends(op):
            assert f" {name}" in line
    assert "torch, triton" in out  # layer_norm's, sorted


@pytest.mark.skipif(not registry.interpreting(), reason="interpreter not on")
def test_kernels_compile_refuses_the_interpreter(capsys):
    code, out, err = run_main(["kernels", "compile", "--arch", "sm_90"], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["tritongpt kernels: error: the compile report needs compilable kernels: "
                                        "unset TRITON_INTERPRET"]


def test_kernels_compile_console_script():
    out = subprocess.run([*console_script(), "kernels", "compile", "--arch", "sm_80", "--filter",
                          "_layer_norm_bwd_reduce"], capture_output=True, text=True, env=without_interpreter(),
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("# compile report for sm_80: 3/3 ok")
    assert len(lines) == 3 + 3 and all(" ok " in line for line in lines[3:])  # title, header, rule, rows


def test_bad_arch_is_one_line_exit_2_console_script():
    out = subprocess.run([*console_script(), "kernels", "compile", "--arch", "sm_99"],
                         capture_output=True, text=True, env=without_interpreter(), timeout=600)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        "tritongpt kernels: error: unknown --arch 'sm_99'; choices: sm_80, sm_86, sm_89, sm_90"]


def test_unknown_backend_is_one_line_exit_2_console_script(tmp_path):
    """A model command given an unknown backend name: one error line naming the choices, exit 2,
    no traceback, and no run directory written."""
    out = subprocess.run([*console_script(), "train", "--layer-norm", "nosuch", "--max-steps", "1",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert errors == ["tritongpt train: error: unknown layer_norm backend 'nosuch' (from layer_norm); "
                      "choices: torch, triton, auto"]
    assert not (tmp_path / "run").exists()


def test_missing_subcommand_is_a_usage_error(capsys):
    code, _, err = run_main(["kernels"], capsys)
    assert code == 2 and "usage: tritongpt kernels" in err


def test_top_level_help_imports_no_torch():
    """`tritongpt --help` only names the commands: no subcommand module (and so no torch) is imported."""
    code = ("import sys, contextlib, io\nfrom tritongpt.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'train' in out.getvalue())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


# A kernel file with a config table: three candidate blocks, one of which (100, not a power of
# two) cannot compile.
TOY_TABLE = '''
from pathlib import Path

import triton
import triton.language as tl

from tritongpt.kernels import compile_report


@triton.jit
def _toy_table_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)


def _candidates(arch):
    for block in (64, 100, 128):
        yield compile_report.jit_variant(_toy_table_kernel, f"BLOCK={block}", {"X": "*fp32", "Y": "*fp32", "N": 4096},
                                         {"BLOCK": block}, table_entry=(f"toy {arch}", f"BLOCK={block}"))


compile_report.register_table(Path(__file__).with_name("toy_configs.json"), _candidates)
'''


def test_kernels_compile_emit_table(tmp_path):
    """--emit-table compiles a table's candidates and records those that pass under this arch and
    Triton version; a second arch joins the same file without replacing the first."""
    (tmp_path / "toy_kernel.py").write_text(TOY_TABLE)
    run = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import toy_kernel; from tritongpt.cli import main; "
           "sys.exit(main(sys.argv[1:]))")
    for arch in ("sm_80", "sm_90"):
        out = subprocess.run([sys.executable, "-c", run, "kernels", "compile", "--arch", arch, "--filter",
                              "_toy_table", "--emit-table"], capture_output=True, text=True,
                             env=without_interpreter(), timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.splitlines()[-1].endswith(f"toy_configs.json: {arch}, triton {triton.__version__}: "
                                                    "2 key/config entries pass (3 variants compiled)")
    from tritongpt.kernels import compile_report
    table = compile_report.read_table(tmp_path / "toy_configs.json")
    for arch in ("sm_80", "sm_90"):
        assert set(table[arch][triton.__version__]) == {f"toy {arch}"}
        assert set(compile_report.passing(table, arch)[f"toy {arch}"]) == {"BLOCK=64", "BLOCK=128"}
