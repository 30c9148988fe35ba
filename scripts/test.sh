#!/usr/bin/env bash
# The test command: installs what the tests need and is missing (redis-server, from
# Debian's packages, for the L2 cache scenarios), raises the open-files limit for the
# 10,000-connection scenario, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian package) for the L2 cache tests"
    sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
    # The tests start their own instances on free ports; the packaged service is not needed.
    ($sudo service redis-server stop || $sudo systemctl stop redis-server) >/dev/null 2>&1 || true
fi

# The 10,000-connection scenario needs ~14k descriptors in the test process; the proxies
# raise their own limit. Raise the soft limit as far as this machine allows.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
echo "open files limit: $(ulimit -n); io_uring: $( [ -e /proc/sys/kernel/io_uring_disabled ] && cat /proc/sys/kernel/io_uring_disabled || echo n/a) (0 = enabled; trireme-monoio falls back to epoll otherwise); $(redis-server --version | cut -d' ' -f1-3)"
exec cargo test --workspace "$@"
