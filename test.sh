#!/bin/sh
# Install everything the test suite needs (Debian packages, a venv with the Python
# test dependencies, the test guest), then run lint, types and the whole suite.
#
#   sudo ./test.sh [--all] [pytest arguments]
#
# The default tier leaves out tests marked `slow` (docs: decisions on test tiers);
# --all runs them too. Without pytest arguments, the suite runs against the system's
# QEMU (7.2 on Debian 12), then the conformance, hibernate and security tests run
# again against Debian 13's QEMU 10.0, fetched beside it (scripts/fetch-qemu10.sh).
set -eu
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the suite creates users, taps and cgroups)" >&2; exit 3; }
sh scripts/debian-deps.sh test
sh guest/build-test-guest.sh >/dev/null
sh guest/build-debian-guest.sh >/dev/null  # the real Debian guest (cached by its recipe; about a minute cold)
sh guest/build-shares-guest.sh >/dev/null  # the same with NFS and Samba (docs/services.md; cached, about a minute cold)
sh scripts/fetch-qemu10.sh >/dev/null  # the second QEMU (cached by its recipe; seconds)
venv=.venv
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e '.[test]'
"$venv/bin/ruff" check src tests bench
"$venv/bin/mypy" --no-error-summary
tier="not slow"
if [ "${1:-}" = "--all" ]; then tier=""; shift; fi
if [ $# -gt 0 ]; then
    exec "$venv/bin/pytest" -q ${tier:+-m "$tier"} "$@"
fi
status=0
"$venv/bin/pytest" -q ${tier:+-m "$tier"} || status=$?
echo "test.sh: again against QEMU 10.0: the conformance, hibernate and security tests"
KVMGATE_TEST_QEMU=10.0 "$venv/bin/pytest" -q ${tier:+-m "$tier"} \
    tests/integration/test_conformance.py tests/integration/test_hibernate.py tests/security || status=$?
exit "$status"
