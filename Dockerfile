# One image for coap-server, coap-proxy, coap-client and coap-keys (see docs/DEPLOY.md).
#
# The base image is a build argument: users get the official Python slim image; machines
# without a registry pass a locally made one (BASE=localhost/debian-base:bookworm, which
# scripts/compose makes with debootstrap). Any Debian-based image with python3 (>= 3.11) and
# its venv module works.
ARG BASE=python:3.11-slim

# ---- build stage: compilers, DTLSSocket's from-source build, a finished venv -------------
FROM ${BASE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# DTLSSocket (tinydtls) has no wheels: its sdist runs autoreconf (its configure.ac needs
# pkg-config's macros) and compiles C. The Python headers come with python:*-slim; a Debian
# python3 needs python3-dev for them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends autoconf automake libtool pkg-config make gcc libc6-dev \
 && { python3 -c 'import os, sys, sysconfig; \
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
      || apt-get install -y --no-install-recommends python3-dev; } \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/coaplayers
ENV PATH=/opt/coaplayers/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone: this (slow) layer stays cached while only
# the project's source changes.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; \
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY coaplayers ./coaplayers
COPY client ./client
COPY server ./server
COPY programs ./programs
COPY tools ./tools
RUN pip install --no-deps . && rm -rf build

# ---- runtime stage: the base image plus the venv, no compilers -------------------------
FROM ${BASE}
COPY --from=build /opt/coaplayers /opt/coaplayers
# XDG_STATE_HOME: what coap-client keeps between runs (OSCORE contexts, Layer 0 sessions)
# goes to the container's own /tmp, since the unprivileged user below has no home.
ENV PATH=/opt/coaplayers/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_STATE_HOME=/tmp/state
# An unprivileged user owns /keys, where compose.yaml mounts the credential volume (a new
# named volume takes this folder's owner). CoAP's ports are above 1024: no root needed.
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent coap \
 && mkdir /keys && chown coap:coap /keys \
 && coap-server --help >/dev/null && coap-proxy --help >/dev/null \
 && coap-client --help >/dev/null && coap-keys --help >/dev/null
USER coap
WORKDIR /keys
EXPOSE 5683/udp 5684/udp 5694/udp
CMD ["coap-server", "--listen", "coap://[::]:5683"]
