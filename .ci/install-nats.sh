#!/usr/bin/env bash
# Installs what tests/custom_backplane.rs needs when it is missing:
# nats-server, which the test starts itself on a free port. Idempotent; runs
# as root.
set -euo pipefail

if ! command -v nats-server >/dev/null 2>&1; then
    echo "install-nats: installing nats-server (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends nats-server
    if command -v service >/dev/null 2>&1; then service nats-server stop >/dev/null 2>&1 || true; fi
fi

echo "install-nats: ready (nats-server $(nats-server --version 2>&1 | head -1))"
