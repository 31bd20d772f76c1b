"""Make sure the engine has models to load: the committed ``models/`` when present, else train them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from fraudactors.errors import ModelError
from fraudactors.settings import Settings

# The repository's committed models, when running from a checkout (``pip install -e``).
REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


def _complete(directory: Path, versions: set[str]) -> bool:
    return all((directory / v / "metadata.json").is_file() and (directory / v / "model.onnx").is_file()
               for v in versions)


def ensure_models(settings: Settings, say: Callable[[str], None] = print, train_timeout_s: float = 900.0) -> Path:
    """An absolute models directory holding every configured variant's version.

    ``models.dir`` as configured if it has them; a relative default that does not exist here falls
    back to the checkout's committed ``models/``; otherwise ``fraudactors train --synthetic`` writes
    them into ``models.dir`` first.
    """
    versions = {v.version for v in settings.models.variants.values()}
    configured = Path(settings.models.dir).expanduser()
    if _complete(configured, versions):
        return configured.resolve()
    if not configured.is_absolute() and _complete(REPO_MODELS, versions):
        return REPO_MODELS
    target = configured.resolve()
    say(f"no models for {', '.join(sorted(versions))} in {target}: training them "
        "(fraudactors train --synthetic; takes a while)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDACTORS_")}
    proc = subprocess.run([sys.executable, "-m", "fraudactors", "train", "--synthetic", "--out", str(target),
                           "--quiet"], env=env,
                          capture_output=True, text=True, timeout=train_timeout_s, check=False)
    if proc.returncode != 0 or not _complete(target, versions):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"training the default models into {target} failed (exit {proc.returncode}): {tail[0]}")
    return target
