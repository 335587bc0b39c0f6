import os
import subprocess
import sys

import pytest


def run(*args, env_extra=None, cwd=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "influence_tui", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\n"
        "from influence_tui.cli import main\n"
        "for argv in (['--help'], ['list', '--help'], ['generate', '--help'], ['serve', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "main(['list'])\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("influence ")


@pytest.mark.parametrize("cmd", ["search", "download", "list", "generate", "chat", "serve", "deploy", "embed", "config"])
def test_every_subcommand_has_help(cmd):
    out = run(cmd, "--help")
    assert out.returncode == 0 and "usage: influence" in out.stdout


def test_bad_setting_is_one_line_exit_2():
    out = run("list", env_extra={"INFLUENCE_TEMPERATURE": "abc"})
    assert out.returncode == 2
    assert out.stderr.strip() == "error: INFLUENCE_TEMPERATURE='abc' is not valid: expected a number from 0 to 2"
    out = run("generate", "hi", "--temperature", "9")
    assert out.returncode == 2 and "--temperature='9'" in out.stderr and "Traceback" not in out.stderr


def test_unknown_command_is_usage_error():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
