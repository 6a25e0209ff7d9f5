#!/bin/sh
# Build the Debian 12 guest with kvmgate's NFS and Samba share server (guest/kvmgate-shares) and the
# NFS and SMB clients, from the host's apt mirror (guest/build-debian-guest.sh does the work).
# Cached outside the repository, keyed by both scripts and the agent.
#
# usage: guest/build-shares-guest.sh [CACHE_DIR]    (default /var/cache/kvmgate-shares-guest)
# prints the cache directory (holding debian.qcow2 and recipe) on success.
set -eu
KVMGATE_GUEST_FLAVOR=shares exec sh "$(dirname "$0")/build-debian-guest.sh" "$@"
