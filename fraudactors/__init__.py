"""fraudactors: a real-time fraud detection engine built from supervised asyncio actors."""

__version__ = "0.1.0"
