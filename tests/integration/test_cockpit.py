"""kvmgate's Cockpit page in a real browser: Debian's chromium, driven by Selenium
through chromium-driver, against cockpit-ws on loopback started by the test, with
real users logging in with their passwords (docs/cockpit.md).

Screenshots are kept as artefacts in artifacts/cockpit/ (the README shows one)."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from ..conftest import (
    COCKPIT_PAGE,
    DEFAULT_POLICY,
    HELPER,
    KVMGATE,
    PREFIX,
    REPO,
    Kvmgate,
    Users,
    as_user,
    boot_options,
    run,
)

ARTIFACTS = REPO / "artifacts" / "cockpit"
WS = "/usr/lib/cockpit/cockpit-ws"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cockpit(kg: Kvmgate) -> Iterator[str]:
    """`admin init --cockpit` (packages, the pinned xterm.js), then cockpit-ws on loopback."""
    if not os.path.exists(WS) or not shutil.which("chromium") or not os.path.exists("/usr/bin/chromedriver"):
        pytest.fail("cockpit-ws, chromium and chromium-driver are installed by test.sh (scripts/debian-deps.sh)")
    out = kg.ok("admin", "init", "--accel", "tcg", "--cockpit").stdout
    assert "cockpit page: the console: xterm.js" in out and "the screen: noVNC" in out, out
    assert Path(COCKPIT_PAGE, "vendor/xterm/xterm.js").exists()
    port = free_port()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "cockpit-ws.log", "wb") as log:
        ws = subprocess.Popen([WS, "--no-tls", "--port", str(port), "--address", "127.0.0.1"],
                              stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline and ws.poll() is None, "cockpit-ws did not start (artifacts/cockpit)"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    ws.terminate()
    ws.wait(10)
    for user in USERS:  # the test users' sessions only, never anyone else's
        run(["pkill", "-KILL", "-u", user])


USERS: list[str] = []


def with_password(users: Users, prefix: str) -> tuple[str, str]:
    name = users.make(prefix)
    USERS.append(name)
    password = "Pw-" + secrets.token_hex(8)
    run(["chpasswd"], input=f"{name}:{password}\n", check=True)
    return name, password


class Browser:
    def __init__(self, base: str) -> None:
        opts = Options()
        opts.binary_location = "/usr/bin/chromium"
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1280,1800",
            "--disable-dev-shm-usage",
            f"--user-data-dir=/tmp/kvmgate-chromium-{secrets.token_hex(4)}",
        ):
            opts.add_argument(arg)  # fmt: skip
        self.base = base
        self.driver = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
        self.driver.set_page_load_timeout(60)

    def login(self, user: str, password: str, hash: str = "#/") -> None:
        d = self.driver
        d.get(f"{self.base}/cockpit/@localhost/kvmgate/index.html{hash}")
        self.wait(lambda: d.find_element(By.ID, "login-user-input").is_displayed(), "the login form")
        d.find_element(By.ID, "login-user-input").send_keys(user)
        d.find_element(By.ID, "login-password-input").send_keys(password)
        d.find_element(By.ID, "login-button").click()
        self.wait(lambda: d.find_elements(By.ID, "main") and "Loading" not in d.find_element(By.ID, "main").text,
                  "the page")  # fmt: skip

    def go(self, hash: str) -> None:
        self.driver.execute_script("window.location.hash = arguments[0]", hash)

    def wait(self, cond: Callable[[], Any], what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                got = cond()
                if got:
                    return got
            except Exception as err:
                last = err
            time.sleep(0.25)
        self.shot(f"timeout-{what.replace(' ', '-')}")
        raise AssertionError(f"timed out waiting for {what} ({last})")

    def text(self, id: str) -> str:
        els = self.driver.find_elements(By.ID, id)
        return str(els[0].text) if els else ""

    def state(self) -> str:
        els = self.driver.find_elements(By.CSS_SELECTOR, "#status-list [data-state]")
        return str(els[0].get_attribute("data-state")) if els else ""

    def click(self, id: str) -> None:
        self.wait(lambda: self.driver.find_element(By.ID, id).is_enabled(), f"{id} enabled")
        self.driver.find_element(By.ID, id).click()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(cockpit: str) -> Iterator[Browser]:
    b = Browser(cockpit)
    yield b
    b.quit()


def test_each_user_sees_only_their_own_vms(
    kg: Kvmgate, users: Users, cockpit: str, browser: Browser, cleanup_vms: list
) -> None:
    (alice, apw), (bob, _) = with_password(users, "kgw"), with_password(users, "kgw")
    kg.ok("admin", "create", "mine", "--owner", alice, "--", "-m", "64")
    kg.ok("admin", "create", "theirs", "--owner", bob, "--", "-m", "64")
    cleanup_vms.extend([(alice, "mine"), (bob, "theirs")])
    browser.login(alice, apw)
    browser.wait(lambda: browser.driver.find_elements(By.CSS_SELECTOR, "#vms tr[data-vm='mine']"), "alice's VM")
    assert not browser.driver.find_elements(By.CSS_SELECTOR, "#vms tr[data-vm='theirs']")
    assert f"signed in as {alice}" in browser.text("whoami")
    browser.shot("list")
    # A URL naming bob's VM shows exactly what a missing VM shows.
    browser.go("#/vm/theirs")
    browser.wait(lambda: "no such VM" in browser.text("missing"), "no such VM")
    theirs = browser.text("missing")
    browser.go("#/vm/nosuchvm")
    browser.wait(lambda: "nosuchvm" in browser.text("missing"), "no such VM (missing)")
    assert theirs.replace("theirs", "X") == browser.text("missing").replace("nosuchvm", "X")


def test_a_users_browser_never_reaches_another_users_screen(
    kg: Kvmgate, users: Users, cockpit: str, browser: Browser, cleanup_vms: list, guest: Path
) -> None:
    """alice's page asks her bridge (which runs as alice) for a channel to bob's VNC
    socket: it is refused, and no byte of bob's screen arrives."""
    (alice, apw), bob = with_password(users, "kgw"), users.make("kgw")
    opts = [o for o in boot_options(guest) if o != "-nographic"]
    kg.ok("admin", "create", "bobdesk", "--owner", bob, "--", *opts)
    cleanup_vms.append((bob, "bobdesk"))
    kg.ok("start", "bobdesk", "--owner", bob)
    socket_path = kg.json("vnc", "bobdesk", "--owner", bob)["socket"]  # type: ignore[index]
    browser.login(alice, apw)
    kg.ok("admin", "create", "mydesk", "--owner", alice, "--", *opts)
    cleanup_vms.append((alice, "mydesk"))
    kg.ok("start", "mydesk", "--owner", alice)
    own_socket = kg.json("vnc", "mydesk", "--owner", alice)["socket"]  # type: ignore[index]
    session = "return !!(window.cockpit && window.cockpit.transport.csrf_token)"
    browser.wait(lambda: browser.driver.execute_script(session), "the page's Cockpit session")
    # Her own screen answers with the RFB greeting through the very same channel...
    assert _channel_bytes(browser, own_socket) >= 12
    # ...another's never does.
    got = _channel_bytes(browser, socket_path)
    assert got == 0, f"{got} bytes of bob's screen reached alice's browser"


def _channel_bytes(browser: Browser, path: str) -> int:
    """Bytes a Cockpit channel to a unix socket gives the page within 5 s."""
    return int(
        browser.driver.execute_async_script(
            """
        const done = arguments[arguments.length - 1];
        const opts = {payload: "stream", protocol: "binary", binary: "raw", unix: arguments[0]};
        const token = window.cockpit.transport.csrf_token;
        const url = `ws://${location.host}/cockpit/channel/${token}?${btoa(JSON.stringify(opts))}`;
        const ws = new WebSocket(url, ["binary"]);
        ws.binaryType = "arraybuffer";
        let bytes = 0;
        ws.onmessage = (ev) => { bytes += ev.data.byteLength || ev.data.length || 0; };
        const end = () => { ws.close(); done(bytes); };
        ws.onclose = end; ws.onerror = end;
        setTimeout(end, 5000);""",
            path,
        )
    )


def _screen_pixels(browser: Browser) -> int:
    """Distinct colours on noVNC's canvas (a blank screen has one)."""
    return int(
        browser.driver.execute_script("""
        const c = document.querySelector('#screen canvas');
        if (!c || !c.width) return 0;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < d.length && seen.size < 50; i += 4 * 7) seen.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]);
        return seen.size;""")
    )


def test_start_watch_console_and_screen_freeze_and_thaw(
    kg: Kvmgate, users: Users, cockpit: str, browser: Browser, cleanup_vms: list, guest: Path
) -> None:
    alice, pw = with_password(users, "kgw")
    opts = [o for o in boot_options(guest) if o != "-nographic"]
    opts[opts.index("-append") + 1] = "console=tty0 console=ttyS0"  # the boot on the screen and on the serial line
    kg.ok("admin", "create", "desk", "--owner", alice, "--", *opts)
    cleanup_vms.append((alice, "desk"))
    browser.login(alice, pw, "#/vm/desk")
    browser.wait(lambda: browser.state() == "stopped", "stopped")
    browser.click("start")
    browser.wait(lambda: browser.state() == "running", "running")
    browser.click("console-connect")
    browser.wait(lambda: "KVMGATE-GUEST-READY" in browser.text("console-term"), "the boot line in the console", 120)
    browser.click("screen-connect")
    browser.wait(lambda: browser.driver.find_element(By.ID, "screen").get_attribute("data-connected") == "yes",
                 "the screen connected")  # fmt: skip
    browser.wait(lambda: _screen_pixels(browser) > 1, "a screen that is not blank")
    browser.shot("vm")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.driver.find_element(By.ID, "screen").screenshot(str(ARTIFACTS / "screen.png"))
    browser.click("do-freeze")
    browser.wait(lambda: browser.state() == "paused", "paused")
    assert kg.json("status", "desk", user=alice)["state"] == "paused"  # type: ignore[index]
    browser.click("do-thaw")
    browser.wait(lambda: browser.state() == "running", "running again")
    assert kg.json("status", "desk", user=alice)["state"] == "running"  # type: ignore[index]


def test_an_error_is_kvmgates_one_line_refusal(
    kg: Kvmgate, users: Users, cockpit: str, browser: Browser, cleanup_vms: list
) -> None:
    alice, pw = with_password(users, "kgw")
    kg.ok("admin", "create", "plain", "--owner", alice, "--", "-m", "64", "-nographic")
    cleanup_vms.append((alice, "plain"))
    browser.login(alice, pw, "#/vm/plain")
    browser.wait(lambda: browser.state() == "stopped", "stopped")
    browser.driver.find_element(By.ID, "opt-extra").send_keys("-monitor stdio")
    browser.click("start")
    browser.wait(lambda: browser.text("error"), "the error")
    assert browser.text("error") == "-monitor: only the administrator may set this option"
    browser.shot("error")
    assert kg.json("status", "plain", user=alice)["state"] == "stopped"  # type: ignore[index]


def test_the_administrator_view_is_for_sudoers_through_cockpits_superuser(
    kg: Kvmgate, users: Users, cockpit: str, browser: Browser, cleanup_vms: list
) -> None:
    """The admin view runs the same commands through Cockpit's superuser (sudo,
    with the user's own password): every VM with its owner, and the audit log."""
    admin, pw = with_password(users, "kgw")
    someone = users.make("kgw")
    run(["usermod", "-aG", "sudo", admin], check=True)
    kg.ok("admin", "create", "far", "--owner", someone, "--", "-m", "64")
    cleanup_vms.append((someone, "far"))
    browser.login(admin, pw)
    browser.wait(lambda: browser.driver.find_elements(By.ID, "no-vms"), "an empty list of the admin's own VMs")
    browser.driver.find_element(By.ID, "admin-view").click()
    field = browser.wait(lambda: browser.driver.find_element(By.ID, "sudo-password"), "sudo's password prompt")
    assert field.get_attribute("type") == "password"
    field.send_keys(pw)
    browser.driver.find_element(By.ID, "sudo-ok").click()
    browser.wait(lambda: browser.driver.find_elements(By.CSS_SELECTOR, "#vms tr[data-vm='far']"), "every VM")
    row = browser.driver.find_element(By.CSS_SELECTOR, "#vms tr[data-vm='far']").text
    assert someone in row
    browser.wait(lambda: "admin create" in browser.text("audit"), "the audit log's tail")
    browser.shot("admin")
    # The same on a terminal: a sudoer's `sudo kvmgate admin` is root's (the kvmgate drop-in
    # alone gives the helper, under which the caller stays the user).
    r = as_user(admin, ["sudo", "-S", "-p", "", KVMGATE, "admin", "list", "--json"], input=f"{pw}\n")
    assert r.returncode == 0 and someone in r.stdout, r.stderr
    r = as_user(admin, ["sudo", "-n", HELPER, "admin", "list"])
    assert r.returncode == 3 and "root only" in r.stderr, r.stderr


def test_a_browser_session_is_a_logon_only_when_the_admin_says_so(
    kg: Kvmgate, users: Users, cockpit: str, browser: Browser
) -> None:
    """Off by default; with `cockpit` in logon_services, `admin init --pam` puts the
    hook in Cockpit's PAM stack (service name as an argv word), and a login through
    the page is counted like an ssh logon."""
    alice, pw = with_password(users, "kgw")

    def sessions() -> list[str]:
        rows = kg.json("admin", "sessions")
        return [s for r in rows if r["user"] == alice for s in r["sessions"]]  # type: ignore[union-attr,index]

    stack = Path("/etc/pam.d/cockpit")
    before = stack.read_text()
    try:
        kg.ok("admin", "init", "--pam")
        assert "kvmgate-test" not in stack.read_text(), "off by default"
        kg.write_policy('logon_services = ["sshd", "login", "cockpit"]\n' + DEFAULT_POLICY)
        out = kg.ok("admin", "init", "--pam").stdout
        assert f"{PREFIX}/lib/kvmgate/kvmgate-pam-start cockpit open" in stack.read_text(), out
        browser.login(alice, pw)
        browser.wait(sessions, "the browser session counted as a logon")
    finally:
        kg.write_policy(DEFAULT_POLICY)
        kg.ok("admin", "init", "--no-pam")
        assert stack.read_text() == before
