"""The node's container images, built here with no registry, as archives for ``ctr import``.

Three images, all built with buildah in its own storage below ``.cluster/buildah``:

* the Dockerfile's base, ``docker.io/library/python:3.11-slim-bookworm`` (the name its
  ``ARG PYTHON_IMAGE`` resolves to), a stand-in made from Debian's packages: mmdebstrap
  (bookworm, minbase) with python3 and python3-pip; ``/usr/lib/python3.11/EXTERNALLY-MANAGED``
  is removed so that ``pip install`` works as in the official image, and there are no
  docs, man pages, locales, apt lists or ``.pyc`` files. It stays in buildah's storage;
* the project's image from the repository's Dockerfile, unchanged (``buildah bud
  --pull=never``), named as the chart deploys it by default (values.yaml's
  ``image.repository``, Chart.yaml's ``appVersion``): ``docker.io/library/nodemem:0.1.0``;
* ``registry.k8s.io/pause:3.10``: FROM scratch, ``/pause`` compiled static from
  ``pause/pause.c``, user 65535.

The last two are written to ``out_dir`` as OCI archives whose index names each image by
its full reference (``org.opencontainers.image.ref.name``), which ``ctr images import``
keeps as the image name: no ``--base-name`` needed. Each is rebuilt only when what it is
made of changes (a key stamp next to the archive, another in buildah's storage): the base
when its recipe below changes, the project image when the Dockerfile, .dockerignore,
pyproject.toml, README.md or operator/ do (the build context the .dockerignore lets
through), the pause image when pause.c does.

buildah runs as root with ``--root``/``--runroot`` below ``.cluster/buildah`` and the
overlay driver (``NODEMEM_BUILDAH_DRIVER=vfs`` works too, slower), in a private mount
namespace where ``/var/lib`` is an overlay and ``/var/lib/containers`` our own directory:
buildah 1.28 keeps its blob-info cache in ``/var/lib/containers/cache`` whatever its
storage flags say. Needs root and Debian's buildah, mmdebstrap, runc, gcc and libc6-dev.

    python hack/node/images.py build [--out DIR] [--force] [--quiet]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IMAGES_DIR = REPO / ".cluster" / "images"
BUILDAH_DIR = REPO / ".cluster" / "buildah"
STORAGE_DRIVER = os.environ.get("NODEMEM_BUILDAH_DRIVER", "overlay")
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "charts" / "nodemem"
PAUSE_SOURCE = HERE / "pause" / "pause.c"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
PAUSE_CFLAGS = (
    "-static", "-Os", "-s", "-std=c11", "-D_POSIX_C_SOURCE=200809L",
    "-Wall", "-Wextra", "-Werror", '-DVERSION="3.10"',
)  # fmt: skip
PAUSE_CONFIG = ("--entrypoint", '["/pause"]', "--user=65535:65535")  # as upstream's image
# The NRI plugin (hack/node/nri), built by hack/node/build.py: the agent's sidecar. Root:
# the runtime's NRI socket is root's.
NRI_IMAGE = "docker.io/library/nodemem-nri:0.1.0"
NRI_BINARY = REPO / ".cluster" / "bin" / "nodemem-nri"
NRI_CONFIG = ("--entrypoint", '["/nodemem-nri"]', "--user=0:0")
# The host's CA bundle is bind-mounted over the image's during the Dockerfile's RUN steps
# (never into a layer): `pip wheel` reaches PyPI through whatever TLS the host trusts.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_PACKAGES = ("buildah", "mmdebstrap", "runc", "gcc", "libc6-dev", "util-linux")
# Bump to rebuild everything when the way images are made changes.
RECIPE_VERSION = 1

# The base: what a `FROM python:3.11-slim-bookworm` needs from it here (`pip wheel`,
# `pip install`, `useradd`), from Debian bookworm's own packages.
BASE_SUITE = "bookworm"
BASE_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
BASE_VARIANT = "minbase"  # what debian:bookworm-slim is: Essential, Priority required, apt
# python3-venv is not needed: the Dockerfile makes no venv (pip's build isolation does not
# use the venv module). python-is-python3: `python` on PATH, as in the official image.
BASE_PACKAGES = (
    "ca-certificates", "netbase", "tzdata", "python3", "python3-pip", "python-is-python3",
)  # fmt: skip
BASE_DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/locale/*",
)
BASE_APT_OPTIONS = ('Acquire::Languages "none"',)
# Runs on the finished tree ($1). Debian marks its Python EXTERNALLY-MANAGED (PEP 668):
# the official image's Python is not, so the marker goes and plain `pip install` works.
BASE_CUSTOMIZE = (
    'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
    'find "$1"/usr/lib/python3* "$1"/usr/share/python3 -depth -type d -name __pycache__'
    " -exec rm -rf {} +",
    'find "$1"/var/log -type f -delete',
    'rm -f "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old',
)
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
BASE_CMD = '["python3"]'
BASE_DESCRIPTION = (
    "Stand-in for python:3.11-slim-bookworm made by hack/node/images.py from Debian"
    " bookworm's python3 and python3-pip (mmdebstrap, minbase)"
)


class ImageBuildError(RuntimeError):
    """A build step failed; the message carries the tail of its output."""


@dataclass(frozen=True)
class Image:
    """One image: its full name, what its build depends on, and how to build it."""

    name: str
    key: str
    build: Callable[[bool], None]
    smoke: Callable[[bool], None]
    archive: str | None = None  # file name in out_dir; None: kept in storage only
    base: Image | None = None  # built (into storage) first


def build_images(
    out_dir: Path = IMAGES_DIR, *, force: bool = False, quiet: bool = False
) -> dict[str, Path]:
    """Build what is stale and return each importable image's name and OCI archive.

    The names are full references (``docker.io/library/nodemem:0.1.0``,
    ``registry.k8s.io/pause:3.10``), the ones the kubelet asks containerd for.
    """
    _check_host()
    out_dir.mkdir(parents=True, exist_ok=True)
    archives: dict[str, Path] = {}
    with _locked():
        # What an interrupted run left (its mounts died with its private namespace).
        for leftover in _tmpdir().iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        base = _base_image()
        for image in (_project_image(base), _pause_image(), _nri_image()):
            assert image.archive is not None
            archive = out_dir / image.archive
            stamp = archive.with_name(archive.name + ".key")
            if not force and archive.is_file() and _read(stamp) == image.key:
                _log(quiet, f"{image.name}: current ({archive.name})")
            else:
                stamp.unlink(missing_ok=True)
                if image.base is not None:
                    _ensure_stored(image.base, force=force, quiet=quiet)
                _ensure_stored(image, force=force, quiet=quiet)
                started = time.monotonic()
                _export(image.name, archive, quiet=quiet)
                stamp.write_text(image.key + "\n")
                size = archive.stat().st_size / 1e6
                _log(
                    quiet,
                    f"{image.name}: exported in {time.monotonic() - started:.1f}s"
                    f" to {archive} ({size:.1f} MB)",
                )
            archives[image.name] = archive
    return archives


# --- the three images -------------------------------------------------------------------


def _base_image() -> Image:
    name = _dockerfile_base()
    recipe = {
        "recipe": RECIPE_VERSION,
        "name": name,
        "suite": BASE_SUITE,
        "sources": BASE_SOURCES,
        "variant": BASE_VARIANT,
        "packages": BASE_PACKAGES,
        "dpkg": BASE_DPKG_OPTIONS,
        "apt": BASE_APT_OPTIONS,
        "customize": BASE_CUSTOMIZE,
        "env": BASE_ENV,
        "cmd": BASE_CMD,
        "description": BASE_DESCRIPTION,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()

    def build(quiet: bool) -> None:
        tmp = _tmpdir()
        with tempfile.TemporaryDirectory(dir=tmp, prefix="base-") as scratch:
            rootfs = Path(scratch) / "rootfs.tar"
            command = [
                "mmdebstrap",
                "--mode=root",
                f"--variant={BASE_VARIANT}",
                "--format=tar",
                # No bind mounts of the host's /dev (shm, pts) into the chroot: root mode
                # makes the device nodes it needs with mknod. No /dev in the tarball: the
                # container runtime provides one.
                "--skip=chroot/mount/dev",
                "--skip=output/dev",
                # usr-is-merged instead of usrmerge, which would pull in perl (~50 MB).
                "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                "--include=" + ",".join(BASE_PACKAGES),
                *(f"--dpkgopt={option}" for option in BASE_DPKG_OPTIONS),
                *(f"--aptopt={option}" for option in BASE_APT_OPTIONS),
                "--customize-hook=" + "; ".join(BASE_CUSTOMIZE),
                BASE_SUITE,
                str(rootfs),
                *BASE_SOURCES,
            ]
            # A private mount namespace: the chroot's /proc and /sys mounts never show
            # outside, even when mmdebstrap dies half-way.
            _run(["unshare", "--mount", "--propagation", "private", "--", *command], quiet=quiet)
            container = _buildah("from", "--pull=never", "scratch", capture=True).strip()
            try:
                _buildah("add", "--quiet", container, str(rootfs), "/", quiet=quiet)
                config = [f"--env={env}" for env in BASE_ENV]
                config += ["--cmd", BASE_CMD, "--os=linux", f"--arch={_arch()}"]
                config += [f"--label=org.opencontainers.image.description={BASE_DESCRIPTION}"]
                _buildah("config", *config, container, quiet=quiet)
                _buildah("commit", "--quiet", "--rm", container, name, quiet=quiet)
            except BaseException:
                _buildah("rm", container, check=False, quiet=True)
                raise

    def smoke(quiet: bool) -> None:
        check = (
            "set -e; pip --version; python --version; command -v useradd;"
            " if ls /usr/lib/python3*/EXTERNALLY-MANAGED 2>/dev/null; then exit 1; fi"
        )
        _smoke(name, ["sh", "-c", check], expect="pip ", quiet=quiet)

    return Image(name=name, key=key, build=build, smoke=smoke)


def _project_image(base: Image) -> Image:
    name = _chart_image()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    build_args = {"VERSION": version}
    digest = hashlib.sha256()
    for part in (f"recipe {RECIPE_VERSION}", name, base.key, json.dumps(build_args)):
        digest.update(part.encode() + b"\0")
    ignore = [REPO / ".dockerignore"] if (REPO / ".dockerignore").is_file() else []
    for path in (DOCKERFILE, *ignore, *_build_context(REPO)):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())

    def build(quiet: bool) -> None:
        command = [
            "bud",
            "--pull=never",
            "--network=host",
            "--layers=false",
            "--force-rm",
            "--isolation=oci",
            f"--runtime-flag=root={BUILDAH_DIR / 'runc'}",
            *(f"--build-arg={k}={v}" for k, v in build_args.items()),
            f"--file={DOCKERFILE}",
            f"--tag={name}",
        ]
        if HOST_CA_BUNDLE.is_file():
            command.append(f"--volume={HOST_CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro")
        _buildah(*command, str(REPO), quiet=quiet)

    def smoke(quiet: bool) -> None:
        _smoke(name, ["nodemem", "--help"], expect="usage: nodemem", quiet=quiet)

    return Image(
        name=name,
        key=digest.hexdigest(),
        build=build,
        smoke=smoke,
        archive=_archive_name(name),
        base=base,
    )


def _scratch_image(
    name: str, binary: Path, destination: str, config: Sequence[str], *, quiet: bool
) -> None:
    """Commit `name`: one static `binary` at `destination` in an empty image."""
    container = _buildah("from", "--pull=never", "scratch", capture=True).strip()
    try:
        _buildah(
            "copy", "--quiet", "--chmod=0755", container, str(binary), destination, quiet=quiet
        )
        _buildah("config", *config, "--os=linux", f"--arch={_arch()}", container, quiet=quiet)
        _buildah("commit", "--quiet", "--rm", container, name, quiet=quiet)
    except BaseException:
        _buildah("rm", container, check=False, quiet=True)
        raise


def _nri_image() -> Image:
    if not NRI_BINARY.is_file():
        raise ImageBuildError(f"{NRI_BINARY} is missing: hack/node/build.py builds it")
    digest = hashlib.sha256()
    for part in (f"recipe {RECIPE_VERSION}", NRI_IMAGE, *NRI_CONFIG):
        digest.update(part.encode() + b"\0")
    digest.update(NRI_BINARY.read_bytes())

    def build(quiet: bool) -> None:
        _scratch_image(NRI_IMAGE, NRI_BINARY, "/nodemem-nri", NRI_CONFIG, quiet=quiet)

    def smoke(quiet: bool) -> None:
        _smoke(NRI_IMAGE, ["/nodemem-nri", "-h"], expect="-rules", quiet=quiet)

    return Image(
        name=NRI_IMAGE,
        key=digest.hexdigest(),
        build=build,
        smoke=smoke,
        archive=_archive_name(NRI_IMAGE),
    )


def _pause_image() -> Image:
    gcc = subprocess.run(
        ["gcc", "-dumpfullversion"], check=False, capture_output=True, text=True
    ).stdout
    digest = hashlib.sha256()
    for part in (
        f"recipe {RECIPE_VERSION}",
        PAUSE_IMAGE,
        gcc.strip(),
        *PAUSE_CFLAGS,
        *PAUSE_CONFIG,
    ):
        digest.update(part.encode() + b"\0")
    digest.update(PAUSE_SOURCE.read_bytes())

    def build(quiet: bool) -> None:
        with tempfile.TemporaryDirectory(dir=_tmpdir(), prefix="pause-") as scratch:
            binary = Path(scratch) / "pause"
            _run(["gcc", *PAUSE_CFLAGS, "-o", str(binary), str(PAUSE_SOURCE)], quiet=quiet)
            _scratch_image(PAUSE_IMAGE, binary, "/pause", PAUSE_CONFIG, quiet=quiet)

    def smoke(quiet: bool) -> None:
        _smoke(PAUSE_IMAGE, ["/pause", "-v"], expect="pause.c 3.10", quiet=quiet)

    return Image(
        name=PAUSE_IMAGE,
        key=digest.hexdigest(),
        build=build,
        smoke=smoke,
        archive=_archive_name(PAUSE_IMAGE),
    )


# --- storage, export --------------------------------------------------------------------


def _ensure_stored(image: Image, *, force: bool, quiet: bool) -> None:
    """Build ``image`` into buildah's storage unless its stamp says the stored one is
    current: same key, and the image the stamp names still there under that name."""
    stamp = BUILDAH_DIR / "keys" / (re.sub(r"[^\w.-]+", "_", image.name) + ".json")
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        recorded = {}
    if (
        not force
        and recorded.get("key") == image.key
        and recorded.get("id") == _image_id(image.name)
    ):
        return
    stamp.unlink(missing_ok=True)
    _buildah("rm", "--all", check=False, quiet=True)  # leftovers of an interrupted build
    started = time.monotonic()
    image.build(quiet)
    image_id = _image_id(image.name)
    if image_id is None:
        raise ImageBuildError(f"{image.name}: built, yet not in buildah's storage")
    image.smoke(quiet)
    _buildah("rmi", "--prune", check=False, quiet=True, capture=True)  # the replaced ones
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"key": image.key, "id": image_id}) + "\n")
    size = _buildah("images", "--format={{.Size}}", image.name, capture=True, check=False)
    _log(quiet, f"{image.name}: built in {time.monotonic() - started:.1f}s ({size.strip()})")


def _smoke(name: str, command: Sequence[str], *, expect: str, quiet: bool) -> None:
    """Run ``command`` in a container of ``name`` (no network); its output must show
    ``expect``."""
    container = _buildah("from", "--pull=never", name, capture=True).strip()
    try:
        output = _buildah(
            "run",
            "--network=none",
            f"--runtime-flag=root={BUILDAH_DIR / 'runc'}",
            container,
            "--",
            *command,
            capture=True,
        )
    finally:
        _buildah("rm", container, check=False, quiet=True, capture=True)
    if expect not in output:
        raise ImageBuildError(f"{name}: `{' '.join(command)}` printed:\n{output}")
    _log(quiet, f"{name}: smoke test passed: {output.splitlines()[0]}")


def _export(name: str, archive: Path, *, quiet: bool) -> None:
    """Write ``name`` as an OCI archive whose one manifest carries ``name`` as its
    ``org.opencontainers.image.ref.name``: `ctr images import` (containerd 1.x locally,
    2.x through the transfer service) keeps a full reference there as the image name."""
    partial = archive.with_name(archive.name + ".partial")
    partial.unlink(missing_ok=True)
    _buildah("push", "--quiet", "--format=oci", name, f"oci-archive:{partial}:{name}", quiet=quiet)
    with tarfile.open(partial) as tar:
        member = tar.extractfile("index.json")
        index = json.loads(member.read()) if member else {}
    refs = [
        m.get("annotations", {}).get("org.opencontainers.image.ref.name")
        for m in index.get("manifests", [])
    ]
    if refs != [name]:
        raise ImageBuildError(f"{partial}: index.json names {refs}, not [{name!r}]")
    partial.replace(archive)


def _image_id(name: str) -> str | None:
    output = _buildah(
        "inspect", "--type=image", "--format={{.FromImageID}}", name, capture=True, check=False
    ).strip()
    return output if re.fullmatch(r"[0-9a-f]{64}", output) else None


def _buildah(*args: str, capture: bool = False, check: bool = True, quiet: bool = False) -> str:
    """buildah on our own storage, in a private mount namespace whose /var/lib is an
    overlay (writes land in .cluster/buildah/varlib) and whose /var/lib/containers is
    .cluster/buildah/containers: buildah 1.28 keeps its blob-info cache there."""
    varlib, state = BUILDAH_DIR / "varlib", BUILDAH_DIR / "containers"
    for directory in (varlib / "upper", varlib / "work", state):
        directory.mkdir(parents=True, exist_ok=True)
    script = (
        'set -e; mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$1/upper,'
        'workdir=$1/work" /var/lib; mkdir -p /var/lib/containers;'
        ' mount --bind "$2" /var/lib/containers; shift 2; exec "$@"'
    )
    storage = [
        f"--root={BUILDAH_DIR / 'storage'}",
        f"--runroot={BUILDAH_DIR / 'run'}",
        f"--storage-driver={STORAGE_DRIVER}",
    ]
    command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]
    command += ["sh", str(varlib), str(state), "buildah", *storage, *args]
    return _run(command, capture=capture, check=check, quiet=quiet)


def _run(
    command: Sequence[str], *, capture: bool = False, check: bool = True, quiet: bool = False
) -> str:
    """Run ``command``; its output goes to our stderr unless ``quiet`` or ``capture``
    (then it is returned, and shown when the command fails)."""
    env = {**os.environ, "TMPDIR": str(_tmpdir())}
    if capture or quiet:
        result = subprocess.run(
            command,
            check=False,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output = result.stdout
    else:
        result = subprocess.run(command, check=False, env=env, stdout=sys.stderr, text=True)
        output = ""
    if check and result.returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        shown = " ".join(command[command.index("buildah") :] if "buildah" in command else command)
        raise ImageBuildError(f"`{shown}` exited with {result.returncode}\n{tail}".rstrip())
    return output


# --- names, build context ---------------------------------------------------------------


def normalize(reference: str) -> str:
    """The full reference docker and the kubelet's CRI use for ``reference``:
    ``nodemem:0.1.0`` is ``docker.io/library/nodemem:0.1.0``."""
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    tagged = ":" in name[slash + 1 :]
    first, _, rest = name.partition("/")
    if not rest:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    if digest:
        return f"{name}@{digest}"
    return name if tagged else f"{name}:latest"


def _dockerfile_base() -> str:
    """The Dockerfile's ``ARG PYTHON_IMAGE`` default: the base this script stands in for,
    which must be a bookworm Python 3.11 (Debian bookworm's python3)."""
    found = re.search(r"^ARG\s+PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    if found is None:
        raise ImageBuildError(f"{DOCKERFILE}: no `ARG PYTHON_IMAGE=...`")
    name = normalize(found.group(1))
    repository, _, tag = name.rpartition(":")
    if (
        repository != "docker.io/library/python"
        or not tag.startswith("3.11")
        or ("bookworm" not in tag)
    ):
        raise ImageBuildError(f"{DOCKERFILE}: base {name}: only a bookworm Python 3.11 is made")
    return name


def _chart_image() -> str:
    """The image the chart deploys by default: values.yaml's ``image.repository`` and
    ``image.tag``, the tag defaulting to Chart.yaml's ``appVersion``."""
    values = (CHART / "values.yaml").read_text()
    block = re.search(r"^image:[ \t]*\n((?:[ \t]+.*\n|[ \t]*\n)*)", values, re.MULTILINE)
    fields = dict(
        re.findall(
            r"^[ \t]+(repository|tag):[ \t]*\"?([^\"#\s]*)\"?",
            block.group(1) if block else "",
            re.MULTILINE,
        )
    )
    found = re.search(
        r"^appVersion:\s*\"?([^\"#\s]+)", (CHART / "Chart.yaml").read_text(), re.MULTILINE
    )
    if not fields.get("repository") or found is None:
        raise ImageBuildError(f"{CHART}: no image.repository in values.yaml or no appVersion")
    return normalize(f"{fields['repository']}:{fields.get('tag') or found.group(1)}")


def _archive_name(name: str) -> str:
    repository, _, tag = name.rpartition(":")
    return f"{repository.rsplit('/', 1)[-1]}_{tag}.oci.tar"


def _build_context(root: Path) -> list[Path]:
    """The files of ``root`` that its .dockerignore lets into the build context (the
    Docker rules: last matching pattern wins, ``!`` re-includes, a pattern matching a
    directory matches all below it, ``**`` any number of directories)."""
    rules: list[tuple[bool, re.Pattern[str], str]] = []
    ignore = root / ".dockerignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern), pattern))

    def excluded(relative: str) -> bool:
        result = False
        for negated, regex, _ in rules:
            if regex.match(relative):
                result = not negated
        return result

    def may_reinclude(directory: str) -> bool:
        return any(
            negated and (p.startswith(directory + "/") or p.startswith("*"))
            for negated, _, p in rules
        )

    files: list[Path] = []
    for current, dirs, names in os.walk(root):
        here = Path(current)
        base = here.relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        dirs[:] = sorted(
            d
            for d in dirs
            if not (excluded(prefix + d) and not may_reinclude(prefix + d))
            and not (here / d).is_symlink()
        )
        files += [here / n for n in sorted(names) if not excluded(prefix + n)]
    return files


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + "(?:/.*)?$")


# --- host -------------------------------------------------------------------------------


def _check_host() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building images needs root (buildah, mmdebstrap --mode=root)")
    missing = [
        tool
        for tool in ("buildah", "mmdebstrap", "runc", "gcc", "unshare")
        if shutil.which(tool) is None
    ]
    if missing:
        raise ImageBuildError(
            f"missing {', '.join(missing)}: apt-get install {' '.join(DEBIAN_PACKAGES)}"
        )


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One build at a time on this storage (and on the /var/lib overlay's upper dir)."""
    BUILDAH_DIR.mkdir(parents=True, exist_ok=True)
    with (BUILDAH_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _tmpdir() -> Path:
    tmp = BUILDAH_DIR / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def _arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"images: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build what is stale, write the archives")
    build.add_argument("--out", type=Path, default=IMAGES_DIR, help="archive directory")
    build.add_argument("--force", action="store_true", help="rebuild everything")
    build.add_argument("--quiet", action="store_true", help="no build output")
    args = parser.parse_args(argv)
    try:
        archives = build_images(args.out, force=args.force, quiet=args.quiet)
    except ImageBuildError as error:
        print(f"images: {error}", file=sys.stderr)
        return 1
    for name, archive in archives.items():
        print(f"{name}\t{archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
