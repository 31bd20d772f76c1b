"""``fraudactors models``: list, set-weights, promote, rollback against the real broker's control topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from engine_helpers import models_with_extras, produce, produce_corrupt

from fraudactors import cli
from fraudactors.engine.control import current_routing
from fraudactors.engine.routing import Routing
from fraudactors.modeling.registry import load_model_info
from fraudactors.services.kafka import make_consumer
from fraudactors.settings import Settings, VariantSettings


@pytest.fixture
def cli_settings(settings: Settings, models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's broker, control topic and a models dir with good and broken extra versions, given
    to the command the way an operator would: FRAUDACTORS_* environment variables."""
    root = models_with_extras(models_dir, tmp_path)
    for name, value in {"KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
                        "KAFKA__ENABLE_IDEMPOTENCE": "false", "TOPICS__CONTROL": settings.topics.control,
                        "MODELS__DIR": str(root)}.items():
        monkeypatch.setenv("FRAUDACTORS_" + name, value)
    monkeypatch.delenv("FRAUDACTORS_CONFIG", raising=False)
    return settings.replace(models={"dir": str(root)})


def current(s: Settings) -> Routing:
    return asyncio.run(current_routing(s))


def test_list_shows_the_configuration_as_revision_zero_and_the_versions_available(
        cli_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("routing revision 0: configuration [models.variants]\n  A: v1 (weight 0.9)\n"
                          "  B: v2 (weight 0.1)\nprevious: none")
    assert "  v2b: ok, sha256 " in out
    assert "  v3-bad-sha: refused: model v3-bad-sha: " in out and "sha256" in out


def test_set_weights_then_rollback_write_new_revisions_pinned_to_the_verified_files(
        cli_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    s = cli_settings
    assert cli.main(["models", "set-weights", "A=0.5", "B=0.5", "--reason", "even split"]) == 0
    assert "routing revision 1 written (even split)" in capsys.readouterr().out
    routing = current(s)
    assert routing.revision == 1 and routing.reason == "even split"
    assert routing.variants == {"A": VariantSettings("v1", 0.5), "B": VariantSettings("v2", 0.5)}
    assert routing.models == {v: load_model_info(s.models.dir, v).sha256 for v in ("v1", "v2")}
    assert routing.previous is not None and routing.previous.revision == 0

    assert cli.main(["models", "promote", "v2b", "--variant", "C", "--shadow"]) == 0
    assert current(s).variants["C"] == VariantSettings("v2b", 0.0, True)
    assert cli.main(["models", "rollback"]) == 0
    back = current(s)
    assert back.revision == 3 and back.variants == routing.variants and back.reason == "rollback to revision 1"
    capsys.readouterr()
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "routing revision 3" in out and "previous: revision 2" in out and "C: v2b (shadow)" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["promote", "v3-bad-sha", "--variant", "A"], "not written: model v3-bad-sha: "),
    (["promote", "v3-bad-onnx", "--variant", "A"], "onnxruntime cannot load"),
    (["promote", "v9", "--variant", "A"], "model v9 not found"),
    (["promote", "v2b", "--variant", "C"], "variant C is new: give it a weight (--weight W)"),
    (["set-weights", "A=lots"], "'A=lots' is not VARIANT=WEIGHT"),
    (["set-weights", "Z=0.5"], "no variant Z"),
    (["rollback"], "revision 0 has no previous routing to roll back to"),
])
def test_a_refused_change_exits_non_zero_with_one_line_and_writes_nothing(
        cli_settings: Settings, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert cli.main(["models", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fraudactors models: ") and message in lines[0], lines
    assert current(cli_settings).revision == 0


def test_an_invalid_document_on_the_topic_is_passed_over_and_can_be_replaced(
        cli_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    s = cli_settings
    assert cli.main(["models", "set-weights", "B=0.2"]) == 0
    asyncio.run(produce(s, [(b"routing", b'{"revision": 7, "variants": "garbage"}')], topic=s.topics.control))
    capsys.readouterr()
    assert cli.main(["models", "list"]) == 0
    assert capsys.readouterr().out.startswith("routing revision 1")
    assert cli.main(["models", "rollback"]) == 0
    assert current(s).revision == 2 and current(s).variants["B"].weight == 0.1


@pytest.mark.parametrize("argv", [["list"], ["set-weights", "B=0.5"]])
def test_a_corrupt_batch_on_the_control_topic_is_one_line_naming_its_offset_and_nothing_is_written(
        cli_settings: Settings, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """Read up to a batch that does not decode, the newest routing is not known: neither listed
    (it may not be the one in force) nor built upon."""
    s = cli_settings
    assert cli.main(["models", "set-weights", "B=0.2"]) == 0
    offset = asyncio.run(produce_corrupt(s, 0, [(b"routing", b'{"revision": 2}')], topic=s.topics.control))
    capsys.readouterr()
    assert cli.main(["models", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fraudactors models: the control topic {s.topics.control} cannot be read past "
                               f"offset {offset}: a record batch there does not decode (")
    assert asyncio.run(end_offset(s)) == offset + 1, "nothing written"


async def end_offset(s: Settings) -> int:
    tp = TopicPartition(s.topics.control, 0)
    consumer = make_consumer(s, group_id=None)
    await consumer.start()
    try:
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


def test_an_unreachable_broker_is_one_line_naming_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}
    env["FRAUDACTORS_KAFKA__BOOTSTRAP_SERVERS"] = "127.0.0.1:1"
    proc = subprocess.run([sys.executable, "-m", "fraudactors", "models", "list"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fraudactors models: cannot reach Kafka at 127.0.0.1:1"), lines


def test_a_change_written_meanwhile_is_not_overwritten(
        cli_settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another operator's change lands while this one verifies its models: this one is not written
    (it was built on the routing before, and would silently undo the other); run again, it builds
    on the other."""
    from fraudactors.engine import control, models_command

    s = cli_settings
    verify = models_command.verify_versions
    other = Routing.from_settings(s.models).with_weights({"B": 0.0}, {}, "the other operator: stop B")

    def verify_while_another_change_lands(models_dir: str, versions: tuple[str, ...]) -> dict[str, str]:
        with ThreadPoolExecutor(1) as pool:  # its own loop: the command's is running here
            pool.submit(asyncio.run, control.publish_routing(s, other)).result()
        return verify(models_dir, versions)

    monkeypatch.setattr(models_command, "verify_versions", verify_while_another_change_lands)
    assert cli.main(["models", "set-weights", "B=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the routing changed while this change was made" in err[0], err
    assert current(s).reason == "the other operator: stop B" and current(s).revision == 1
    monkeypatch.setattr(models_command, "verify_versions", verify)
    assert cli.main(["models", "set-weights", "B=0.5"]) == 0
    now = current(s)
    assert now.revision == 2 and now.variants["B"].weight == 0.5
    assert now.previous is not None and now.previous.reason == other.reason
