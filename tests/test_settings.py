"""Configuration fails fast, in one line, naming the key; and the layers apply in order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fraudactors.cli import build_parser
from fraudactors.errors import ConfigError
from fraudactors.settings import Settings, as_dict, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[kafka]\nbogus = 1\n", "kafka.bogus"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection"),
        ("[topics]\npartitions = \"many\"\n", "topics.partitions"),
        ("[topics]\npartitions = 0\n", "topics.partitions"),
        ("[kafka]\nacks = \"2\"\n", "kafka.acks"),
        ("[kafka]\nenable_idempotence = \"perhaps\"\n", "kafka.enable_idempotence"),
        ("[redis]\non_unavailable = \"ignore\"\n", "redis.on_unavailable"),
        ("[http]\nport = 70000\n", "http.port"),
        ("[http]\nheader_timeout_s = 0\n", "http.header_timeout_s"),
        ("[http]\nbody_timeout_s = -1.0\n", "http.body_timeout_s"),
        ("[http]\nmax_connections = 0\n", "http.max_connections"),
        ("[http]\nmax_store_reads = 0\n", "http.max_store_reads"),
        ("[http]\nstore_read_wait_ms = 0\n", "http.store_read_wait_ms"),
        ("[redis]\nmax_connections = 0\n", "redis.max_connections"),
        ("[kafka]\nheartbeat_interval_ms = 20000\n", "kafka.heartbeat_interval_ms"),
        ("[models.variants.A]\nversion = \"v1\"\nweight = -1.0\n", "models.variants.A.weight"),
        ("[models.variants.C]\nweight = 1.0\n", "models.variants.C.version"),
        ("[decision]\nis_fraud_decisions = [\"maybe\"]\n", "decision.is_fraud_decisions"),
        ("[decision]\ndegraded_policy = \"decline\"\n", "decision.degraded_policy"),
        ("[decision]\ndegraded_approve_below = -5.0\n", "decision.degraded_approve_below"),
        ("[decision]\ndegraded_approve_below = \"cheap\"\n", "decision.degraded_approve_below"),
        ("[decision]\ndegraded_policy = \"approve-below\"\ndegraded_approve_below = 0.0\n",
         "decision.degraded_approve_below"),
        ("[decision]\nreview_threshold = 0.8\ndecline_threshold = 0.5\n", "decision.review_threshold"),
        ("[decision]\ndecline_threshold = 1.5\n", "decision.decline_threshold"),
        ("[engine]\nbatch_max = 512\npublish_window = 256\n", "engine.publish_window"),
        ("[engine]\nbatch_max = 512\nmax_unacknowledged = 256\n", "engine.max_unacknowledged"),
        ("[engine]\nrestart_max = -1\n", "engine.restart_max"),
        ("[engine]\nmax_future_skew_s = -1.0\n", "engine.max_future_skew_s"),
        ("[engine]\nwatchdog_s = 0\n", "engine.watchdog_s"),
        ("[engine]\nrestart_window_s = -60.0\n", "engine.restart_window_s"),
        ("[engine]\ninference_timeout_s = 0.0\n", "engine.inference_timeout_s"),
        ("[engine]\nstart_timeout_s = -1\n", "engine.start_timeout_s"),
        ("[engine]\nwatchdog_s = inf\n", "engine.watchdog_s"),
        ("[engine]\ncommit_timeout_s = nan\n", "engine.commit_timeout_s"),
        ("[engine]\nbatch_max = true\n", "engine.batch_max"),
        ("[kafka]\nsession_timeout_ms = 0\nheartbeat_interval_ms = -1\n", "kafka.session_timeout_ms"),
        ("[kafka]\nrequest_timeout_ms = -5\n", "kafka.request_timeout_ms"),
        ("[kafka]\nlinger_ms = -1\n", "kafka.linger_ms"),
        ("[redis]\nretry_interval_ms = 0\n", "redis.retry_interval_ms"),
        ("[http]\npredict_token = \"short\"\n", "http.predict_token"),
        ("models = 1\n", "models"),
        ("kafka = true\n", "kafka"),
        ("[models]\nvariants = 3\n", "models.variants"),
    ],
)
def test_bad_config_file_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, toml), env={})
    assert info.value.key == key
    message = str(info.value)
    assert key in message
    assert "\n" not in message


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[kafka\n"), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", env={})
    utf16 = tmp_path / "utf16.toml"
    utf16.write_text("[kafka]\n", encoding="utf-16")  # a BOM, then no UTF-8
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_settings(utf16, env={})


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"FRAUDACTORS_KAFKA__NOPE": "1"}, "kafka.nope"),
        ({"FRAUDACTORS_NOPE__X": "1"}, "nope"),
        ({"FRAUDACTORS_TOPICS__PARTITIONS": "twelve"}, "topics.partitions"),
        ({"FRAUDACTORS_TOPICS__PARTITIONS": "-3"}, "topics.partitions"),
        ({"FRAUDACTORS_KAFKA": "x"}, "FRAUDACTORS_KAFKA"),
        ({"FRAUDACTORS_ENGINE__WATCHDOG_S": "nan"}, "engine.watchdog_s"),
        ({"FRAUDACTORS_ENGINE__RESTART_WINDOW_S": "-inf"}, "engine.restart_window_s"),
        ({"FRAUDACTORS_ENGINE__MAX_FUTURE_SKEW_S": "-300"}, "engine.max_future_skew_s"),
    ],
)
def test_bad_env_override_names_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_layers_apply_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "[topics]\npartitions = 6\ntransactions = \"tx-file\"\n[kafka]\nlinger_ms = 7\n")
    env = {"FRAUDACTORS_TOPICS__PARTITIONS": "3", "FRAUDACTORS_CONFIG": "/nonexistent-ignored-when-path-given"}
    s = load_settings(path, env=env, overrides={"kafka": {"linger_ms": 9}})
    assert s.topics.partitions == 3  # env beats file
    assert s.topics.transactions == "tx-file"  # file beats defaults
    assert s.kafka.linger_ms == 9  # code overrides beat env and file
    assert s.topics.predictions == Settings().topics.predictions  # untouched keys keep defaults


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[topics]\npartitions = 4\n")
    assert load_settings(env={"FRAUDACTORS_CONFIG": str(path)}).topics.partitions == 4


def test_the_degraded_policy_loads_from_a_file_and_the_environment(tmp_path: Path) -> None:
    assert (Settings().decision.degraded_policy, Settings().decision.degraded_approve_below) == ("score", 20.0)
    s = load_settings(write(tmp_path, "[decision]\ndegraded_policy = \"review\"\n"), env={})
    assert s.decision.degraded_policy == "review"
    s = load_settings(env={"FRAUDACTORS_DECISION__DEGRADED_POLICY": "APPROVE-BELOW",
                           "FRAUDACTORS_DECISION__DEGRADED_APPROVE_BELOW": "12.5"})
    assert (s.decision.degraded_policy, s.decision.degraded_approve_below) == ("approve-below", 12.5)


def test_services_binaries_are_configurable_from_env() -> None:
    s = load_settings(env={"FRAUDACTORS_SERVICES__TANSU_BIN": "/opt/tansu",
                           "FRAUDACTORS_SERVICES__REDIS_BIN": "/opt/valkey-server"})
    assert (s.services.tansu_bin, s.services.redis_bin) == ("/opt/tansu", "/opt/valkey-server")


def _commands_with_config() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices: dict[str, object] = getattr(sub, "choices", {}) or {}
    names = []
    for name, command in choices.items():
        options = {opt for action in getattr(command, "_actions", []) for opt in action.option_strings}
        if "--config" in options:
            names.append(name)
    return names


# Commands whose positional arguments are required: a valid value, so only the config is wrong.
_POSITIONALS = {"drill": ["control"], "models": ["list"]}


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}


def test_demo_accepts_config() -> None:
    assert "demo" in _commands_with_config()


@pytest.mark.parametrize("command", _commands_with_config())
@pytest.mark.parametrize(
    ("toml", "key"),
    [("[kafka]\nbogus = 1\n", "kafka.bogus"), ("[topics]\npartitions = \"x\"\n", "topics.partitions")],
)
def test_cli_bad_config_prints_one_line_naming_the_key(tmp_path: Path, command: str, toml: str,
                                                       key: str) -> None:
    path = write(tmp_path, toml)
    proc = subprocess.run([sys.executable, "-m", "fraudactors", command, *_POSITIONALS.get(command, []),
                           "--config", str(path)],
                          capture_output=True, text=True, timeout=60, env=_cli_env(), cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0]
    # Nothing was started: a bad config fails before any service.
    assert "broker:" not in proc.stdout


# -- Kafka TLS / SASL ------------------------------------------------------------------------------
SASL = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "engine",
        "sasl_password": "hunter2-not-in-logs"}


@pytest.mark.parametrize(
    ("kafka", "key"),
    [
        ({"security_protocol": "TLS"}, "kafka.security_protocol"),
        ({"security_protocol": "sasl_ssl"}, "kafka.security_protocol"),
        ({**SASL, "sasl_mechanism": "GSSAPI"}, "kafka.sasl_mechanism"),
        ({**SASL, "sasl_mechanism": ""}, "kafka.sasl_mechanism"),
        ({**SASL, "sasl_username": ""}, "kafka.sasl_username"),
        ({**SASL, "sasl_password": ""}, "kafka.sasl_password"),
        ({**SASL, "security_protocol": "SASL_PLAINTEXT", "ssl_cafile": "/ca.pem"}, "kafka.ssl_cafile"),
        ({"sasl_mechanism": "PLAIN"}, "kafka.sasl_mechanism"),
        ({"security_protocol": "SSL", "sasl_username": "engine"}, "kafka.sasl_username"),
        ({"ssl_cafile": "/ca.pem"}, "kafka.ssl_cafile"),
        ({"ssl_certfile": "/client.pem"}, "kafka.ssl_certfile"),
        ({"security_protocol": "SSL", "ssl_keyfile": "/client.key"}, "kafka.ssl_keyfile"),
    ],
)
def test_bad_kafka_security_settings_name_the_key(kafka: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"kafka": kafka})
    assert info.value.key == key
    assert "\n" not in str(info.value)
    assert SASL["sasl_password"] not in str(info.value)


def test_kafka_security_settings_that_load() -> None:
    assert load_settings(env={}).kafka.security_protocol == "PLAINTEXT"
    s = load_settings(env={}, overrides={"kafka": {"security_protocol": "SSL", "ssl_cafile": "/ca.pem",
                                                   "ssl_certfile": "/c.pem", "ssl_keyfile": "/c.key"}})
    assert (s.kafka.ssl_cafile, s.kafka.ssl_certfile, s.kafka.ssl_keyfile) == ("/ca.pem", "/c.pem", "/c.key")
    # The password alone (an optional secret mounted before the switch to SASL) is not an error.
    assert load_settings(env={"FRAUDACTORS_KAFKA__SASL_PASSWORD": "x"}).kafka.sasl_password == "x"


def test_sasl_password_from_the_environment_is_never_shown(tmp_path: Path) -> None:
    secret = SASL["sasl_password"]
    path = write(tmp_path, "[kafka]\nsecurity_protocol = \"SASL_PLAINTEXT\"\nsasl_mechanism = \"PLAIN\"\n"
                           "sasl_username = \"engine\"\n")
    s = load_settings(path, env={"FRAUDACTORS_KAFKA__SASL_PASSWORD": secret})
    assert s.kafka.sasl_password == secret
    shown = as_dict(s)
    assert shown["kafka"]["sasl_password"] == "***"
    assert shown["kafka"]["sasl_username"] == "engine"
    assert secret not in repr(shown) and secret not in repr(s)
    assert as_dict(s, secrets=True)["kafka"]["sasl_password"] == secret
    assert as_dict(load_settings(env={}))["kafka"]["sasl_password"] == ""  # unset shows as unset
    # A password of the wrong type is reported without its value.
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "[kafka]\nsasl_password = 918273645\n"), env={})
    assert info.value.key == "kafka.sasl_password" and "918273645" not in str(info.value)


async def test_the_engine_start_log_redacts_the_sasl_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    import fraudactors.engine.engine as engine_module
    from fraudactors.engine import app

    class NoEngine:
        def __init__(self, settings: Settings) -> None:
            pass

        async def start(self) -> None:
            raise RuntimeError("not starting in this test")

    monkeypatch.setattr(engine_module, "Engine", NoEngine)
    settings = load_settings(env={}, overrides={"kafka": {**SASL, "security_protocol": "SASL_PLAINTEXT"}})
    with capture_logs() as logs:
        assert await app.serve(settings) == 1
    starting = next(entry for entry in logs if entry["event"] == "engine_starting")
    assert starting["settings"]["kafka"]["sasl_password"] == "***"
    assert SASL["sasl_password"] not in repr(logs)


def test_both_toml_files_list_every_key_with_its_default() -> None:
    """fraudactors/defaults.toml (packaged) and config/fraudactors.toml (the documented copy the
    image ships) are the same file, and list every settings key with the dataclass default."""
    import dataclasses
    import tomllib

    from fraudactors.settings import default_config_text

    root = Path(__file__).resolve().parent.parent
    packaged = tomllib.loads(default_config_text())
    assert tomllib.loads((root / "config" / "fraudactors.toml").read_text(encoding="utf-8")) == packaged
    defaults = as_dict(Settings(), secrets=True)
    for section in dataclasses.fields(Settings):
        if section.name == "models":
            continue  # variants are a table of tables, checked through the loaded settings below
        data = defaults[section.name]
        assert set(packaged[section.name]) == set(data), section.name
        for key, value in data.items():
            expected = list(value) if isinstance(value, tuple) else value
            assert packaged[section.name][key] == expected, f"{section.name}.{key}"
    assert load_settings(env={}) == Settings()
