"""Secrets never reach a log line or an error message: the password of any URL-valued setting,
the Kafka SASL password and the /predict token show as ``***``."""

from __future__ import annotations

import io
import logging

import orjson
import pytest
import structlog

from fraudactors.errors import ConfigError
from fraudactors.logging import configure_logging, get_logger
from fraudactors.redact import redact, redact_url
from fraudactors.settings import as_dict, load_settings, secret_values

PASSWORD = "s3cret-redis-pw"
TOKEN = "predict-token-0123456789"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{PASSWORD}@redis:6379/0", "redis://:***@redis:6379/0"),
        (f"rediss://engine:{PASSWORD}@redis:6380/1", "rediss://engine:***@redis:6380/1"),
        (f"redis://:{PASSWORD}@with@at@redis:6379", "redis://:***@redis:6379"),
        ("redis://just-a-token@redis:6379", "redis://***@redis:6379"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        (f"kafka://u:{PASSWORD}@k1:9092,kafka://u:{PASSWORD}@k2:9092", "kafka://u:***@k1:9092,kafka://u:***@k2:9092"),
    ],
)
def test_redact_url_masks_the_userinfo_secret(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert redact_url(f"Error connecting to {url}. Connection refused.") == f"Error connecting to {shown}. Connection refused."


def test_every_url_setting_and_every_secret_key_is_masked_and_known_as_a_secret() -> None:
    s = load_settings(env={
        "FRAUDACTORS_REDIS__URL": f"rediss://engine:{PASSWORD}@redis:6380/0",
        "FRAUDACTORS_KAFKA__SASL_PASSWORD": "sasl-pw-kept-apart",
        "FRAUDACTORS_HTTP__PREDICT_TOKEN": TOKEN,
    })
    shown = as_dict(s)
    assert shown["redis"]["url"] == "rediss://engine:***@redis:6380/0"
    assert shown["kafka"]["sasl_password"] == shown["http"]["predict_token"] == "***"
    for secret in (PASSWORD, "sasl-pw-kept-apart", TOKEN):
        assert secret not in repr(shown)
    assert TOKEN not in repr(s)
    assert as_dict(s, secrets=True)["redis"]["url"] == f"rediss://engine:{PASSWORD}@redis:6380/0"
    assert {PASSWORD, "sasl-pw-kept-apart", TOKEN} <= secret_values(s)
    message = f"AUTH failed for {PASSWORD!r}; token {TOKEN}"
    assert redact(message, secret_values(s)) == "AUTH failed for '***'; token ***"


@pytest.mark.parametrize("token", ["short-token", "a token with spaces!", "t0k\u00e9n-0123456789abcdef"])
def test_a_bad_predict_token_names_the_key_without_quoting_the_value(token: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"FRAUDACTORS_HTTP__PREDICT_TOKEN": token})
    assert info.value.key == "http.predict_token"
    assert token not in str(info.value)


def test_configured_logging_redacts_every_line_structlog_and_standard_library() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    for handler in before:  # so that basicConfig installs its handler
        root.removeHandler(handler)
    try:
        configure_logging("info", "json", stream=out, secrets={TOKEN})
        try:
            raise ConnectionError(f"cannot reach redis://:{PASSWORD}@redis:6379/0")
        except ConnectionError as exc:
            get_logger(actor="test").warning("feature_store_down", error=exc, token=TOKEN,
                                             nested={"urls": [f"redis://:{PASSWORD}@r:1"]})
            get_logger(actor="test").exception("handler_failed")
        stderr = io.StringIO()
        (handler,) = [h for h in root.handlers if h not in before]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stderr)
        logging.getLogger("aiohttp.server").error("bad request carrying %s", TOKEN)
    finally:
        structlog.reset_defaults()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in before:
            root.addHandler(handler)
    text = out.getvalue() + stderr.getvalue()
    assert PASSWORD not in text and TOKEN not in text
    first = orjson.loads(out.getvalue().splitlines()[0])
    assert "redis://:***@redis:6379/0" in first["error"] and first["token"] == "***"
    assert "bad request carrying ***" in stderr.getvalue()
