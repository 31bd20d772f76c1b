"""Module-level functions the pool tests run inside worker processes (they must be importable)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

STATE: Any = None


def init_state(value: Any) -> None:
    global STATE
    STATE = value


def read_state() -> Any:
    return STATE


def gc_settings() -> tuple[int, int]:
    """(objects frozen out of the collector's reach, generation-0 threshold) in this process."""
    import gc

    return gc.get_freeze_count(), gc.get_threshold()[0]


def fail_init(message: str) -> None:
    raise RuntimeError(message)


def init_once(flag: str) -> None:
    """Succeeds the first time only: a replacement worker's initializer fails."""
    path = Path(flag)
    if path.exists():
        raise RuntimeError("model file vanished")
    path.write_text("used")


def hang_init() -> None:
    time.sleep(3600)


def echo(value: Any) -> Any:
    return value


def boom(message: str) -> None:
    raise ValueError(message)


def unpicklable_result() -> Any:
    return lambda: None


def exit_now(code: int) -> None:
    os._exit(code)


def block(sock_path: str) -> int:
    """Tell the test we are running (our pid), then wait until it sends one byte."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(sock_path)
        conn.sendall(f"{os.getpid()}\n".encode())
        conn.recv(1)
    return os.getpid()


def read_state_and_pid() -> tuple[Any, int]:
    return STATE, os.getpid()
