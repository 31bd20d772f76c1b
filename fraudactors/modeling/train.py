"""``fraudactors train``: build v1 (random forest) and v2 (histogram gradient boosting) as ONNX, each
with its fallback for degraded mode (the same algorithm on the transaction-only features).

    fraudactors train --synthetic                      # both models from the built-in simulator
    fraudactors train --data tx.csv --map amt=amount   # from your file (CSV, or Parquet with pyarrow)
    fraudactors train --synthetic --version v3 --algo hgb

See :mod:`fraudactors.modeling.pipeline` for the time split and what lands in ``models/<version>/``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

HELP = "train fraud models (--synthetic or --data FILE) into models/<version>/ as ONNX + metadata"

DEFAULT_SEED = 7
# 91 days: the time split fits on 56 of them (was 63 days, 28 fit days); more history of the same
# simulated world, not easier data (docs/models.md, "What was tried").
DEFAULT_DAYS = 91.0
DEFAULT_USERS = 5000
DEFAULT_MERCHANTS = 1000
# The search's validation windows (modeling/search.py): 36 days of the 91, the oldest fit on 20.
SEARCH_FOLDS = 3
SEARCH_FOLD_DAYS = 12.0


def _check_out(out: str) -> None:
    """The models directory can be written, or created (nothing is created before the models
    are): the nearest existing ancestor must be a writable directory."""
    import os
    from pathlib import Path

    from fraudactors.errors import ConfigError

    path = Path(out).absolute()
    try:
        while not path.exists():
            path = path.parent
    except OSError as exc:  # an ancestor it may not search
        raise ConfigError("--out", f"cannot write models into {out!r}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigError("--out", f"cannot write models into {out!r}: {str(path)!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("--out", f"cannot write models into {out!r}: {str(path)!r} is not writable")


def configure_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="train on the built-in transaction simulator")
    src.add_argument("--data", metavar="FILE",
                     help="CSV or Parquet file: SPEC transaction fields + is_fraud (+ optional labeled_at, scenario)")
    sim = p.add_argument_group("simulator (--synthetic)")
    sim.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"simulator and model seed (default {DEFAULT_SEED})")
    sim.add_argument("--days", type=float, default=DEFAULT_DAYS, help=f"simulated days (default {DEFAULT_DAYS:g})")
    sim.add_argument("--users", type=int, default=DEFAULT_USERS, help=f"simulated users (default {DEFAULT_USERS})")
    sim.add_argument("--merchants", type=int, default=DEFAULT_MERCHANTS,
                     help=f"simulated merchants (default {DEFAULT_MERCHANTS})")
    data = p.add_argument_group("file (--data)")
    data.add_argument("--map", metavar="SRC=DST,...", help="rename file columns, e.g. amt=amount,ts=timestamp")
    data.add_argument("--strict", action="store_true",
                      help="fail on the first invalid row (default: skip invalid rows and report them per reason)")
    data.add_argument("--label-delay-days", type=float, default=7.0,
                      help="when labeled_at is absent, a fraud counts as reported this long after it (default 7); "
                           "labeled_at 'never': never reported")
    split = p.add_argument_group("time split (days, counted back from the last transaction); final refit")
    split.add_argument("--warmup-days", type=float, default=7.0, help="feature warm-up, not trained on (default 7)")
    split.add_argument("--calib-days", type=float, default=7.0, help="threshold calibration period (default 7)")
    split.add_argument("--gap-days", type=float, default=7.0,
                       help="the label delay: the gap before the test period, and the last days the final refit "
                            "leaves out (default 7)")
    split.add_argument("--test-days", type=float, default=14.0, help="held-out test period (default 14)")
    split.add_argument("--no-refit", action="store_true",
                       help="ship the time-split model itself instead of refitting it on all labelled data up to "
                            "the label cut-off (default: refit)")
    out = p.add_argument_group("models")
    out.add_argument("--out", default="models", metavar="DIR", help="models directory (default: models)")
    out.add_argument("--version", help="train only this version (default: v1 and v2)")
    out.add_argument("--algo", choices=("rf", "hgb"), help="rf = random forest, hgb = histogram gradient boosting "
                     "(default: rf for v1, hgb for v2; required for other versions)")
    out.add_argument("--review-fpr", type=float, default=0.02, help="target FPR of the review threshold (default 0.02)")
    out.add_argument("--decline-fpr", type=float, default=0.005,
                     help="target FPR of the decline threshold (default 0.005)")
    out.add_argument("--legit-sample", type=float, default=0.2,
                     help="fraction of legitimate fit rows trained on (all frauds are; default 0.2)")
    out.add_argument("--search", action="store_true",
                     help="choose the hyperparameters by a time-series cross-validated grid search before the "
                          "time split's cut-off (minutes per algorithm; default: the built-in ones)")
    out.add_argument("--search-folds", type=int, default=SEARCH_FOLDS, metavar="N",
                     help="the search's validation windows, the last N before the cut-off's label delay "
                          f"(default {SEARCH_FOLDS})")
    out.add_argument("--search-fold-days", type=float, default=SEARCH_FOLD_DAYS, metavar="DAYS",
                     help=f"days in each of the search's validation windows (default {SEARCH_FOLD_DAYS:g})")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _command(args: argparse.Namespace) -> str:
    """The explicit command line that reproduces this run (every option that shapes the models)."""
    if args.synthetic:
        parts = ["--synthetic", "--seed", str(args.seed), "--days", f"{args.days:g}", "--users", str(args.users),
                 "--merchants", str(args.merchants)]
    else:
        parts = ["--data", args.data, "--label-delay-days", f"{args.label_delay_days:g}", "--seed", str(args.seed)]
        if args.map:
            parts += ["--map", args.map]
    for name in ("warmup_days", "calib_days", "gap_days", "test_days", "review_fpr", "decline_fpr", "legit_sample"):
        parts += [f"--{name.replace('_', '-')}", f"{getattr(args, name):g}"]
    if args.no_refit:
        parts.append("--no-refit")
    if args.search:
        parts += ["--search", "--search-folds", str(args.search_folds), "--search-fold-days", f"{args.search_fold_days:g}"]
    if args.version:
        parts += ["--version", args.version] + (["--algo", args.algo] if args.algo else [])
    return "fraudactors train " + shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    from fraudactors.errors import ConfigError
    from fraudactors.modeling.evaluate import markdown_table
    from fraudactors.modeling.pipeline import (
        DEFAULT_ALGO,
        TrainContext,
        compute_features,
        load_dataset,
        train_version,
    )
    from fraudactors.modeling.registry import fallback_id
    from fraudactors.modeling.split import SplitConfig, final_split, time_split
    from fraudactors.modeling.table import parse_mapping
    from fraudactors.sim.population import MIN_MERCHANTS

    if args.version:
        algo = args.algo or DEFAULT_ALGO.get(args.version)
        if algo is None:
            raise ConfigError("--algo", f"required for version {args.version!r} (rf or hgb)")
        jobs = [(args.version, algo)]
    else:
        if args.algo:
            raise ConfigError("--algo", "only with --version (the default trains v1=rf and v2=hgb)")
        jobs = list(DEFAULT_ALGO.items())
    for name in ("review_fpr", "decline_fpr"):
        if not 0.0 < getattr(args, name) < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')}", "must be between 0 and 1")
    if not 0.0 < args.legit_sample <= 1.0:
        raise ConfigError("--legit-sample", "must be in (0, 1]")
    if args.decline_fpr > args.review_fpr:
        raise ConfigError("--decline-fpr", "must not exceed --review-fpr (decline is the stricter threshold)")
    for name in ("warmup_days", "calib_days", "gap_days", "test_days", "label_delay_days"):
        if getattr(args, name) < 0 or (name in ("calib_days", "test_days") and getattr(args, name) == 0):
            raise ConfigError(f"--{name.replace('_', '-')}", "must be positive")
    if args.search_folds < 1 or args.search_fold_days <= 0:
        raise ConfigError("--search-folds/--search-fold-days", "must be positive")
    if args.seed < 0:
        raise ConfigError("--seed", "must be >= 0")
    if args.synthetic:
        if args.days <= 0 or args.users < 1:
            raise ConfigError("--days/--users", "must be positive")
        if args.merchants < MIN_MERCHANTS:
            raise ConfigError("--merchants", f"must be at least {MIN_MERCHANTS} (one per country and category)")
        spec = {"kind": "synthetic", "seed": args.seed, "days": args.days, "users": args.users,
                "merchants": args.merchants}
    else:
        spec = {"kind": "file", "path": args.data, "mapping": parse_mapping(args.map),
                "label_delay_days": args.label_delay_days}
    _check_out(args.out)  # before minutes of training, not after
    show = not args.quiet
    ds = load_dataset(spec, show_progress=show, strict=args.strict)
    split_cfg = SplitConfig(args.warmup_days, args.calib_days, args.gap_days, args.test_days)
    split = time_split(ds.event_time, split_cfg)  # fail fast, before the features
    final = None if args.no_refit else final_split(ds, split_cfg, args.legit_sample, args.seed)
    if args.search:  # its folds fit in the data, also before the features
        from fraudactors.modeling.search import folds

        folds(ds, split, split_cfg, args.search_folds, args.search_fold_days)
    X = compute_features(ds, show)
    params: dict[str, dict[str, Any]] = {}
    searches: dict[str, dict[str, Any]] = {}
    if args.search:
        from fraudactors.features.definition import FEATURE_NAMES
        from fraudactors.modeling.search import describe, search

        for algo in dict.fromkeys(a for _, a in jobs):
            params[algo], searches[algo] = search(ds, X, split, split_cfg, algo, args.seed, args.legit_sample,
                                                  FEATURE_NAMES, args.search_folds, args.search_fold_days, show)
            print(f"{algo}: {describe(searches[algo])}", file=sys.stderr)
    ctx = TrainContext(ds=ds, X=X, split=split, final=final, data_spec=spec, split_cfg=split_cfg, seed=args.seed,
                       review_fpr=args.review_fpr, decline_fpr=args.decline_fpr, legit_fraction=args.legit_sample,
                       command=_command(args), show_progress=show, params=params, searches=searches)
    results = {}
    fallbacks = {}
    for version, algo in jobs:
        meta = train_version(ctx, version, algo, args.out)
        results[version] = {"algo": algo, "metrics": meta["metrics"]["test"]}
        fallback = meta["fallback"]
        fallbacks[fallback_id(version)] = {"algo": algo, "metrics": fallback["metrics"]["test"]}
        inf = meta["inference"]
        print(f"{version}: wrote {args.out}/{version}/ (sha256 {meta['sha256'][:12]}..., "
              f"{meta['onnx']['bytes'] / 1e6:.2f} MB; ONNX {inf['onnx_ms_per_batch']} ms per batch of "
              f"{inf['batch_rows']}, {inf['onnx_us_single_row_call']} us single row; reasons "
              f"{inf['reasons_ms_per_batch']} ms per batch; fallback sha256 {fallback['sha256'][:12]}..., "
              f"{fallback['onnx']['bytes'] / 1e6:.2f} MB)", file=sys.stderr)
    print(markdown_table({**results, **fallbacks}))
    return 0
