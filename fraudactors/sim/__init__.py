"""Seeded transaction simulator with tagged fraud scenarios and delayed labels (see ``simulator``)."""

from fraudactors.sim.scenarios import LEGIT, SCENARIOS
from fraudactors.sim.simulator import DEFAULT_START, LabelEvent, SimEvent, Simulator, iso

__all__ = ["DEFAULT_START", "LEGIT", "SCENARIOS", "LabelEvent", "SimEvent", "Simulator", "iso"]
