"""``fraudactors models``: list and change the live routing of every running replica.

A change reads the newest routing document on the control topic (or the configuration's variants,
revision 0, when there is none), makes the new one (``revision + 1``, the current one kept as its
``previous``), checks that every version it routes to loads here -- present in ``models.dir``, every
file matching its sha256, the ONNX sessions open -- and writes it, unless another change was
written meanwhile (then nothing is written and the command says to run it again). The check is
best effort: two commands that pass it within the same milliseconds both write, and the replicas
follow the later document (``fraudactors.engine.control``). The replicas apply it (or refuse
it, keeping their routing) within a fetch; ``fraudactors_routing_revision`` shows where each one is.

    fraudactors models list
    fraudactors models set-weights A=0.5 B=0.5       # the named deciding variants' weights
    fraudactors models promote v3 --variant C --shadow
    fraudactors models promote v3 --variant C --weight 0.1
    fraudactors models promote v2 --variant A        # variant A now runs v2, same weight
    fraudactors models rollback                      # the previous routing, as a new revision
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
from pathlib import Path
from typing import Any

HELP = "list or change the live model routing of every running engine (set-weights, promote, rollback)"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="TOML config file (default: FRAUDACTORS_CONFIG, then packaged defaults): "
                             "kafka, topics.control and models.dir; FRAUDACTORS_<SECTION>__<KEY> override it")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="the routing in force, the one before it, and the versions in models.dir",
                       description="the routing in force, the one before it, and the versions in models.dir")
    weights = actions.add_parser("set-weights", help="set the weights of deciding variants: A=0.5 B=0.5",
                                 description="set the weights of deciding variants (the others keep theirs)")
    weights.add_argument("weights", nargs="+", metavar="VARIANT=WEIGHT")
    promote = actions.add_parser("promote", help="put a model version in a variant (new or existing)",
                                 description="put a model version in a variant; a new variant needs "
                                             "--weight or --shadow")
    promote.add_argument("version")
    promote.add_argument("--variant", required=True)
    role = promote.add_mutually_exclusive_group()
    role.add_argument("--weight", type=float, default=None, help="the variant's weight (decides)")
    role.add_argument("--shadow", action="store_true", help="scored and recorded, never decides")
    rollback = actions.add_parser("rollback", help="back to the previous routing (as a new revision)",
                       description="back to the previous routing (as a new revision)")
    for sub in (weights, promote, rollback):
        sub.add_argument("--reason", default="", help="why (kept in the routing document)")
    for sub in actions.choices.values():  # --config after the action too (`models list --config x.toml`)
        sub.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    from fraudactors.logging import configure_logging
    from fraudactors.settings import load_settings, secret_values

    settings = load_settings(args.config)
    configure_logging("warning", "console", secrets=secret_values(settings))
    # aiokafka logs every failed connection attempt; the command reports the failure in its one line.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return asyncio.run(_run(settings, args))


async def _run(settings: Any, args: argparse.Namespace) -> int:
    from fraudactors.engine.control import publish_routing, routing_and_end
    from fraudactors.engine.routing import Routing

    current: Routing
    current, read_at = await routing_and_end(settings)
    if args.action == "list":
        print(describe(current, available_versions(settings.models.dir)))
        return 0
    if args.action == "set-weights":
        weights = parse_weights(args.weights)
        new = current.with_weights(weights, {}, args.reason)
    elif args.action == "promote":
        new = current.promoted(args.version, args.variant, {}, weight=args.weight, shadow=args.shadow,
                               reason=args.reason)
    else:
        new = current.rolled_back(args.reason)
    pins = verify_versions(settings.models.dir, new.versions)
    from dataclasses import replace

    new = replace(new, models={**{k: v for k, v in new.models.items() if k in pins}, **pins}).validate()
    offset = await publish_routing(settings, new, read_at=read_at)
    print(f"routing revision {new.revision} written ({new.reason}) at offset {offset} of {settings.topics.control}")
    print(new.describe())
    return 0


def parse_weights(items: list[str]) -> dict[str, float]:
    from fraudactors.errors import RoutingRefused

    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name or not math.isfinite(weight) or weight < 0:
            raise RoutingRefused(f"{item!r} is not VARIANT=WEIGHT with a weight >= 0")
        out[name] = weight
    return out


def verify_versions(models_dir: str, versions: tuple[str, ...]) -> dict[str, str]:
    """Load every version as an engine would (sha256 of every file, ONNX sessions); returns the
    sha256 of each ``model.onnx``, pinned in the document. Raises naming the first that fails."""
    from fraudactors.errors import ModelError, RoutingRefused
    from fraudactors.modeling.registry import load_model_info
    from fraudactors.modeling.scorer import Scorer

    try:
        infos = [load_model_info(models_dir, version) for version in versions]
        Scorer(infos)
    except ModelError as exc:
        raise RoutingRefused(f"not written: {exc}") from exc
    return {info.version: info.sha256 for info in infos}


def available_versions(models_dir: str) -> dict[str, str]:
    """Each directory of ``models_dir`` with a metadata.json: "ok" or why it does not load."""
    from fraudactors.errors import ModelError
    from fraudactors.modeling.registry import METADATA_FILE, load_model_info

    out: dict[str, str] = {}
    root = Path(models_dir)
    for directory in sorted(p for p in root.iterdir() if (p / METADATA_FILE).is_file()) if root.is_dir() else []:
        try:
            info = load_model_info(root, directory.name)
            out[directory.name] = f"ok, sha256 {info.sha256[:12]}"
        except ModelError as exc:
            out[directory.name] = f"refused: {exc}"
    return out


def describe(routing: Any, available: dict[str, str]) -> str:
    lines = [f"routing revision {routing.revision}" + (f", issued {routing.issued_at}" if routing.issued_at else "")
             + (f": {routing.reason}" if routing.reason else ""), routing.describe()]
    if routing.previous is not None:
        prev = routing.previous
        lines += [f"previous: revision {prev.revision}" + (f": {prev.reason}" if prev.reason else ""),
                  prev.describe()]
    else:
        lines.append("previous: none (rollback is not possible)")
    lines.append("versions in models.dir:")
    lines += [f"  {version}: {state}" for version, state in available.items()] or ["  none"]
    return "\n".join(lines)
