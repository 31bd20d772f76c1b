#!/usr/bin/env bash
# Puts promtool on PATH for tests/test_alert_rules.py (`promtool test rules`): Debian's
# `prometheus` package ships it. Needs root (or password-less sudo) and apt-get; the server the
# package may start is stopped and disabled again -- only the tool is wanted.
set -euo pipefail
command -v promtool >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "promtool is missing: install Debian's prometheus package (apt-get install -y --no-install-recommends prometheus) or put promtool on PATH" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool is missing and apt-get is not available: put promtool (from a Prometheus release) on PATH" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get install -y --no-install-recommends prometheus >/dev/null \
  || { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y --no-install-recommends prometheus >/dev/null; }
# The package's service: stop it where an init system started it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  "${SUDO[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
  "${SUDO[@]}" /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null 2>&1 || { echo "promtool is still not on PATH after installing prometheus" >&2; exit 1; }
