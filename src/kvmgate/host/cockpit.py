"""kvmgate's Cockpit page (`cockpit/kvmgate/`): its third-party code and the
host's Cockpit. Root-only (`admin init --cockpit`, install.sh); nothing here is
on any user's path: the page itself only runs `kvmgate ... --json` as the
logged-in user, through Cockpit's bridge.

Vendored, never built:
- noVNC from Debian's `novnc` package (ES modules, served as they are);
- xterm.js from npm's `@xterm/xterm`, a pinned release checked by SHA-256
  (Debian's `node-xterm` has no browser build).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import urllib.request

from kvmgate.errors import KvmgateError

NOVNC = "/usr/share/novnc"
XTERM_URL = "https://registry.npmjs.org/@xterm/xterm/-/xterm-5.5.0.tgz"
XTERM_SHA256 = "bd954fa721872170188cc5d7e83e88db3c83c9a18a4e8d24c2783d26491f59d2"
XTERM_MAX = 8 << 20
CACHE = "/var/cache/kvmgate-web"
PACKAGES = ("cockpit-ws", "cockpit-bridge", "novnc")


def _pinned(data: bytes) -> bool:
    return len(data) <= XTERM_MAX and hashlib.sha256(data).hexdigest() == XTERM_SHA256


def _xterm_tarball(fetch: bool) -> bytes | None:
    cached = os.path.join(CACHE, os.path.basename(XTERM_URL))
    if os.path.exists(cached):
        with open(cached, "rb") as f:
            data = f.read(XTERM_MAX + 1)
        if _pinned(data):
            return data
        os.unlink(cached)  # not the pinned release: fetched again below, or left out
    if not fetch:
        return None
    with urllib.request.urlopen(XTERM_URL, timeout=60) as r:
        data = bytes(r.read(XTERM_MAX + 1))
    if not _pinned(data):
        raise KvmgateError(f"{XTERM_URL} is not the pinned release (its SHA-256 differs): nothing was installed")
    if not os.path.isdir(CACHE):
        os.makedirs(CACHE, 0o755, exist_ok=True)
        os.chmod(CACHE, 0o755)  # the helper's umask is 077
    with open(cached + ".tmp", "wb") as f:
        f.write(data)
    os.chmod(cached + ".tmp", 0o644)
    os.replace(cached + ".tmp", cached)
    return data


def vendor(page: str, fetch: bool = False) -> list[str]:
    """Copy noVNC and xterm.js into the installed page (what is missing is said;
    the page says it too, in one line, where the console or the screen would be)."""
    old = os.umask(0o022)
    try:
        return _vendor(page, fetch)
    finally:
        os.umask(old)


def _vendor(page: str, fetch: bool) -> list[str]:
    said = []
    out = os.path.join(page, "vendor")
    if os.path.isdir(os.path.join(NOVNC, "core")):
        dest = os.path.join(out, "novnc")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(os.path.join(NOVNC, "core"), os.path.join(dest, "core"))
        shutil.copytree(os.path.join(NOVNC, "vendor", "pako"), os.path.join(dest, "vendor", "pako"))
        said.append(f"the screen: noVNC from {NOVNC}")
    else:
        said.append("no screen in the page: Debian's novnc is not installed (kvmgate admin init --cockpit)")
    data = _xterm_tarball(fetch)
    if data is not None:
        dest = os.path.join(out, "xterm")
        os.makedirs(dest, 0o755, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member, name in (("package/lib/xterm.js", "xterm.js"), ("package/css/xterm.css", "xterm.css")):
                src = tar.extractfile(member)
                if src is None:
                    raise KvmgateError(f"{XTERM_URL}: no {member}")
                with open(os.path.join(dest, name), "wb") as f:
                    f.write(src.read())
        said.append("the console: xterm.js 5.5.0 (npm @xterm/xterm, SHA-256 checked)")
    else:
        said.append("no console in the page yet: xterm.js is fetched by kvmgate admin init --cockpit")
    for dirpath, _dirs, filenames in os.walk(out):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return said


def install_packages() -> str:
    missing = [p for p in PACKAGES if not _installed(p)]
    if not missing:
        return "cockpit-ws, cockpit-bridge and novnc are installed"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
    old = os.umask(0o022)  # packages' files must be readable by everyone, not the helper's 077
    try:
        r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                           capture_output=True, text=True, env=env, timeout=1800)  # fmt: skip
    finally:
        os.umask(old)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise KvmgateError(f"apt-get install {' '.join(missing)} failed: {tail[0][:300]}")
    return "installed " + ", ".join(missing)


def _installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return r.returncode == 0 and "ok installed" in r.stdout


def enable_socket() -> str:
    if not os.path.isdir("/run/systemd/system"):
        return ("systemd is not running here: start Cockpit by hand, e.g. "
                "/usr/lib/cockpit/cockpit-ws --no-tls --address 127.0.0.1 (docs/cockpit.md)")  # fmt: skip
    subprocess.run(["systemctl", "enable", "--now", "cockpit.socket"], check=True, capture_output=True, timeout=120)
    return "enabled cockpit.socket"
