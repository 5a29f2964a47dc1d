"""`nodemem report | apply | ...`: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nodemem.host.paths import HostPaths
from nodemem.host.shmem import scan_node
from nodemem.policy.report import host_report
from nodemem.tables import host_report_text


def _host_paths(args: argparse.Namespace) -> HostPaths:
    return HostPaths(host_root=Path(args.host_root), proc_root=Path(args.proc_root))


def _add_host_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host-root", default="/", help="where the host's / is (default /)")
    parser.add_argument("--proc-root", default="/proc", help="the host's /proc (default /proc)")


def cmd_report(args: argparse.Namespace) -> int:
    report = host_report(scan_node(_host_paths(args)), top=args.top)
    if args.json:
        print(report.model_dump_json(by_alias=True, indent=2))
    else:
        print(host_report_text(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodemem", description="Node memory and OOM policy: where the memory went."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    report = commands.add_parser("report", help="explain this host's memory and Shmem")
    report.add_argument("--json", action="store_true", help="print JSON instead of tables")
    report.add_argument("--top", type=int, default=10, metavar="N", help="largest N objects")
    _add_host_options(report)
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
