"""`influence serve` (alias `deploy`): run the API in the foreground, detached, or stop/inspect a detached one.

    influence serve [-m MODEL] [--host H] [-p PORT] [--device D] [--api-key K] [--cors ORIGIN]
    influence serve --detached      # background process; pid and log files in the settings folder
    influence serve --status        # is a detached server running, where, which log
    influence serve --stop          # end it

The model is loaded before the socket opens, so /health says "ok" with the model from the first
request on. The detached child gets the API key through its environment, not its command line
(where `ps` would show it).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from influence_tui.config import Settings, config_dir

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def pid_file() -> Path:
    return config_dir() / "server.pid"


def log_file() -> Path:
    return config_dir() / "server.log"


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours still answers kill(0): ask the OS whether it has exited
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def read_pid_info() -> dict[str, Any] | None:
    """The detached server's record, or None when there is none or its process is gone."""
    path = pid_file()
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid):
        path.unlink(missing_ok=True)
        return None
    return info


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "status", False):
        return _status()
    if getattr(args, "stop", False):
        return _stop()
    if getattr(args, "detached", False):
        return _detach(args, settings)
    return _foreground(args, settings)


def _status() -> int:
    info = read_pid_info()
    if info is None:
        print("no detached server is running")
        return 1
    print(f"running: pid {info['pid']} at {info['url']} (log: {info['log']})")
    return 0


def _stop(timeout: float = 15.0) -> int:
    info = read_pid_info()
    if info is None:
        print("no detached server is running")
        return 1
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    pid_file().unlink(missing_ok=True)
    print(f"stopped the server (pid {pid})")
    return 0


# settings the main parser takes as flags -> the flag (the detached child gets them back as flags:
# an environment variable could not say "cleared", e.g. --system "" over a saved system prompt)
CHILD_FLAGS = {
    "model_path": "--model-path", "device": "--device", "device_index": "--device-index", "threads": "--threads",
    "context_length": "--ctx-size", "max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
    "top_k": "--top-k", "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "seed": "--seed",
    "system_prompt": "--system",
}


def _child_argv(args: argparse.Namespace, settings: Settings) -> list[str]:
    argv = [sys.executable, "-m", "influence_tui"]
    for name, flag in CHILD_FLAGS.items():
        if settings.sources.get(name) == "flag":
            value = getattr(settings, name)
            argv += [flag, "" if value is None else str(value)]
    argv += ["serve", "--host", settings.host, "--port", str(settings.port),
             "--device", settings.device, "--device-index", str(settings.device_index)]
    if settings.model_path and settings.sources.get("model_path") != "flag":
        argv += ["--model-path", settings.model_path]
    for origin in getattr(args, "cors", None) or []:
        argv += ["--cors", origin]
    return argv


def _child_env(settings: Settings) -> dict[str, str]:
    """The detached server's environment: ours, and the API key (not on its command line, which
    every user of the machine can read)."""
    env = dict(os.environ)
    if settings.api_key:
        env["INFLUENCE_API_KEY"] = settings.api_key
    return env


def _detach(args: argparse.Namespace, settings: Settings, wait_s: float = 300.0) -> int:
    running = read_pid_info()
    if running is not None:
        print(f"error: a detached server already runs (pid {running['pid']} at {running['url']}); "
              "stop it with `influence serve --stop`", file=sys.stderr)
        return 1
    _warn_if_exposed(settings)
    log = log_file()
    log.parent.mkdir(parents=True, exist_ok=True)
    env = _child_env(settings)
    with open(log, "ab") as out, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(_child_argv(args, settings), stdin=devnull, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=os.getcwd())
    from influence_tui.server.runner import url_for

    url = url_for(settings.host, settings.port)
    info = {"pid": proc.pid, "url": url, "log": str(log), "started": time.time()}
    from influence_tui.config import atomic_write_text

    atomic_write_text(pid_file(), json.dumps(info) + "\n")
    if not _wait_ready(proc, url, wait_s):
        code = proc.poll()
        if code is not None:
            pid_file().unlink(missing_ok=True)
            print(f"error: the server exited with code {code}; see {log}", file=sys.stderr)
            return 1
        print(f"the server (pid {proc.pid}) is still starting; log: {log}")
        return 0
    print(f"serving at {url} (pid {proc.pid}); log: {log}; stop with `influence serve --stop`")
    return 0


def _wait_ready(proc: subprocess.Popen, url: str, wait_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def _warn_if_exposed(settings: Settings) -> None:
    if not is_loopback(settings.host) and not settings.api_key:
        print(f"warning: listening on {settings.host} without an API key: anyone who can reach this machine "
              "can use the model; set --api-key or INFLUENCE_API_KEY", file=sys.stderr)


def _foreground(args: argparse.Namespace, settings: Settings) -> int:
    from influence_tui.engine import Engine
    from influence_tui.server.runner import ServerRunner, _bind

    _warn_if_exposed(settings)
    _bind(settings.host, settings.port).close()  # a busy port fails now, not after a long model load
    # load, then serve: /health says "ok" with the model from the first request on
    engine = Engine(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `serve --stop`, systemd, docker stop
    print(f"loading {settings.model_path or 'the bundled model'} …", file=sys.stderr, flush=True)
    try:
        summary = engine.load(settings.model_path or None)
        print(f"loaded {summary.name} on {summary.device} in {summary.load_s:.1f}s", file=sys.stderr, flush=True)
        runner = ServerRunner(engine, settings, cors_origins=getattr(args, "cors", None) or None,
                              log_level="info", access_log=True, log_config=_log_config())
        url = runner.start()
        # Ctrl+C while serving: stop cleanly (also where a launcher started us with SIGINT ignored)
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        print(f"serving at {url} (Ollama: {url}/api, OpenAI: {url}/v1); Ctrl+C stops", file=sys.stderr, flush=True)
        try:
            while runner.running and not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        print("stopping …", file=sys.stderr, flush=True)
        runner.stop()
    finally:
        engine.shutdown()
    return 0


def _log_config() -> dict[str, Any]:
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["default"]["use_colors"] = None
    return config
