import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from influence_tui.config import ENV_NUMBERS, SPEC_BY_NAME, SPECS, ConfigError, Settings, env_flag, env_number, settings_file
from influence_tui.params import GenerationParams, ParamError, coerce, params_from_mapping


def test_defaults_match_the_original_tool():
    s = Settings.load(env={})
    assert (s.temperature, s.top_p, s.top_k, s.repeat_penalty, s.max_tokens) == (0.7, 0.9, None, 1.1, 512)
    assert (s.device, s.port, s.host, s.warmup_tokens, s.output_dir) == ("auto", 8080, "127.0.0.1", 6, "./models")
    assert set(s.sources.values()) == {"default"}


def test_precedence_flag_env_dotenv_file_default(tmp_path):
    (tmp_path / ".env").write_text("INFLUENCE_TEMPERATURE=0.3\nINFLUENCE_TOP_P=0.5\nINFLUENCE_PORT=9000\n")
    settings_file().parent.mkdir(parents=True, exist_ok=True)
    settings_file().write_text(json.dumps({"temperature": 1.5, "top_p": 0.4, "port": 7000, "max_tokens": 64, "top_k": 40}))
    env = {"INFLUENCE_TEMPERATURE": "0.2", "INFLUENCE_TOP_P": "0.6"}
    s = Settings.load(flags={"temperature": "0.1"}, env=env, cwd=tmp_path)
    assert (s.temperature, s.sources["temperature"]) == (0.1, "flag")
    assert (s.top_p, s.sources["top_p"]) == (0.6, "env")
    assert (s.port, s.sources["port"]) == (9000, ".env")
    assert (s.max_tokens, s.sources["max_tokens"]) == (64, "file")
    assert (s.top_k, s.sources["top_k"]) == (40, "file")
    assert s.sources["device"] == "default"


@pytest.mark.parametrize(
    "var,value,needle",
    [
        ("INFLUENCE_TEMPERATURE", "abc", "from 0 to 2"),
        ("INFLUENCE_TEMPERATURE", "5", "from 0 to 2"),
        ("INFLUENCE_TOP_P", "1.5", "from 0 to 1"),
        ("INFLUENCE_PORT", "70000", "1 to 65535"),
        ("INFLUENCE_DEVICE", "tpu", "auto, cpu, cuda, mps"),
        ("INFLUENCE_MAX_TOKENS", "-3", "integer"),
        ("INFLUENCE_MIRROR", "ftp://x", "URL"),
        ("INFLUENCE_THREADS", "0", "1 to 1024"),
        ("INFLUENCE_THREADS", "many", "auto"),
        # ranges print plain numbers (not 1e+06)
        ("INFLUENCE_MAX_TOKENS", "0", "an integer from 1 to 1000000"),
        ("INFLUENCE_TOP_K", "-5", "an integer from 0 to 1000000"),
        ("INFLUENCE_TEMPERATURE", "9", "a number from 0 to 2"),
        ("INFLUENCE_REPEAT_PENALTY", "11", "a number from 0 to 10"),
    ],
)
def test_bad_value_names_variable_value_and_allowed(var, value, needle):
    with pytest.raises(ConfigError) as err:
        Settings.load(env={var: value})
    message = str(err.value)
    assert var in message and repr(value) in message and needle in message and "e+" not in message
    assert "\n" not in message


def test_top_k_zero_means_off():
    assert Settings.load(env={"INFLUENCE_TOP_K": "0"}).top_k is None
    assert Settings.load(env={"INFLUENCE_TOP_K": ""}).top_k is None  # unset: the default, off


def test_threads_auto_or_a_count():
    assert Settings.load(env={}).threads is None
    assert Settings.load(env={"INFLUENCE_THREADS": "auto"}).threads is None
    assert Settings.load(env={"INFLUENCE_THREADS": "3"}).threads == 3
    assert Settings.load(flags={"threads": "1"}, env={"INFLUENCE_THREADS": "3"}).threads == 1




def test_save_is_atomic_and_keeps_other_keys():
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unknown_future_key": 1}))
    s = Settings.load(env={})
    s.temperature = 0.25
    s.save(["temperature"])
    data = json.loads(path.read_text())
    assert data == {"unknown_future_key": 1, "temperature": 0.25}
    assert Settings.load(env={}).temperature == 0.25
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]  # no temp file left behind


def test_broken_settings_file_is_one_line_error():
    settings_file().parent.mkdir(parents=True, exist_ok=True)
    settings_file().write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Settings.load(env={})


def test_generation_params_validation():
    assert coerce("top_k", "") is None
    assert coerce("max_tokens", "12") == 12
    with pytest.raises(ParamError):
        coerce("max_tokens", 1.5)
    with pytest.raises(ParamError):
        coerce("temperature", True)
    with pytest.raises(ParamError):
        GenerationParams(temperature=3)
    p = params_from_mapping({"temperature": "0", "stop": "###", "seed": 3})
    assert p.greedy and p.stop == ("###",) and p.seed == 3


def test_config_command_text_and_json(tmp_path):
    env = {"PATH": "", "INFLUENCE_CONFIG_DIR": str(tmp_path / "c"), "INFLUENCE_PORT": "9999", "INFLUENCE_API_KEY": "sekret"}
    out = subprocess.run([sys.executable, "-m", "influence_tui", "config", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {r["env"]: r for r in json.loads(out.stdout)["settings"]}
    assert rows["INFLUENCE_PORT"]["value"] == 9999 and rows["INFLUENCE_PORT"]["source"] == "env"
    assert rows["INFLUENCE_API_KEY"]["value"] == "********"
    assert len(rows) >= 14
    text = subprocess.run([sys.executable, "-m", "influence_tui", "config"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "INFLUENCE_WARMUP_TOKENS" in text.stdout and "sekret" not in text.stdout


# -- range messages --------------------------------------------------------------------------------
def test_repeat_last_n_range_is_plain():
    with pytest.raises(ParamError, match="an integer from 0 to 1000000$"):
        coerce("repeat_last_n", "2000000")
    with pytest.raises(ParamError, match=r"a number from -2 to 2$"):
        coerce("presence_penalty", "3")


# -- empty values ----------------------------------------------------------------------------------
# A valid value of every setting that differs from its default, as the settings file would hold it.
SAVED = {
    "model_path": "/models/saved.gguf", "temperature": 1.3, "top_p": 0.5, "top_k": 40, "repeat_penalty": 1.3,
    "max_tokens": 77, "min_p": 0.2, "seed": 7, "system_prompt": "Be brief.", "device": "cpu", "device_index": 2,
    "threads": 3, "context_length": 2048, "port": 9123, "host": "0.0.0.0", "api_key": "k", "warmup_tokens": 0,
    "mirror": "https://hf-mirror.com", "output_dir": "/tmp/saved-models", "theme": "nord",
    "think": False, "save_chats": False, "chats_dir": "/tmp/saved-chats",
}


def _save(values):
    settings_file().parent.mkdir(parents=True, exist_ok=True)
    settings_file().write_text(json.dumps(values))


def test_saved_sample_covers_every_setting():
    assert set(SAVED) == set(SPEC_BY_NAME)


@pytest.mark.parametrize("name", sorted(SAVED))
@pytest.mark.parametrize("blank", ["", "  "])
def test_empty_environment_value_means_not_set(name, blank):
    _save(SAVED)
    s = Settings.load(env={SPEC_BY_NAME[name].env: blank})
    assert (getattr(s, name), s.sources[name]) == (SAVED[name], "file")


@pytest.mark.parametrize("name", sorted(SAVED))
def test_empty_dotenv_value_means_not_set(name, tmp_path):
    _save(SAVED)
    (tmp_path / ".env").write_text(f"{SPEC_BY_NAME[name].env}=\n")
    s = Settings.load(env={}, cwd=tmp_path)
    assert (getattr(s, name), s.sources[name]) == (SAVED[name], "file")


def test_empty_environment_value_lets_dotenv_apply(tmp_path):
    (tmp_path / ".env").write_text("INFLUENCE_MAX_TOKENS=99\n")
    s = Settings.load(env={"INFLUENCE_MAX_TOKENS": ""}, cwd=tmp_path)
    assert (s.max_tokens, s.sources["max_tokens"]) == (99, ".env")


def test_empty_flag_clears_a_system_prompt_set_lower_down():
    _save({"system_prompt": "from the file"})
    s = Settings.load(flags={"system_prompt": ""}, env={"INFLUENCE_SYSTEM_PROMPT": "from env"})
    assert (s.system_prompt, s.sources["system_prompt"]) == (None, "flag")


def test_empty_numeric_flag_is_still_an_error():
    with pytest.raises(ConfigError, match="--max-tokens"):
        Settings.load(flags={"max_tokens": ""}, env={})


def test_cli_empty_environment_values_use_the_defaults(tmp_path):
    env = {"PATH": "", "INFLUENCE_CONFIG_DIR": str(tmp_path / "c"), "INFLUENCE_TEMPERATURE": "", "INFLUENCE_MAX_TOKENS": ""}
    out = subprocess.run([sys.executable, "-m", "influence_tui", "config", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["settings"]}
    assert (rows["temperature"]["value"], rows["temperature"]["source"]) == (0.7, "default")
    assert (rows["max_tokens"]["value"], rows["max_tokens"]["source"]) == (512, "default")


# -- .env.example ----------------------------------------------------------------------------------
ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"
_COMMENTED_SETTING = re.compile(r"^#\s*((?:INFLUENCE|HF|OLLAMA)_[A-Z_]+|CC)=(.*)$")


def _example_lines():
    return ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()


def _example_settings():
    """{NAME: value} of the commented-out setting lines (`# NAME=value`, no spaces before the value)."""
    out = {}
    for line in _example_lines():
        m = _COMMENTED_SETTING.match(line)
        if m and not m.group(2).startswith(" ") and m.group(1) in {s.env for s in SPECS}:
            out[m.group(1)] = m.group(2)
    return out


def test_env_example_lists_exactly_the_settings():
    assert sorted(_example_settings()) == sorted(s.env for s in SPECS)


def test_env_example_sets_nothing_until_a_line_is_uncommented(tmp_path):
    assert [line for line in _example_lines() if line.strip() and not line.lstrip().startswith("#")] == []
    _save(SAVED)
    (tmp_path / ".env").write_text(ENV_EXAMPLE.read_text(encoding="utf-8"))
    s = Settings.load(env={}, cwd=tmp_path)
    assert {name: getattr(s, name) for name in SAVED} == SAVED
    assert set(s.sources.values()) == {"file"}


def test_env_example_each_setting_has_help_above_it():
    lines = _example_lines()
    for i, line in enumerate(lines):
        m = _COMMENTED_SETTING.match(line)
        if m and m.group(1) in _example_settings():
            above = lines[i - 1]
            assert above.startswith("# ") and not _COMMENTED_SETTING.match(above), line


@pytest.mark.parametrize("var", sorted(s.env for s in SPECS))
def test_env_example_values_are_valid_once_uncommented(var, tmp_path):
    (tmp_path / ".env").write_text(f"{var}={_example_settings()[var]}\n")
    s = Settings.load(env={}, cwd=tmp_path)
    name = next(spec.name for spec in SPECS if spec.env == var)
    assert s.sources[name] == ".env"


def _env_vars_read_by_the_code():
    root = Path(__file__).resolve().parents[1] / "influence_tui"
    pattern = re.compile(r"""(?:environ(?:\.get\(|\[)|env_flag\()\s*["']([A-Z][A-Z0-9_]*)["']""")
    names = {m for path in root.rglob("*.py") for m in pattern.findall(path.read_text(encoding="utf-8"))}
    return names | set(ENV_NUMBERS)  # hub.py reads these through a loop variable


def test_env_example_lists_every_environment_only_variable():
    settings = {s.env for s in SPECS}
    listed = {m.group(1) for line in _example_lines() if (m := _COMMENTED_SETTING.match(line))} - settings
    expected = _env_vars_read_by_the_code() - settings
    assert {"INFLUENCE_HUB_BACKOFF", "INFLUENCE_HUB_TIMEOUT", "HF_TOKEN", "HF_ENDPOINT", "CC"} <= expected
    assert sorted(expected - listed) == []
    assert sorted(listed - expected) == []


# -- yes/no switches -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "false", "FALSE", "no", "off", " Off ", "", "  "])
def test_env_flag_off_words(value):
    assert env_flag("INFLUENCE_DEBUG", {"INFLUENCE_DEBUG": value}) is False


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "anything"])
def test_env_flag_on(value):
    assert env_flag("INFLUENCE_DEBUG", {"INFLUENCE_DEBUG": value}) is True


def test_env_flag_unset_gives_the_default():
    assert env_flag("INFLUENCE_NATIVE", {}) is False
    assert env_flag("INFLUENCE_NATIVE", {}, default=True) is True
    assert env_flag("INFLUENCE_NATIVE", {"INFLUENCE_NATIVE": ""}, default=True) is True


# -- environment-only variables --------------------------------------------------------------------
@pytest.mark.parametrize(
    "var,value",
    [
        ("INFLUENCE_HUB_RETRIES", "abc"), ("INFLUENCE_HUB_RETRIES", "-1"), ("INFLUENCE_HUB_RETRIES", "2.5"),
        ("INFLUENCE_HUB_BACKOFF", "soon"), ("INFLUENCE_HUB_BACKOFF", "-0.5"), ("INFLUENCE_HUB_BACKOFF", "nan"),
        ("INFLUENCE_HUB_TIMEOUT", "0"), ("INFLUENCE_HUB_TIMEOUT", "inf"), ("INFLUENCE_HUB_TIMEOUT", "x"),
    ],
)
def test_bad_hub_variable_fails_at_load(var, value):
    with pytest.raises(ConfigError) as err:
        Settings.load(env={var: value})
    message = str(err.value)
    assert message.startswith(f"{var}={value!r} is not valid: expected ") and "\n" not in message


def test_hub_variables_accept_good_and_empty_values():
    env = {"INFLUENCE_HUB_RETRIES": "0", "INFLUENCE_HUB_BACKOFF": "0.01", "INFLUENCE_HUB_TIMEOUT": ""}
    Settings.load(env=env)
    assert (env_number("INFLUENCE_HUB_RETRIES", env), env_number("INFLUENCE_HUB_BACKOFF", env)) == (0, 0.01)
    assert env_number("INFLUENCE_HUB_TIMEOUT", env) is None


def test_cache_dir_that_is_a_file_names_the_variable(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for value in (str(afile), str(afile / "sub")):
        with pytest.raises(ConfigError, match=r"^INFLUENCE_CACHE_DIR='.*' is not valid: .* is a file, not a folder$"):
            Settings.load(env={"INFLUENCE_CACHE_DIR": value})
    Settings.load(env={"INFLUENCE_CACHE_DIR": str(tmp_path / "new" / "cache")})  # not there yet: fine


@pytest.mark.parametrize(
    "var,value,needle",
    [("INFLUENCE_HUB_RETRIES", "abc", "INFLUENCE_HUB_RETRIES='abc'"), ("INFLUENCE_CACHE_DIR", "/etc/passwd", "INFLUENCE_CACHE_DIR")],
)
def test_cli_bad_environment_only_variable_is_one_line_exit_2(var, value, needle, tmp_path):
    env = {"PATH": "", "INFLUENCE_CONFIG_DIR": str(tmp_path / "c"), var: value}
    out = subprocess.run([sys.executable, "-m", "influence_tui", "list"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and needle in out.stderr and out.stderr.count("\n") == 1


def test_a_bare_mirror_host_means_https():
    assert Settings.load({"mirror": "hf-mirror.com"}, env={}, use_file=False).mirror == "https://hf-mirror.com"
    assert Settings.load({"mirror": "http://127.0.0.1:9000/"}, env={}, use_file=False).mirror == "http://127.0.0.1:9000"
    assert Settings.load({"mirror": "localhost:8080"}, env={}, use_file=False).mirror == "http://localhost:8080"
    with pytest.raises(ConfigError, match="URL, or a host name"):
        Settings.load({"mirror": "ftp://example.org"}, env={}, use_file=False)


def test_host_and_api_key_are_checked_when_set_and_a_bad_key_is_not_echoed():
    assert Settings.load({"host": "[::1]"}, env={}, use_file=False).host == "::1"
    with pytest.raises(ConfigError, match="host name or an IP address"):
        Settings.load({"host": "bad host!"}, env={}, use_file=False)
    with pytest.raises(ConfigError, match="without spaces") as err:
        Settings.load({"api_key": "my secret"}, env={}, use_file=False)
    assert "my secret" not in str(err.value)
