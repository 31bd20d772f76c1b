"""The committed ``models/`` the engine's and the load generator's tests score with.

Nothing stands in for them: when they do not load (missing, a sha256 mismatch, other features),
every test that needs them fails with the reason, instead of passing on models trained on the spot.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
VERSIONS = ("v1", "v2")


def committed_models(directory: Path = REPO_MODELS) -> Path:
    """``directory`` once every version in it loads as the engine loads it; otherwise the test fails."""
    from fraudactors.errors import FraudActorsError
    from fraudactors.modeling.registry import load_model_info
    from fraudactors.modeling.scorer import Scorer

    try:
        Scorer([load_model_info(directory, v) for v in VERSIONS])
    except (FraudActorsError, OSError) as exc:
        pytest.fail(f"the committed models in {directory} do not load: {exc} -- restore them "
                    "(git checkout models/) or rebuild them (fraudactors train --synthetic)", pytrace=False)
    return directory
