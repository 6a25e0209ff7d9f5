"""Shared fixtures: a kvmgate installation of its own, the test guest, real users.

The suite installs kvmgate with install.sh into /opt/kvmgate-test (state, policy
and runtime directories of its own), so it never touches a host's real
installation, and removes every user, process and directory it made, even when
a test fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/opt/kvmgate-test"
ETC = f"{PREFIX}/etc"
STATE = f"{PREFIX}/state"
RUN = "/run/kvmgate-test"
LOG = f"{PREFIX}/log"
KVMGATE = f"{PREFIX}/bin/kvmgate"
HELPER = f"{PREFIX}/lib/kvmgate/kvmgate-helper"
SUDOERS = "/etc/sudoers.d/kvmgate-test"
LOGROTATE = "/etc/logrotate.d/kvmgate-test"  # install.sh names it after the sudoers drop-in
PAUSE_CONTROL = f"{PREFIX}/pause-control"  # the helper's test-only pause points (store/critical.py)
COCKPIT_PAGE = "/usr/local/share/cockpit/kvmgate"  # ahead of /usr/share in Cockpit's search path
INSTALL_ARGS = ["--prefix", PREFIX, "--etc", ETC, "--state", STATE, "--run", RUN, "--log", LOG, "--sudoers", SUDOERS]
UNITDIR = f"{PREFIX}/systemd"  # the suite's units go where no systemd reads them
CRON = "/etc/cron.d/kvmgate-test"  # `admin init --cron` names it after the sudoers drop-in
# The suite's installation only (older releases' install.sh knows neither option):
PAUSE_ARGS = ["--test-pause-points", PAUSE_CONTROL, "--unitdir", UNITDIR, "--systemd", "no", "--cockpit", COCKPIT_PAGE]
GUEST = os.environ.get("KVMGATE_GUEST_DIR", "/var/cache/kvmgate-test-guest")
BOOT_LINE = r"KVMGATE-GUEST-READY[^\r\n]*[\r\n]"
# ssh(1) options for throwaway test hosts: never prompt, never remember a host key.
SSH_THROWAWAY = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]


def run(
    cmd: list[str],
    *,
    input: str | None = None,
    timeout: float = 120,
    check: bool = False,
    env: dict[str, str] | None = None,
    **kw: object,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run with captured text output; stdin is /dev/null unless input is given."""
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        cmd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env=env,
        stdin=None if input is not None else subprocess.DEVNULL,
        **kw,
    )


def as_user(
    user: str, cmd: list[str], *, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run cmd as a real user: their uid, primary gid and groups, a login-like
    environment (or `env`), from their home directory."""
    pw = pwd.getpwnam(user)
    base = {"HOME": pw.pw_dir, "USER": user, "LOGNAME": user, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    groups = os.getgrouplist(user, pw.pw_gid)
    kw.setdefault("cwd", pw.pw_dir if os.path.isdir(pw.pw_dir) else "/")
    return run(cmd, env=base if env is None else env, user=pw.pw_uid, group=pw.pw_gid, extra_groups=groups, **kw)


def popen_as(user: str, cmd: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    """Start cmd as a real user (uid, primary gid, no other groups) from /, with a
    minimal environment; stdout is a pipe, stdin /dev/null."""
    pw = pwd.getpwnam(user)
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        cmd,
        text=True,
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
        env=env or {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "USER": user, "LANG": "C.UTF-8"},
        cwd="/",
        stdin=subprocess.DEVNULL,
        **kw,
    )


@dataclass
class Kvmgate:
    """Runs the installed `kvmgate` as root or as a real user."""

    def __call__(
        self,
        *args: str,
        user: str | None = None,
        input: str | None = None,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        if user is None:
            return run([KVMGATE, *args], input=input, timeout=timeout, env=env)
        return as_user(user, [KVMGATE, *args], input=input, timeout=timeout, env=env)

    def ok(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        r = self(*args, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, f"kvmgate {' '.join(args)} -> {r.returncode}: {r.stderr}{r.stdout}"
        return r

    def json(self, *args: str, **kw: object) -> object:
        return json.loads(self.ok(*args, "--json", **kw).stdout)  # type: ignore[arg-type]

    def write_policy(self, text: str) -> None:
        path = Path(ETC, "policy.toml")
        path.write_text(text)
        path.chmod(0o644)

    def state_snapshot(self) -> list[tuple[object, ...]]:
        """Every path under the state, runtime and log roots with its type, owner,
        group and mode, and what it holds: a sha256 of a regular file under 16 MiB,
        (inode, size, mtime_ns) of a larger one, a symlink's target. Refusals must
        not change it."""
        held = qemu_open_files()
        out: list[tuple[object, ...]] = []
        for root in (STATE, RUN, LOG):
            for dirpath, dirnames, filenames in os.walk(root):
                for n in dirnames + filenames:
                    p = os.path.join(dirpath, n)
                    if p.startswith(f"{LOG}/audit.log"):
                        continue  # every call, refused or not, appends its record (and counts its rate)
                    st = os.lstat(p)
                    out.append((p, st.st_mode, st.st_uid, st.st_gid, _content(p, st, held)))
        return sorted(out)


SNAPSHOT_HASH_MAX = 16 << 20


def _content(path: str, st: os.stat_result, held: set[str]) -> object:
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(path)
    if not stat.S_ISREG(st.st_mode):
        return None  # directories, sockets: type, owner, group and mode only
    if path in held and Path(path).parent.parent.parent == Path(STATE, "vms"):
        return "written by a running QEMU"  # a running VM's log/console.log and log/qemu.log grow by themselves
    if st.st_size >= SNAPSHOT_HASH_MAX:
        return (st.st_ino, st.st_size, st.st_mtime_ns)
    with open(path, "rb") as f:
        data = f.read()
    if path == f"{RUN}/policy.cache.json":
        # Its stamp (policy.toml's inode and times) moves whenever the suite rewrites
        # policy.toml after a test; the cached policy itself must not change.
        with contextlib.suppress(ValueError, KeyError, TypeError):
            data = json.dumps(json.loads(data)["policy"], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def qemu_pids() -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().startswith("qemu-system"):
                    out.add(int(p.name))
    return out


def qemu_open_files() -> set[str]:
    """The paths running QEMU processes hold open."""
    out = set()
    for pid in qemu_pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


# The second QEMU (Debian 13's 10.0, scripts/fetch-qemu10.sh), beside the system's 7.2: its binary and
# the data directories it is given with -L (its own data, and the same firmware as 7.2's, copied in).
QEMU10_ROOT = os.environ.get("KVMGATE_QEMU10_DIR", "/var/cache/kvmgate-qemu10") + "/root"
QEMU10 = f"{QEMU10_ROOT}/usr/bin/qemu-system-x86_64"
QEMU10_DATA = [f"{QEMU10_ROOT}/usr/share/qemu", f"{QEMU10_ROOT}/usr/share/seabios", f"{QEMU10_ROOT}/usr/lib/ipxe/qemu"]
QEMU10_POLICY = f"qemu = {json.dumps(QEMU10)}\nqemu_data = {json.dumps(QEMU10_DATA)}\n"
# KVMGATE_TEST_QEMU=10.0: the whole run against QEMU 10.0 (test.sh runs the conformance, hibernate and
# security tests so, after the suite against the system's 7.2).
ON_QEMU10 = os.environ.get("KVMGATE_TEST_QEMU") == "10.0"
QEMU_UNDER_TEST = QEMU10 if ON_QEMU10 else "/usr/bin/qemu-system-x86_64"  # what the policy names

# The test installation's networks never share a name with a real one's: its own
# interface prefix (taps kt<n>, nftables tables kvmgate_kt), bridge, subnet and ports.
DEFAULT_POLICY = (
    (QEMU10_POLICY if ON_QEMU10 else "")
    + """\
accel = "tcg"
stop_timeout = 10
audit_burst = 100000  # the suite checks the record of every refusal; test_audit.py tests the rate limit
[host]
ifprefix = "kt"
[ports]
pool = [21000, 21999]
internal = [41000, 41999]
[networks.private]
type = "private"
[networks.services]
type = "services"
bridge = "ktsvc0"
subnet = "10.78.0.0/24"
"""
)


def pytest_report_header() -> str:
    which = f"{QEMU10} (10.0)" if ON_QEMU10 else "/usr/bin/qemu-system-x86_64 (the system's)"
    return f"QEMU under test: {which}"


@pytest.fixture(scope="session")
def guest() -> Path:
    if not Path(GUEST, "initrd.img").exists():
        subprocess.run(["sh", str(REPO / "guest/build-test-guest.sh"), GUEST], check=True, capture_output=True)
    return Path(GUEST)


@pytest.fixture(scope="session")
def kg(guest: Path) -> Iterator[Kvmgate]:
    if os.geteuid() != 0:
        pytest.skip("integration tests run as root (they create users, cgroups and taps)")
    if ON_QEMU10 and not os.path.exists(QEMU10):
        subprocess.run(["sh", str(REPO / "scripts/fetch-qemu10.sh")], check=True, capture_output=True)
    shutil.rmtree(PREFIX, ignore_errors=True)
    run([str(REPO / "install.sh"), *INSTALL_ARGS, *PAUSE_ARGS], check=True)
    k = Kvmgate()
    os.makedirs(ETC, 0o755, exist_ok=True)
    k.write_policy(DEFAULT_POLICY)  # before init, which brings the policy's networks up
    k.ok("admin", "init", "--accel", "tcg")
    yield k
    _stop_everything(k)
    k("admin", "net-down")
    for path in (SUDOERS, LOGROTATE, CRON):
        if os.path.exists(path):
            os.unlink(path)
    shutil.rmtree(COCKPIT_PAGE, ignore_errors=True)
    shutil.rmtree(RUN, ignore_errors=True)
    shutil.rmtree(PREFIX, ignore_errors=True)


def _stop_everything(k: Kvmgate) -> None:
    r = k("admin", "list", "--json")
    if r.returncode == 0:
        for vm in json.loads(r.stdout):
            if vm.get("state") in ("running", "paused"):
                k("stop", vm["name"], "--owner", vm["owner"], "--force")


@pytest.fixture(autouse=True)
def _policy_reset(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests that change the policy get the default back afterwards."""
    yield
    if "kg" in request.fixturenames and os.path.exists(ETC):
        Path(ETC, "policy.toml").write_text(DEFAULT_POLICY)


class Users:
    def __init__(self) -> None:
        self.made: list[str] = []

    def make(self, prefix: str = "kgt") -> str:
        name = f"{prefix}{secrets.token_hex(3)}"
        run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        self.made.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.made:
            run(["pkill", "-KILL", "-u", name])
        time.sleep(0.2)
        for name in self.made:
            run(["userdel", "--remove", "--force", name])
        self.made.clear()


@pytest.fixture(scope="session")
def users() -> Iterator[Users]:
    u = Users()
    yield u
    u.cleanup()


@pytest.fixture(scope="session")
def alice(users: Users) -> str:
    return users.make("kga")


@pytest.fixture(scope="session")
def bob(users: Users) -> str:
    return users.make("kgb")


@pytest.fixture
def vm_name() -> str:
    return f"vm{secrets.token_hex(4)}"


@pytest.fixture
def cleanup_vms(kg: Kvmgate) -> Iterator[list[tuple[str, str]]]:
    """Tests append (owner, name); the VMs are stopped and deleted afterwards."""
    made: list[tuple[str, str]] = []
    yield made
    for owner, name in made:
        discard(kg, owner, name)


def discard(kvmgate: Callable[..., subprocess.CompletedProcess[str]], owner: str, name: str) -> None:
    """A test's VM gone, whatever state the test left it in: running, in a job, or
    hibernated (a plain delete refuses that one, and a hibernated VM left behind
    blocks what must see none, such as a backend switch)."""
    kvmgate("stop", name, "--owner", owner, "--force")
    kvmgate("admin", "delete", name, "--owner", owner, "--force")


def boot_options(guest: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "256",
        "-nographic",
        "-kernel",
        f"{guest}/vmlinuz",
        "-initrd",
        f"{guest}/initrd.img",
        "-append",
        "console=ttyS0 quiet",
        *extra,
    ]


def httpd_options(guest: Path, *extra: str) -> list[str]:
    """A guest that serves HTTP on port 80 (busybox httpd), on user-mode networking."""
    opts = boot_options(guest)
    opts[opts.index("-append") + 1] += " kvmgate.httpd"
    return [*opts, "-net", "nic", "-net", "user", *extra]


class Pause:
    """The helper's test-only pause points (kvmgate/store/critical.py): while the
    control file names a point, a helper that reaches it writes
    `<control>.at.<point>` (its pid) and waits."""

    def __init__(self, point: str) -> None:
        self.point = point
        self.marker = Path(f"{PAUSE_CONTROL}.at.{point}")

    def __enter__(self) -> Pause:
        Path(PAUSE_CONTROL).write_text(self.point + "\n")
        Path(PAUSE_CONTROL).chmod(0o644)
        return self

    def reached(self, timeout: float = 60) -> int:
        """Wait until a helper is paused here; returns its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(self.marker.read_text())
            time.sleep(0.01)
        raise AssertionError(f"no helper reached the pause point {self.point}")

    def release(self) -> None:
        Path(PAUSE_CONTROL).unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.release()


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
