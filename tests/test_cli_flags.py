"""The command line's own rules: where flags may go, what they may hold, what is left behind."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest


def run(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "influence_tui", *args], capture_output=True, text=True, env=env, timeout=180)


def test_generation_flags_before_the_command_apply():
    out = run("--max-tokens", "2", "--temperature", "0", "--json", "generate", "Tell me a long story.")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # --json before the command counts too
    assert data["completion_tokens"] == 2
    bad = run("--temperature", "abc", "generate", "hi")
    assert bad.returncode == 2 and "temperature" in bad.stderr


def test_flags_that_go_together_are_checked():
    out = run("--output", "results.jsonl")
    assert out.returncode == 2 and "--output goes with --batch" in out.stderr
    out = run("--batch", "prompts.txt", "generate", "hi")
    assert out.returncode == 2 and "--batch runs on its own" in out.stderr
    for limit in ("0", "-5", "abc"):
        out = run("search", "llama", "--limit", limit)
        assert out.returncode == 2 and "--limit" in out.stderr


def test_more_threads_than_cpus_are_capped_with_a_warning():
    from influence_tui.engine.governor import capped_threads, usable_cpus

    assert capped_threads(10_000) == usable_cpus() and capped_threads(1) == 1 and capped_threads(None) is None
    out = run("--threads", "1000", "config", "--json")
    assert out.returncode == 0 and f"more than the {usable_cpus()} CPUs here: using {usable_cpus()}" in out.stderr


def test_config_prints_the_settings_path_whole():
    out = run("config", env_extra={"COLUMNS": "40", "INFLUENCE_CONFIG_DIR": "/tmp/a-rather-long-folder-name/for-settings"})
    assert "settings file: /tmp/a-rather-long-folder-name/for-settings/settings.json" in out.stdout


def test_a_detached_server_gets_the_settings_given_as_flags():
    import argparse

    from influence_tui.cli import build_parser, settings_from_args
    from influence_tui.server.cli import _child_argv, _child_env

    args = build_parser().parse_args(["--threads", "1", "--temperature", "0.2", "--system", "", "serve", "--api-key", "k"])
    settings = settings_from_args(args)
    argv = _child_argv(argparse.Namespace(cors=None), settings)
    # the child parses what the parent did: the same values, a cleared system prompt included
    child = settings_from_args(build_parser().parse_args(argv[3:]))
    assert (child.threads, child.temperature, child.system_prompt) == (1, 0.2, None)
    assert child.sources["system_prompt"] == "flag" and "k" not in argv
    assert _child_env(settings)["INFLUENCE_API_KEY"] == "k"


def test_search_against_a_server_without_the_hub_api_says_so():
    class NotAHub(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotAHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = run("search", "llama", "-r", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert out.returncode == 1 and "has no model search" in out.stderr and "repository" not in out.stderr


def test_temporary_files_of_dead_processes_are_removed(tmp_path: Path):
    from influence_tui.engine.weights_cache import remove_orphans

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    orphan = tmp_path / f"decode-abc.{dead}.c"
    mine = tmp_path / f"decode-abc.{os.getpid()}.tmp"
    other = tmp_path / "decode-abc.so"
    fresh = tmp_path / f"decode-def.{dead}.c"  # a dead PID, but written a moment ago: maybe another host's
    for f in (orphan, mine, other, fresh):
        f.write_text("x")
    hour_ago = time.time() - 3700
    for f in (orphan, mine, other):
        os.utime(f, (hour_ago, hour_ago))
    remove_orphans(tmp_path, ("decode-*.*.c", "decode-*.*.tmp"))
    assert not orphan.exists() and mine.exists() and other.exists() and fresh.exists()


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_debug_off_values_keep_errors_to_one_line(value):
    out = run("generate", "hi", "--model-path", "/no/such/model.gguf", env_extra={"INFLUENCE_DEBUG": value})
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_context_length_setting_sizes_what_a_request_can_use():
    long_prompt = "Tell me about rivers. " * 60  # ~360 tokens
    out = run("--ctx-size", "128", "generate", long_prompt, "--max-tokens", "2")
    assert out.returncode == 1 and "the context holds 128" in out.stderr
    out = run("generate", long_prompt, "--max-tokens", "2", "--temperature", "0", "--json",
              env_extra={"INFLUENCE_CONTEXT_LENGTH": "1024"})
    assert out.returncode == 0, out.stderr
    bad = run("--ctx-size", "12", "generate", "hi")
    assert bad.returncode == 2 and "64 to 1048576" in bad.stderr


def test_stop_strings_before_and_after_the_command_add_up():
    from influence_tui.cli import build_parser

    args = build_parser().parse_args(["--stop", "A", "generate", "x", "--stop", "B"])
    after = vars(args).pop("stop_after", None)
    assert args.stop == ["A"] and after == ["B"]
    ask = ["generate", "What is the capital of France? Answer in one word.", "--temperature", "0", "--max-tokens", "12",
           "--repeat-penalty", "1.0"]
    assert "Paris" in run(*ask).stdout  # what it says without the stop string
    out = run("--stop", "Paris", *ask, "--stop", "zzz")
    assert out.returncode == 0 and "Paris" not in out.stdout, out.stdout
