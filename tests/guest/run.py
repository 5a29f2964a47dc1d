"""The cgroup-v2 guest: Debian's 6.1 kernel under qemu (TCG), the host's / over 9p.

`python tests/guest/run.py <pytest args...>` boots the guest, runs pytest inside (as root,
NODEMEM_IN_GUEST=1, NODEMEM_REQUIRE_PRIVILEGED=1), prints its output and exits with
pytest's status. `python tests/guest/run.py --build` only sets up the kernel and the
initramfs in .cache/guest/ (what `make test` runs; fast when already done).

Everything comes from Debian's packages: the generic linux-image-6.1.*-amd64 (the cloud
flavour has no 9p), busybox-static and cpio are downloaded and unpacked, never installed;
qemu-system-x86 is installed when missing. See docs/testing.md.
"""

from __future__ import annotations

import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# NODEMEM_GUEST_CACHE: another set-up dir (tests/unit/test_guest_tier.py points it nowhere).
CACHE = Path(os.environ.get("NODEMEM_GUEST_CACHE") or REPO / ".cache" / "guest")
KERNEL = CACHE / "vmlinux"
INITRAMFS = CACHE / "initramfs.cpio.gz"
STAMP = CACHE / "built"
QEMU = "qemu-system-x86_64"
# The drivers the initramfs needs; their dependencies are added from .modinfo.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# What pytest inside the guest runs with; the guest is a fresh machine, nothing to inherit.
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "NODEMEM_IN_GUEST": "1",
    "NODEMEM_REQUIRE_PRIVILEGED": "1",
    # .pyc files would land in the overlay's tmpfs, as Shmem the guard would count.
    "PYTHONDONTWRITEBYTECODE": "1",
}


# pytest inside the guest. Under TCG a Python start costs 10-20x the host's: without
# the hypothesis plugin (no guest test uses it) collection takes 3 s, not 30.
PYTEST = (
    str(REPO / ".venv" / "bin" / "python"),
    "-m",
    "pytest",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:hypothesispytest",
)


class GuestUnavailableError(Exception):
    """The guest cannot be set up or booted here (the reason is the message)."""


# --- set-up -------------------------------------------------------------------------


# Raise when build() changes what it makes; init and init2 are compared by time.
BUILD_VERSION = "1"


def is_built() -> bool:
    if not (STAMP.is_file() and KERNEL.is_file() and INITRAMFS.is_file()):
        return False
    if STAMP.read_text().split("\n")[1:2] != [BUILD_VERSION]:
        return False
    built = STAMP.stat().st_mtime
    return all((HERE / name).stat().st_mtime <= built for name in ("init", "init2"))


def _apt_download(packages: Sequence[str], into: Path) -> None:
    command = ["apt-get", "download", *packages]
    if subprocess.run(command, check=False, cwd=into, capture_output=True).returncode != 0:
        # Stale or missing package lists: refresh once, as the Makefile does for promtool.
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(command, cwd=into, check=True, capture_output=True)


def kernel_package() -> str:
    """The generic 6.1 kernel Debian's metapackage points at (linux-image-6.1.0-NN-amd64)."""
    command = ["apt-cache", "depends", "linux-image-amd64"]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:  # no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        done = subprocess.run(command, check=True, capture_output=True, text=True)
    out = done.stdout
    found = re.findall(r"Depends: (linux-image-6\.1\.\S+-amd64)\b", out)
    if not found or "cloud" in found[0]:
        raise GuestUnavailableError(f"no generic linux-image-6.1.*-amd64 in: {out!r}")
    return str(found[0])


def _module_depends(ko: Path) -> list[str]:
    # The .modinfo section holds NUL-separated key=value strings, "depends=a,b" among them.
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko.read_bytes())
    return [name for name in (match.group(1).decode().split(",") if match else []) if name]


def module_order(modules_dir: Path, wanted: Sequence[str]) -> list[Path]:
    """`wanted` and everything they depend on, dependencies first (busybox insmod)."""
    by_name = {ko.stem.replace("-", "_"): ko for ko in modules_dir.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str) -> None:
        ko = by_name[name.replace("-", "_")]
        if ko in order:
            return
        for dependency in _module_depends(ko):
            visit(dependency)
        order.append(ko)

    for name in wanted:
        visit(name)
    return order


def vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside Debian's xz-compressed bzImage. qemu boots it through its PVH
    entry point, which skips the decompression: 3 s less per boot under TCG."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise GuestUnavailableError("the kernel image is not xz-compressed")
    elf = lzma.LZMADecompressor().decompress(bzimage[start:])
    if not elf.startswith(b"\x7fELF"):
        raise GuestUnavailableError("no ELF kernel inside the bzImage")
    return elf


def ensure_qemu() -> None:
    if shutil.which(QEMU):
        return
    if os.geteuid() != 0:
        raise GuestUnavailableError(f"{QEMU} is missing (apt-get install qemu-system-x86 as root)")
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, check=False, env=env).returncode != 0:
        # A fresh machine may have no package lists yet: refresh once, then insist.
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(command, check=True, env=env)


def build() -> None:
    """Kernel and initramfs into .cache/guest/ (idempotent: a no-op when up to date)."""
    ensure_qemu()
    if is_built():
        return
    started = time.monotonic()
    work = CACHE / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "deb").mkdir(parents=True)
    package = kernel_package()
    _apt_download([package, "busybox-static", "cpio"], work / "deb")
    debs = {deb.name.split("_")[0]: deb for deb in (work / "deb").glob("*.deb")}
    root, tools, initramfs = work / "root", work / "tools", work / "initramfs"
    for path in (root, tools, initramfs):
        path.mkdir()
    # Only the kernel and the module tree out of the 400 MB package: like dpkg-deb -x,
    # a few seconds faster.
    with subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", debs[package]], stdout=subprocess.PIPE
    ) as deb:
        subprocess.run(
            [
                "tar",
                "-x",
                "-C",
                root,
                "--wildcards",
                "./boot/vmlinuz-*",
                "./lib/modules/*/kernel/*",
            ],
            stdin=deb.stdout,
            check=True,
        )
    for name in ("busybox-static", "cpio"):
        subprocess.run(["dpkg-deb", "-x", debs[name], tools], check=True)

    (initramfs / "bin").mkdir()
    (initramfs / "modules").mkdir()
    shutil.copy(tools / "bin" / "busybox", initramfs / "bin" / "busybox")
    for name in ("init", "init2"):
        shutil.copy(HERE / name, initramfs / name)
    (initramfs / "init").chmod(0o755)
    order = module_order(root / "lib" / "modules", MODULES)
    for ko in order:
        shutil.copy(ko, initramfs / "modules" / ko.name)
    (initramfs / "modules" / "order").write_text(" ".join(ko.stem for ko in order) + "\n")
    files = sorted(str(path.relative_to(initramfs)) for path in initramfs.rglob("*"))
    cpio = subprocess.run(
        [tools / "bin" / "cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
        cwd=initramfs,
        input="\n".join(files).encode(),
        capture_output=True,
        check=True,
    ).stdout
    gz = subprocess.run(["gzip", "-1"], input=cpio, capture_output=True, check=True).stdout
    CACHE.mkdir(parents=True, exist_ok=True)
    INITRAMFS.write_bytes(gz)
    KERNEL.write_bytes(vmlinux(next((root / "boot").glob("vmlinuz-*")).read_bytes()))
    STAMP.write_text(f"{package}\n{BUILD_VERSION}\n")
    shutil.rmtree(work)
    print(f"guest: {package} and an initramfs in {CACHE} ({time.monotonic() - started:.0f} s)")


# --- boot ---------------------------------------------------------------------------


def unavailable() -> str | None:
    """Why the guest cannot boot here, or None."""
    if os.geteuid() != 0:
        return "the guest needs root (it shares the host's / with qemu)"
    if not shutil.which(QEMU):
        return f"{QEMU} is missing: run `make test` (or tests/guest/run.py --build) as root"
    if not is_built():
        return "the guest kernel is not set up: run tests/guest/run.py --build"
    return None


def _command_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    lines = [f"export {key}={shlex.quote(value)}" for key, value in {**GUEST_ENV, **env}.items()]
    lines += [f"cd {shlex.quote(str(cwd))}", "exec " + shlex.join(argv)]
    return "\n".join(lines) + "\n"


def _follow(path: Path, done: threading.Event) -> None:
    """Copies what the guest appends to `path` to our stdout until `done`."""
    offset = 0
    while True:
        finished = done.is_set()  # read once more after the guest is gone
        if path.exists():
            with open(path, "rb") as file:
                file.seek(offset)
                chunk = file.read()
            if chunk:
                offset += len(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        if finished:
            return
        time.sleep(0.1)


def boot(
    argv: Sequence[str],
    share: Path,
    *,
    cwd: Path = REPO,
    timeout: float = 900,
    stream: bool = True,
    env: Mapping[str, str] | None = None,
) -> int:
    """Runs `argv` in a fresh guest; returns its exit status. `share` (a host dir, mounted
    read-write at the same path in the guest) receives `output`, `rc` and `console.log`."""
    reason = unavailable()
    if reason is not None:
        raise GuestUnavailableError(reason)
    share.mkdir(parents=True, exist_ok=True)
    (share / "cmd.sh").write_text(_command_script(argv, cwd, env or {}))
    cmdline = (
        "console=ttyS0 quiet loglevel=3 panic=-1 sysrq_always_enabled=1 mitigations=off "
        f"nodemem.share={share} nodemem.project={cwd}"
    )
    # Nested KVM stalls at boot on these machines: TCG, with 2 vCPUs and 2 GiB.
    qemu = [
        QEMU,
        "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{share / 'console.log'}",
        "-kernel", str(KERNEL), "-initrd", str(INITRAMFS), "-append", cmdline,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag=share,security_model=passthrough",
    ]  # fmt: skip
    done = threading.Event()  # no thread when not streaming: tests use preexec_fn
    follower = threading.Thread(target=_follow, args=(share / "output", done), daemon=True)
    if stream:
        follower.start()
    try:
        result = subprocess.run(qemu, check=False, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise GuestUnavailableError(f"the guest did not power off within {timeout:.0f} s") from exc
    finally:
        done.set()
        if stream:
            follower.join()
    rc_file = share / "rc"
    if not rc_file.is_file():
        console = (
            (share / "console.log").read_text(errors="replace")
            if (share / "console.log").exists()
            else ""
        )
        raise GuestUnavailableError(
            f"the guest stopped without running the command (qemu exit {result.returncode}):\n"
            f"{result.stderr.decode(errors='replace')}{console[-4000:]}"
        )
    return int(rc_file.read_text().strip())


def main(args: Sequence[str]) -> int:
    if list(args) == ["--build"]:
        try:
            build()
        except GuestUnavailableError as exc:
            print(f"guest: not set up: {exc}", file=sys.stderr)
            return 1 if os.environ.get("NODEMEM_REQUIRE_PRIVILEGED") == "1" else 0
        return 0
    build()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nodemem-guest-") as share:
        argv = [*PYTEST, *args]
        try:
            rc = boot(argv, Path(share))
        except GuestUnavailableError as exc:
            print(f"guest: {exc}", file=sys.stderr)
            return 125
    print(f"guest: exit {rc} after {time.monotonic() - started:.1f} s (TCG)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
