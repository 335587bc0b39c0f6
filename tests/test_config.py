import json
import subprocess
import sys

import pytest

from influence_tui.config import ConfigError, Settings, settings_file
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
    ],
)
def test_bad_value_names_variable_value_and_allowed(var, value, needle):
    with pytest.raises(ConfigError) as err:
        Settings.load(env={var: value})
    message = str(err.value)
    assert var in message and repr(value) in message and needle in message
    assert "\n" not in message


def test_empty_top_k_means_off():
    assert Settings.load(env={"INFLUENCE_TOP_K": ""}).top_k is None
    assert Settings.load(env={"INFLUENCE_TOP_K": "0"}).top_k is None


def test_threads_auto_or_a_count():
    assert Settings.load(env={}).threads is None
    assert Settings.load(env={"INFLUENCE_THREADS": "auto"}).threads is None
    assert Settings.load(env={"INFLUENCE_THREADS": "3"}).threads == 3
    assert Settings.load(flags={"threads": "1"}, env={"INFLUENCE_THREADS": "3"}).threads == 1


def test_env_example_lists_every_setting():
    from pathlib import Path

    from influence_tui.config import SPECS

    text = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    assert [s.env for s in SPECS if f"{s.env}=" not in text] == []


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
