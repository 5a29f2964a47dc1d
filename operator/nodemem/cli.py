"""`nodemem report | apply | ...`: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Each command imports what it uses, in its body: the models (pydantic), YAML, kopf and
# the kubernetes client (most of a second) are paid for only by the commands that need
# them, and --help by none. Only the standard library and nodemem.host (stdlib only) come
# here: ruff's TID253 keeps the rest out (docs/architecture.md#import-rules);
# bench/cli_startup.py measures the start-up.
from nodemem.host.meminfo import MeminfoError, read_meminfo
from nodemem.host.mounts import MountinfoError
from nodemem.host.originals import AGENT_FILE, APPLY_FILE, Originals
from nodemem.host.paths import HostPaths

if TYPE_CHECKING:
    from nodemem.policy.pods import PodDirectory

EXIT_OK = 0
EXIT_NOT_APPLIED = 1
EXIT_INVALID = 2

DEFAULT_STATE_DIR = "/var/lib/nodemem"
DEFAULT_METRICS_PORT = 8080


def _state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, else $NODEMEM_STATE_DIR, else /var/lib/nodemem."""
    return Path(args.state_dir or os.environ.get("NODEMEM_STATE_DIR") or DEFAULT_STATE_DIR)


def _add_state_dir_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"{what} (default $NODEMEM_STATE_DIR, else {DEFAULT_STATE_DIR})",
    )


def _host_paths(args: argparse.Namespace) -> HostPaths:
    return HostPaths(host_root=Path(args.host_root), proc_root=Path(args.proc_root))


def _add_host_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host-root", default="/", help="where the host's / is (default /)")
    parser.add_argument("--proc-root", default="/proc", help="the host's /proc (default /proc)")
    parser.add_argument(
        "--pods-file",
        metavar="FILE",
        help="pods on this node (`kubectl get pods -o json`), for pod names and OOM rules' "
        "namespace, labelSelector and container criteria",
    )


def _pods(args: argparse.Namespace) -> PodDirectory:
    from nodemem.policy.pods import PodDirectory, PodsFileError, load_pods_file

    if not args.pods_file:
        return PodDirectory()
    try:
        # Not capped like a policy: `kubectl get pods -o json` of a full node is megabytes.
        return load_pods_file(Path(args.pods_file).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise SystemExit(f"nodemem: cannot read {args.pods_file}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SystemExit(
            f"nodemem: {args.pods_file}: not valid UTF-8 at byte {exc.start}"
        ) from None
    except PodsFileError as exc:
        raise SystemExit(f"nodemem: {args.pods_file}: {exc}") from None


class _CommandError(Exception):
    """A command cannot start; `main` prints the message and exits with the code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _host_meminfo(args: argparse.Namespace, paths: HostPaths) -> dict[str, int]:
    """Read first, so that a wrong --proc-root is named as such (exit 2) and a meminfo
    that cannot be trusted is named with its line (exit 1), before anything else."""
    where = paths.proc("meminfo")
    try:
        return read_meminfo(paths)
    except OSError as exc:
        raise _CommandError(
            EXIT_INVALID, f"--proc-root {args.proc_root}: cannot read {where}: {exc.strerror}"
        ) from None
    except MeminfoError as exc:
        raise _CommandError(EXIT_NOT_APPLIED, f"{where}: {exc}") from None


def _require_mount_table(args: argparse.Namespace, paths: HostPaths) -> None:
    """apply and restore find mounts in the mount table: without one a wrong --proc-root
    would otherwise end in a traceback at the first tmpfs item."""
    where = paths.proc("self", "mountinfo")
    if not os.access(where, os.R_OK):
        raise _CommandError(EXIT_INVALID, f"--proc-root {args.proc_root}: cannot read {where}")


def cmd_report(args: argparse.Namespace) -> int:
    from nodemem.host.memcg import find_futile
    from nodemem.host.oom_predict import predict_victims
    from nodemem.host.podmem import read_pod_memory
    from nodemem.host.shmem import scan_node
    from nodemem.policy.report import (
        futile_items,
        host_report,
        node_counters,
        oom_preview,
        pod_memory_items,
    )
    from nodemem.tables import host_report_text

    paths = _host_paths(args)
    _host_meminfo(args, paths)
    try:
        prediction = predict_victims(paths, cgroup=args.oom_cgroup, limit=args.top)
    except (FileNotFoundError, LookupError) as exc:
        if args.oom_cgroup is None:
            raise
        print(f"nodemem: --oom-cgroup {args.oom_cgroup}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    pods = _pods(args)
    oom = oom_preview(paths, prediction, pods)
    scan = scan_node(paths)
    processes = None
    if args.processes is not None:  # imported here: this command's own part, kept together
        from nodemem.host.smaps import account_processes
        from nodemem.policy.report import process_summary

        accounting = account_processes(paths, scan.processes)
        processes = process_summary(paths, accounting, args.processes or args.top, pods)
    pod_memory = pod_memory_items(read_pod_memory(paths), pods, args.top)
    oom.futile = futile_items(find_futile(paths, scan), pods)
    pressure, oom_kills = node_counters(paths)
    report = host_report(
        scan,
        top=args.top,
        oom=oom,
        processes=processes,
        pods=pod_memory,
        pressure=pressure,
        oom_kills=oom_kills,
    )
    for warning in report.warnings:
        print(f"nodemem: warning: {warning}", file=sys.stderr)
    if args.json:
        print(report.model_dump_json(by_alias=True, indent=2))
    else:
        print(host_report_text(report))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, found {value}")
    return value


def _node_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in filter(None, text.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value, found {pair!r}")
        labels[key.strip()] = value.strip()
    return labels


def cmd_apply(args: argparse.Namespace) -> int:
    from nodemem.agent.policy_file import read_policy_file
    from nodemem.api.manifest import MAX_MANIFEST_BYTES, PolicyError, load_policy_bytes
    from nodemem.host.shmem import scan_node
    from nodemem.policy.apply import apply_policy
    from nodemem.policy.effective import effective_policy
    from nodemem.policy.report import apply_report
    from nodemem.tables import apply_report_text

    paths = _host_paths(args)
    try:
        if args.file == "-":
            policies = load_policy_bytes(sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1))
        else:
            policies = read_policy_file(Path(args.file))
    except OSError as exc:
        print(f"nodemem: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID
    except PolicyError as exc:
        print(f"nodemem: invalid policy in {args.file}:", file=sys.stderr)
        for message in exc.messages:
            print(f"  {message}", file=sys.stderr)
        return EXIT_INVALID
    memory_total = _host_meminfo(args, paths)["MemTotal"]
    _require_mount_table(args, paths)
    effective = effective_policy(policies, args.node_labels, memory_total)
    cleanups = effective.cleanup if args.run_cleanup else ()
    held_open = scan_node(paths).open_tmpfs_files if cleanups else {}
    # What it changes is recorded first, for `nodemem restore` (a dry run records nothing).
    originals = None if args.dry_run else Originals(_state_dir(args) / APPLY_FILE, paths)
    result = apply_policy(
        paths,
        effective,
        dry_run=args.dry_run,
        cleanups=cleanups,
        held_open=held_open,
        pods=_pods(args),
        originals=originals,
    )
    report = apply_report(effective, result, dry_run=args.dry_run)
    if args.json:
        print(report.model_dump_json(by_alias=True, indent=2))
    else:
        print(apply_report_text(report, cleanup_skipped=bool(effective.cleanup) and not cleanups))
    return EXIT_NOT_APPLIED if result.failed else EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    """Put back everything `nodemem apply` and the agent recorded in the state dir."""
    from nodemem.policy.report import restore_report
    from nodemem.policy.undo import RestoreResult, restore_all
    from nodemem.tables import apply_report_text

    paths = _host_paths(args)
    _host_meminfo(args, paths)
    _require_mount_table(args, paths)
    state_dir = _state_dir(args)
    result = RestoreResult()
    # apply's first: a value it recorded may be one the agent had set, and the agent's
    # record holds what was there before either.
    for name in (APPLY_FILE, AGENT_FILE):
        done = restore_all(paths, Originals(state_dir / name, paths), dry_run=args.dry_run)
        result.tmpfs += done.tmpfs
        for outcome in done.oom.outcomes:
            result.oom.record_restore(outcome)
    report = restore_report(result, dry_run=args.dry_run)
    if args.json:
        print(report.model_dump_json(by_alias=True, indent=2))
    else:
        recorded = bool(report.tmpfs or report.oom.restores)
        heading = f"Originals recorded in {state_dir}" + ("" if recorded else ": none to restore")
        print(apply_report_text(report, heading=heading))
    return EXIT_NOT_APPLIED if result.failed else EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.policy_file is None:
        return _cluster_agent(args)
    from nodemem.agent.loop import AgentSettings, NodeAgent
    from nodemem.agent.metrics import AgentMetrics, CycleMetrics, serve
    from nodemem.agent.policy_file import PolicyFile

    paths = _host_paths(args)
    metrics = AgentMetrics(args.metrics_top_objects) if args.metrics_port else None
    agent = NodeAgent(
        paths,
        PolicyFile(args.policy_file),
        node_labels=args.node_labels,
        pods=_pods(args),
        settings=AgentSettings(
            resync_seconds=args.resync, dry_run=args.dry_run, nri_rules_file=args.nri_rules_file
        ),
        # The policies are the file's; the state dir keeps only the undo record.
        originals=Originals(_state_dir(args) / AGENT_FILE, paths),
        on_cycle=CycleMetrics(metrics, paths) if metrics is not None else None,
    )
    server = None
    if metrics is not None:
        try:
            server = serve(
                metrics,
                args.metrics_port,
                lambda: agent.state.resyncs > 0,
                args.metrics_host or "127.0.0.1",  # no cluster: this host's users only
            )
        except OSError as exc:
            print(f"nodemem: agent: cannot serve metrics: {exc.strerror}", file=sys.stderr)
            return EXIT_INVALID
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: agent.stop())
    try:
        agent.run()
    finally:
        if server is not None:
            server.server_close()
    return EXIT_OK


def _cluster_agent(args: argparse.Namespace) -> int:
    from nodemem.agent.main import ClusterAgentOptions, run_cluster_agent
    from nodemem.kube import load_client_config

    node = args.node_name or os.environ.get("NODE_NAME")
    if not node:
        print(
            "nodemem: agent: set NODE_NAME (or --node-name), or give --policy-file", file=sys.stderr
        )
        return EXIT_INVALID
    options = ClusterAgentOptions(
        node_name=node,
        state_dir=_state_dir(args),
        metrics_port=DEFAULT_METRICS_PORT
        if args.metrics_port is None
        else args.metrics_port or None,
        metrics_host=args.metrics_host or "0.0.0.0",  # the pod network: probes, Prometheus
        metrics_top_objects=args.metrics_top_objects,
        resync_seconds=args.resync,
        heartbeat_seconds=args.heartbeat,
        dry_run=args.dry_run,
        paths=_host_paths(args),
        nri_rules_file=args.nri_rules_file,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    run_cluster_agent(options, load_client_config(args.kubeconfig), stop)
    return EXIT_OK


def cmd_controller(args: argparse.Namespace) -> int:
    import kopf
    from kubernetes import client as k8s

    from nodemem.controller.operator import Controller, ControllerSettings
    from nodemem.kube import kopf_login, load_client_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    configuration = load_client_config(args.kubeconfig)
    controller = Controller(
        k8s.ApiClient(configuration), ControllerSettings(interval=args.interval)
    )
    kopf.run(
        registry=controller.registry(kopf_login(configuration)),
        clusterwide=True,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
    )
    return EXIT_OK


def cmd_crds(args: argparse.Namespace) -> int:
    from nodemem.api.crd import render_crds

    rendered = render_crds()
    if args.output_dir is None:
        sys.stdout.write("---\n".join(rendered.values()))
        return EXIT_OK
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out / name).write_text(text, encoding="utf-8")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodemem", description="Node memory and OOM policy: where the memory went."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    report = commands.add_parser("report", help="explain this host's memory and Shmem")
    report.add_argument("--json", action="store_true", help="print JSON instead of tables")
    report.add_argument(
        "--top", type=_positive, default=10, metavar="N", help="largest N objects (N >= 1)"
    )
    report.add_argument(
        "--processes",
        type=_positive,
        nargs="?",
        const=0,  # given without N: as many as --top
        metavar="N",
        help="also list the N processes with the largest PSS, with RSS, USS and their Shmem "
        "(/proc/PID/smaps_rollup), and the totals over all processes (N defaults to --top)",
    )
    report.add_argument(
        "--oom-cgroup",
        metavar="PATH",
        help="preview the victims of an OOM in this memory cgroup (a directory under the "
        "cgroup mount, or its path in the memory hierarchy) instead of a node-wide OOM",
    )
    _add_host_options(report)
    report.set_defaults(func=cmd_report)

    apply = commands.add_parser(
        "apply",
        help="apply a NodeMemoryPolicy manifest to this host once",
        description="Exit status: 0 every item applied or unchanged, 1 an item was refused "
        "or failed, 2 the policy is invalid (nothing was changed).",
    )
    apply.add_argument("-f", "--file", required=True, help="policy manifest (YAML; - for stdin)")
    apply.add_argument("--dry-run", action="store_true", help="plan and report, change nothing")
    apply.add_argument(
        "--node-labels",
        type=_node_labels,
        default={},
        metavar="K=V,...",
        help="this node's labels, for the policies' nodeSelector",
    )
    apply.add_argument(
        "--run-cleanup",
        action="store_true",
        help="run every cleanup rule now, due or not; exit 1 when a rule is not Completed "
        "(a path skipped: missing, not on tmpfs, into other mounts; errors; a failed run)",
    )
    apply.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_state_dir_option(apply, "where the values it changes are recorded for `nodemem restore`")
    _add_host_options(apply)
    apply.set_defaults(func=cmd_apply)

    restore = commands.add_parser(
        "restore",
        help="put back the tmpfs sizes and oom_score_adj values recorded on this host",
        description="Writes back every original that `nodemem apply` and the agent recorded "
        "(stop the agent first: it would apply its policies again). A tmpfs mounted anew, "
        "or a process whose pid was reused, is never touched. Exit status: 0 everything "
        "restored (or nothing recorded), 1 a restore was refused or failed (kept, for a "
        "later run), 2 bad input.",
    )
    restore.add_argument("--dry-run", action="store_true", help="report, change nothing")
    restore.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_state_dir_option(restore, "where the originals were recorded")
    _add_host_options(restore)
    restore.set_defaults(func=cmd_restore)

    agent = commands.add_parser(
        "agent",
        help="run the node agent: in a cluster, or without one from a policy file",
        description="Applies the policies (tmpfs limits, oom rules, cleanups on their "
        "schedule), keeps applying oom rules to every new process, and follows changes. "
        "With --policy-file: no cluster, the file is re-read when it changes. Without it: "
        "policies from the API, this node's NodeMemoryReport written (node name from "
        "NODE_NAME). Ctrl-C or SIGTERM stops it.",
    )
    agent.add_argument("--policy-file", help="NodeMemoryPolicy manifest (YAML): no cluster")
    agent.add_argument("--node-name", help="this node (default: $NODE_NAME)")
    agent.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster)")
    _add_state_dir_option(
        agent,
        "where the record of originals (for undo) is kept, and in a cluster the policies "
        "in force across restarts and API outages",
    )
    agent.add_argument(
        "--metrics-port",
        type=int,
        help="port of /metrics, /healthz and /readyz (0: none; default: "
        f"{DEFAULT_METRICS_PORT} in a cluster, none with --policy-file)",
    )
    agent.add_argument(
        "--metrics-host",
        help="address of the metrics port (default: 0.0.0.0 in a cluster, 127.0.0.1 with "
        "--policy-file; :: for IPv6)",
    )
    agent.add_argument(
        "--metrics-top-objects",
        type=_positive,
        default=20,  # metrics.DEFAULT_TOP_OBJECTS (not imported: start-up time)
        metavar="N",
        help="export the N largest Shmem objects as nodemem_shmem_object_bytes (default 20)",
    )
    agent.add_argument(
        "--heartbeat",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="rewrite the report at least this often, even unchanged",
    )
    agent.add_argument("--dry-run", action="store_true", help="plan and log, change nothing")
    agent.add_argument(
        "--node-labels", type=_node_labels, default={}, metavar="K=V,...", help="node labels"
    )
    agent.add_argument(
        "--resync", type=float, default=30.0, metavar="SECONDS", help="full resync interval"
    )
    agent.add_argument(
        "--nri-rules-file",
        type=Path,
        metavar="PATH",
        help="write the oom rules an NRI plugin can apply at container creation here "
        "(the chart's nri sidecar reads it)",
    )
    _add_host_options(agent)
    agent.set_defaults(func=cmd_agent)

    controller = commands.add_parser(
        "controller",
        help="run the controller: validate policies, roll node reports up into their status",
    )
    controller.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster)")
    controller.add_argument(
        "--health-port", type=int, default=8080, help="port of the /healthz liveness endpoint"
    )
    controller.add_argument(
        "--peering",
        metavar="NAME",
        help="kopf peering object for leader election between replicas (default: standalone)",
    )
    controller.add_argument(
        "--interval", type=float, default=1.0, help="shortest time between two roll-ups (s)"
    )
    controller.set_defaults(func=cmd_controller)

    crds = commands.add_parser("crds", help="print or write the CRDs generated from the models")
    crds.add_argument("--output-dir", help="write one file per CRD here instead of printing")
    crds.set_defaults(func=cmd_crds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except _CommandError as exc:
        print(f"nodemem: {exc}", file=sys.stderr)
        return exc.code
    except (MeminfoError, MountinfoError) as exc:  # a /proc file we cannot trust
        print(f"nodemem: {exc}", file=sys.stderr)
        return EXIT_NOT_APPLIED
    return result


if __name__ == "__main__":
    sys.exit(main())
