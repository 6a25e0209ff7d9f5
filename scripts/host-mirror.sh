#!/bin/sh
# Print the host's own Debian mirror (the URI of its first enabled deb source for this release),
# read from either sources format (one-line or deb822), so that what kvmgate's set-up fetches comes
# from where the host already fetches. With "security", print the security archive's URI instead
# (nothing when there is none). KVMGATE_DEBIAN_MIRROR=URL overrides the main mirror.
#
# usage: scripts/host-mirror.sh [security]
set -eu
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
sources() {  # prints "URI SUITE" for every enabled deb source of the host
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] && sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" { print $2, $3 }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && awk 'BEGIN { RS = ""; FS = "\n" } {
            types = ""; uris = ""; suites = ""; enabled = "yes"
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^#/) continue
                split($i, kv, ":"); key = tolower(kv[1]); val = substr($i, length(kv[1]) + 2)
                if (key == "types") types = val; else if (key == "uris") uris = val
                else if (key == "suites") suites = val; else if (key == "enabled") enabled = val
            }
            if (types !~ /(^|[ \t])deb([ \t]|$)/ || enabled ~ /no/) next
            nu = split(uris, u, /[ \t]+/); ns = split(suites, s, /[ \t]+/)
            for (a = 1; a <= nu; a++) for (b = 1; b <= ns; b++) if (u[a] != "" && s[b] != "") print u[a], s[b]
        }' "$f"
    done
    return 0
}
if [ "${1:-}" = security ]; then
    sources | awk -v c="$codename" '$2 == c "-security" || $2 == c "/updates" { print $1; exit }'
    exit 0
fi
mirror=${KVMGATE_DEBIAN_MIRROR:-$(sources | awk -v c="$codename" '$2 == c { print $1; exit }')}
echo "${mirror:-http://deb.debian.org/debian}"
