"""containerd v2, the container runtime of the tests' real kubelet, built from Go modules.

The pinned ``github.com/containerd/containerd/v2`` (this folder's go.mod) gives
``containerd``, ``containerd-shim-runc-v2`` and ``ctr``, built into ``BIN``
(``.cluster/bin``, shared with the control plane) again only when the pins, the sources
or the flags change; the stamp is ``.node-build-key`` (the control plane's is
``.build-key``; both through controlplane.go_build). Pure Go (``CGO_ENABLED=0``): static
binaries, without the btrfs, devmapper and ZFS snapshotters. The shim is built apart
with containerd's own extra tag ``no_grpc``, as its Makefile does.

    python hack/node/build.py [--bin-dir DIR] [--quiet]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "hack" / "cluster"))
from controlplane import go_build  # noqa: E402

BIN = REPO / ".cluster" / "bin"
STAMP = ".node-build-key"
CONTAINERD_VERSION = "v2.4.2"
PACKAGE = "github.com/containerd/containerd/v2"
# Tags of containerd's Makefile (urfave_cli_no_docs), plus the snapshotters we leave out.
TAGS = ("urfave_cli_no_docs", "no_btrfs", "no_devmapper", "no_zfs")
# Each group is one `go build`: the shim takes containerd's SHIM_GO_BUILDTAGS (no_grpc).
GROUPS: dict[tuple[str, ...], dict[str, str]] = {
    TAGS: {
        "containerd": f"{PACKAGE}/cmd/containerd",
        "ctr": f"{PACKAGE}/cmd/ctr",
    },
    (*TAGS, "no_grpc"): {
        "containerd-shim-runc-v2": f"{PACKAGE}/cmd/containerd-shim-runc-v2",
    },
}


NRI_PLUGIN = "nodemem-nri"  # nri/: sets oom_score_adj at CreateContainer


def _ldflags() -> str:
    # What `containerd --version` and `ctr version` report.
    return " ".join(
        [
            "-s",
            "-w",
            f"-X {PACKAGE}/version.Version={CONTAINERD_VERSION}",
            f"-X {PACKAGE}/version.Package={PACKAGE}",
        ]
    )


def build(bin_dir: Path = BIN, *, quiet: bool = False) -> bool:
    """Build containerd's three commands and the NRI plugin (nri/, its own module) into
    ``bin_dir`` unless their stamps say they are current."""
    built = go_build(
        HERE,
        bin_dir,
        GROUPS,
        ldflags=_ldflags(),
        stamp=STAMP,
        label=f"containerd ({CONTAINERD_VERSION})",
        quiet=quiet,
    )
    plugin = go_build(
        HERE / "nri",
        bin_dir,
        {(): {NRI_PLUGIN: "."}},
        ldflags="-s -w",
        stamp=".nri-build-key",
        label="the NRI plugin",
        quiet=quiet,
    )
    return built or plugin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", type=Path, default=BIN)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    build(args.bin_dir, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
