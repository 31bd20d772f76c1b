"""Features: input parsing, the one feature definition, offline (training) and online (Redis) views.

Import the Redis store explicitly (``from fraudactors.features.store import OnlineFeatureStore``);
this package import stays light for pool workers and the training path.
"""

from fraudactors.features.definition import FEATURE_NAMES, N_FEATURES, transaction_only_features
from fraudactors.features.schema import (
    Label,
    Transaction,
    label_from_obj,
    parse_label,
    parse_transaction,
    transaction_from_obj,
)

__all__ = [
    "FEATURE_NAMES",
    "N_FEATURES",
    "Label",
    "Transaction",
    "label_from_obj",
    "parse_label",
    "parse_transaction",
    "transaction_from_obj",
    "transaction_only_features",
]
