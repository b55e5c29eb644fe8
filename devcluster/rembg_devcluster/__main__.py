"""python -m rembg_devcluster up|down|status|kubeconfig|demo"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rembg_devcluster.cluster import (
    ClusterConfig,
    DevCluster,
    describe,
    stop_from_state,
    teardown_problems,
)
from rembg_devcluster.demo import run_demo
from rembg_devcluster.errors import DevClusterError

log = logging.getLogger("rembg_devcluster")

DEFAULT_DIR = Path(".cluster")
STOP_HINT = "python -m rembg_devcluster"


def _up(args: argparse.Namespace) -> int:
    config = ClusterConfig(
        state_dir=args.dir,
        monitoring_crds=not args.no_monitoring_crds,
        apiserver_port=args.port,
        real_node=args.real_node,
    )
    cluster = DevCluster.start(config)
    timings = cluster.state.timings_seconds
    log.info(
        "cluster up: %s (ready in %ss, nodes Ready at %ss)",
        cluster.state.server,
        timings["ready"],
        timings["nodes_ready"],
    )
    log.info("  export KUBECONFIG=%s", cluster.kubeconfig)
    log.info("  export PATH=%s:$PATH", cluster.kubectl_binary.parent)
    stop_command = (
        "make cluster-down" if args.dir == DEFAULT_DIR else f"{STOP_HINT} --dir {args.dir} down"
    )
    log.info("  logs: %s   stop: %s", cluster.layout.logs, stop_command)
    return 0


def _down(args: argparse.Namespace) -> int:
    if stopped := stop_from_state(args.dir):
        log.info("cluster down: stopped %s (state in %s)", ", ".join(stopped), args.dir)
    else:
        log.info("cluster down: nothing running from %s", args.dir)
    if problems := teardown_problems(args.dir):
        log.error("cluster down: the host is not as it was: %s", "; ".join(problems))
        return 1
    return 0


def _status(args: argparse.Namespace) -> int:
    cluster = DevCluster.attach(args.dir)
    summary = describe(cluster)
    log.info(json.dumps(summary, indent=2))
    processes = cluster.running()
    return 0 if processes and all(processes.values()) else 1


def _kubeconfig(args: argparse.Namespace) -> int:
    log.info(DevCluster.attach(args.dir).kubeconfig)
    return 0


def _demo(args: argparse.Namespace) -> int:
    result = run_demo(args.dir, args.example, real_node=not args.kwok_only)
    log.info("demo: done. Everything keeps running so you can look around:")
    log.info(
        "  export KUBECONFIG=%s PATH=%s:$PATH",
        result.cluster.kubeconfig,
        result.cluster.kubectl_binary.parent,
    )
    log.info(f"  kubectl get rembgservice {result.service} -n {result.namespace} -o yaml")
    log.info(f"  curl --data-binary @photo.jpg {result.server_url}/v1/remove > cutout.png")
    stop_command = (
        "make cluster-down" if args.dir == DEFAULT_DIR else f"{STOP_HINT} --dir {args.dir} down"
    )
    log.info("  stop everything: %s", stop_command)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rembg_devcluster", description=__doc__)
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="state directory (default .cluster)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a fresh local control plane and wait until it is usable")
    up.add_argument(
        "--no-monitoring-crds", action="store_true", help="skip the Prometheus Operator CRDs"
    )
    up.add_argument(
        "--port", type=int, default=None, help="kube-apiserver port (default: a free one)"
    )
    up.add_argument(
        "--real-node",
        action="store_true",
        help="also run a real node (kubelet + containerd, our images; Linux and root only)",
    )
    up.set_defaults(handler=_up)
    sub.add_parser("down", help="stop every process of the cluster").set_defaults(handler=_down)
    sub.add_parser("status", help="processes, memory and timings as JSON").set_defaults(
        handler=_status
    )
    sub.add_parser("kubeconfig", help="print the admin kubeconfig path").set_defaults(
        handler=_kubeconfig
    )
    demo = sub.add_parser("demo", help="cluster + operator + sample RembgService + a real server")
    demo.add_argument("--example", type=Path, default=Path("examples/minimal.yaml"))
    demo.add_argument(
        "--kwok-only",
        action="store_true",
        help="no real node even where the host could run one (simulated pods, a host server)",
    )
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # User-facing output goes through logging so library code and the CLI speak the same way.
    # Only our own logger speaks at INFO; library chatter (httpx requests) stays quiet.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        code: int = args.handler(args)
    except DevClusterError as error:
        # The message is the whole story (it carries the log tail); a traceback adds noise.
        log.error("rembg_devcluster %s: %s", args.command, error)  # noqa: TRY400
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
