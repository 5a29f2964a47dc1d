"""Benchmark: two parsing choices that code comments justify by speed, against the other way.

- /proc/PID/status fields (host/procfs.py): the field regex anchored on "\\n" (the text
  gets one in front) against the same regex anchored with ^ and re.MULTILINE, over the
  status text of every process on this host, read once.
- YAML manifests (api/manifest.py): PyYAML's libyaml loader (CSafeLoader) against the
  pure-Python SafeLoader, on a generated manifest of NodeMemoryPolicies near 1 MiB.

No root needed: `python bench/parsers.py`. Prints each time (best of --repeat) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable

import yaml

from nodemem.host import procfs

FIELDS = "Name|PPid|Uid|Kthread|VmSize|VmRSS|RssShmem|VmSwap|VmPTE"
MULTILINE_FIELD = re.compile(rf"^({FIELDS}):[ \t]*([^\n]*)", re.MULTILINE)


def best_of(repeat: int, *runs: Callable[[], object]) -> list[float]:
    """Best time of each run; the runs alternate, so that a busy moment hurts both alike."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for run, spent in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def status_texts() -> list[str]:
    texts = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as file:
                    texts.append(file.read())
            except OSError:
                continue  # exited meanwhile
    return texts


def manifest(policies: int) -> str:
    documents = []
    for index in range(policies):
        documents.append(
            f"""apiVersion: nodemem.dev/v1alpha1
kind: NodeMemoryPolicy
metadata:
  name: policy-{index}
spec:
  priority: {index}
  nodeSelector:
    matchLabels: {{pool: pool-{index % 7}}}
  tmpfs:
  - {{path: /run/user/*, size: 10%}}
  - {{path: /dev/shm, size: 512Mi, headroom: 64Mi}}
  cleanup:
  - name: logs
    paths: [/run/app/**/*.log]
    schedule: "*/5 * * * *"
    olderThan: 24h
    exclude: ["*.keep"]
  oom:
  - name: batch
    match: {{cmdline: "^/usr/bin/batch-worker", qosClass: BestEffort}}
    oomScoreAdj: 900
"""
        )
    return "---\n".join(documents)


def row(what: str, ours: float, theirs: float, baseline: str) -> None:
    times = f"{ours * 1000:9.2f} ms   {baseline}: {theirs * 1000:9.2f} ms"
    print(f"{what:<40} {times}   ours is {theirs / ours:5.2f}x faster")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--policies", type=int, default=1800, help="documents in the manifest")
    args = parser.parse_args()

    texts = status_texts()
    ours = procfs._STATUS_FIELD
    if dict(ours.findall("\n" + texts[0])) != dict(MULTILINE_FIELD.findall(texts[0])):
        print("the two status regexes disagree", file=sys.stderr)
        return 1
    anchored, multiline = best_of(
        args.repeat * 4,
        lambda: [ours.findall("\n" + text) for text in texts],
        lambda: [MULTILINE_FIELD.findall(text) for text in texts],
    )
    print(f"/proc/PID/status of {len(texts)} processes")
    row('status fields, regex anchored on "\\n"', anchored, multiline, "^ + MULTILINE")

    if not hasattr(yaml, "CSafeLoader"):
        print("PyYAML without libyaml here: nodemem falls back to the pure-Python loader")
        return 0
    text = manifest(args.policies)
    repeat = max(1, args.repeat // 2)  # the pure-Python loader takes seconds
    c_loader, python_loader = best_of(
        repeat,
        lambda: list(yaml.load_all(text, Loader=yaml.CSafeLoader)),
        lambda: list(yaml.load_all(text, Loader=yaml.SafeLoader)),
    )
    print(f"manifest of {args.policies} policies, {len(text) / (1 << 20):.2f} MiB")
    row("YAML, libyaml (CSafeLoader)", c_loader, python_loader, "SafeLoader")
    return 0


if __name__ == "__main__":
    sys.exit(main())
