"""`python -m rembg_operator`: run the operator (kopf, standalone, handlers from this package).

Flags override the REMBG_OPERATOR_* environment (see rembg_operator.settings).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

import kopf
from kopf._core.engines.peering import Identity  # kopf.run's type for it; not re-exported

from rembg_operator.settings import Settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rembg_operator", description=__doc__)
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=None,
        help="watch this namespace (repeatable); default: cluster-wide",
    )
    parser.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    parser.add_argument("--liveness-port", type=int, help="kopf liveness endpoint port (0 = off)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus metrics port (0 = off)")
    parser.add_argument("--log-format", choices=["json", "text"])
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def apply_flags(args: argparse.Namespace) -> None:
    """Flags become environment so the startup handler reads one source."""
    if args.all_namespaces:
        os.environ["REMBG_OPERATOR_NAMESPACES"] = ""
    elif args.namespace:
        os.environ["REMBG_OPERATOR_NAMESPACES"] = ",".join(args.namespace)
    for flag, env in (
        ("liveness_port", "LIVENESS_PORT"),
        ("metrics_port", "METRICS_PORT"),
        ("log_format", "LOG_FORMAT"),
        ("log_level", "LOG_LEVEL"),
    ):
        value = getattr(args, flag)
        if value is not None:
            os.environ[f"REMBG_OPERATOR_{env}"] = str(value)


def main(argv: list[str] | None = None) -> int:
    apply_flags(parse_args(sys.argv[1:] if argv is None else argv))
    config = Settings()
    kopf.configure(
        verbose=config.log_level == "DEBUG",
        quiet=config.log_level in ("WARNING", "ERROR"),
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.FULL,
        log_refkey="object" if config.log_format == "json" else None,
    )
    logging.getLogger().setLevel(config.log_level)
    if config.log_level != "DEBUG":
        # kopf logs every event handler's success per object at INFO: thousands of lines a
        # minute with a large fleet. Failures still log at WARNING/ERROR.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Importing registers the handlers in kopf's default registry.
    import rembg_operator.handlers  # noqa: F401, PLC0415

    liveness = (
        f"http://{config.bind_address}:{config.liveness_port}/healthz"
        if config.liveness_port
        else None
    )
    kopf.run(
        standalone=True,
        identity=operator_identity(),
        clusterwide=config.clusterwide,
        namespaces=config.namespaces,
        liveness_endpoint=liveness,
    )
    return 0


def operator_identity() -> Identity:
    """Who this operator is in kopf's logs and peering. kopf's own default asks the password
    database for the process' user, which a container running as an arbitrary uid (the chart's
    runAsUser, OpenShift's random uids) does not have: it crashed at start-up."""
    return Identity(f"rembg-operator@{socket.gethostname()}")


if __name__ == "__main__":
    sys.exit(main())
