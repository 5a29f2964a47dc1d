# syntax=docker/dockerfile:1
# One image for both entry points: `nodemem agent` (the DaemonSet) and `nodemem controller`
# (the Deployment); the pods choose with `args`. Build from the repository root:
#
#   docker build -t nodemem:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#     --build-arg SOURCE=https://example.org/your/nodemem-repository .
#
# The default user is an unprivileged one (65532). The agent's pod spec runs it as root
# with an explicit capability list (charts/nodemem/templates/agent-daemonset.yaml).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: build the nodemem wheel and collect the wheels of its dependencies. Every
# dependency ships binary wheels for amd64 and arm64, so no compiler is needed here either.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ ./operator/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Stage 2: the runtime. Wheels are installed from a bind mount of stage 1 (they never land
# in a layer), offline (--no-index): no compiler, no build backend, no source tree.
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="nodemem" \
      org.opencontainers.image.description="Kubernetes operator for node memory and OOM policy: tmpfs limits, tmpfs cleanup, oom_score_adj, Shmem attribution" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels /wheels/nodemem-*.whl \
    && useradd --system --uid 65532 --user-group --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin nodemem

USER 65532:65532
ENTRYPOINT ["nodemem"]
CMD ["--help"]
