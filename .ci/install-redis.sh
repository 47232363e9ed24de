#!/usr/bin/env bash
# Installs what the Redis tests (tests/redis.rs, tests/redis_cluster.rs)
# need when it is missing: redis-server, which the tests start themselves on
# free ports (they never use a shared server), and redis-cli, which makes
# their private Redis Cluster (`--cluster create`). The cluster tests need
# Redis 7 or newer (sharded pub/sub). Idempotent; runs as root.
set -euo pipefail

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "install-redis: installing redis-server and redis-cli (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends redis-server redis-tools
    # The tests start their own servers; the packaged service is not needed.
    if command -v service >/dev/null 2>&1; then service redis-server stop >/dev/null 2>&1 || true; fi
fi

echo "install-redis: ready ($(redis-server --version); $(redis-cli --version))"
