#!/bin/sh
# Install everything the test suite needs (Debian packages, a venv with the Python
# test dependencies, the test guest), then run lint, types and the whole suite.
#
#   sudo ./test.sh [--all] [pytest arguments]
#
# The default tier leaves out tests marked `slow` (docs: decisions on test tiers);
# --all runs them too.
set -eu
cd "$(dirname "$0")"
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root (the suite creates users, taps and cgroups)" >&2; exit 3; }
sh scripts/debian-deps.sh test
sh guest/build-test-guest.sh >/dev/null
sh guest/build-debian-guest.sh >/dev/null  # the real Debian guest (cached by its recipe; about a minute cold)
venv=.venv
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e '.[test]'
"$venv/bin/ruff" check src tests bench
"$venv/bin/mypy" --no-error-summary
tier="not slow"
if [ "${1:-}" = "--all" ]; then tier=""; shift; fi
exec "$venv/bin/pytest" -q ${tier:+-m "$tier"} "$@"
