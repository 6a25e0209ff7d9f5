"""Attacks through VM options and user-named files, as the VM's real owner.
Each asserts the attack failed and that nothing leaked or changed."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from ..conftest import HELPER, STATE, Kvmgate, as_user
from .conftest import fd_targets, give, home, qemu_pids


def refused(r: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert text in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, "one clear line"


# 2. Options outside the user's list, in every spelling.
@pytest.mark.parametrize(
    "opts, text",
    [
        (["-m", "4096"], "-m: only the administrator may set this option"),
        (["--m", "4096"], "--m: unknown option"),
        (["-m=4096"], "-m: unknown option"),
        (["-mem-path", "/dev/shm"], "-mem-path: unknown option"),
        (["-snap"], "-snap: unknown option"),
        (["-boot", "c", "-m", "4096"], "-m: only the administrator"),
        (["-append", "-m 4096"], "-append: value must not start with '-'"),
        (["-cdrom", "--", "-m", "4096"], "-cdrom: value must not start with '-'"),
        (["-boot", "d", "--", "-m", "4096"], "--: not allowed among VM options"),
        (["-net", "user"], "-net: only the administrator"),
        (["-monitor", "stdio"], "-monitor: only the administrator"),
        (["-device", "virtio-9p-pci"], "-device: unknown option"),
        (["-chardev", "file,id=x,path=/etc/shadow"], "-chardev: unknown option"),
        (["-object", "memory-backend-file,id=m,mem-path=/etc/shadow"], "-object: unknown option"),
        (["-readconfig", "/etc/shadow"], "-readconfig: unknown option"),
        (["-S"], "-S: not used on this host"),
        (["-daemonize"], "-daemonize: not used on this host"),
        (["-smp", "64"], "-smp: not used on this host"),
    ],
)
def test_options_outside_the_list(
    kg: Kvmgate, alice: str, alice_vm: str, opts: list[str], text: str, unchanged: None
) -> None:
    refused(kg("start", alice_vm, "--", *opts, user=alice), 3, text)


# 3. Comma, sub-option, newline and NUL injection.
@pytest.mark.parametrize(
    "opts, text",
    [
        (["-vnc", ":1,websocket=5700"], "-vnc: must be a display number"),
        (["-vnc", ":1,password=off"], "-vnc: must be a display number"),
        (["-boot", "c,splash=/root/x"], "-boot: must be boot devices"),
        (["-boot", "order=c,menu=on"], "-boot: must be boot devices"),
        (["-loadvm", "x,y"], "-loadvm: must be a snapshot tag"),
        (["-append", "quiet\ninit=/bin/sh"], "-append: must be printable ASCII"),
        (["-hdachs", "1,1,1,lba,x=y"], "-hdachs: must be c,h,s[,t]"),
    ],
)
def test_sub_option_injection(
    kg: Kvmgate, alice: str, alice_vm: str, opts: list[str], text: str, unchanged: None
) -> None:
    refused(kg("start", alice_vm, "--", *opts, user=alice), 3, text)


def test_comma_in_a_path_is_just_a_file_name(kg: Kvmgate, alice: str, alice_vm: str, unchanged: None) -> None:
    """`a.img,file.driver=vvfat` names a file; QEMU never sees the string (it gets an fd)."""
    refused(
        kg("start", alice_vm, "--", "-hda", "a.img,file.driver=vvfat,dir=/etc", user=alice),
        3,
        "no such file, or not permitted",
    )


# 4. Protocol prefixes: refused by the front end, and by the helper when called directly.
@pytest.mark.parametrize(
    "value",
    [
        "fat:rw:/etc",
        'json:{"file":{"driver":"file","filename":"/etc/shadow"}}',
        "nbd:localhost:10809",
        "http://example.org/x.iso",
        "file:/etc/shadow",
    ],
)
def test_protocol_prefixes(kg: Kvmgate, alice: str, alice_vm: str, value: str, unchanged: None) -> None:
    refused(kg("start", alice_vm, "--", "-cdrom", value, user=alice), 3, "protocol prefixes are not allowed")
    direct = as_user(alice, ["sudo", "-n", HELPER, "start", alice_vm, "--", "-cdrom", value])
    refused(direct, 3, "-cdrom: protocol prefixes are not allowed")


def _qcow2_with(tmp: Path, name: str, *opts: str) -> Path:
    p = tmp / name
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-u", *opts, str(p), "16M"], check=True, capture_output=True)
    return p


# 5. Format probing: a raw image whose first sector is a qcow2 header naming /etc/shadow.
def test_a_qcow2_header_under_a_raw_name_is_refused_never_probed(
    kg: Kvmgate, alice: str, alice_vm: str, tmp_path: Path, unchanged: None
) -> None:
    """The format comes from the name and is checked against the header: a mismatch
    is refused with a hint. It was once passed as raw (safe, but the guest saw
    garbage and its writes damaged the user's qcow2 image, as cloud images named
    *.img are); it is never probed, so the backing file is never read either."""
    evil = _qcow2_with(tmp_path, "evil.qcow2", "-o", "backing_file=/etc/shadow,backing_fmt=raw")
    raw = give(alice, evil, "evil.img")
    r = kg("start", alice_vm, "--", "-hdb", str(raw), user=alice)
    assert r.returncode == 3, r.stderr
    assert r.stderr == f"kvmgate: {raw}: a qcow2 image whose name says raw: rename it to end in .qcow2\n"
    assert kg.json("status", alice_vm, user=alice)["state"] == "stopped"


def test_format_refusals_say_what_to_do(kg: Kvmgate, alice: str, alice_vm: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(1 << 20))
    r = kg("start", alice_vm, "--", "-hdb", str(give(alice, plain, "plain.qcow2")), user=alice)
    assert r.returncode == 3 and "a raw image must not end in .qcow2" in r.stderr, r.stderr
    backed = _qcow2_with(tmp_path, "backed.qcow2", "-o", "backing_file=/etc/hostname,backing_fmt=raw")
    r = kg("start", alice_vm, "--", "-hdb", str(give(alice, backed, "backed.qcow2")), user=alice)
    assert r.returncode == 3 and "qemu-img convert -O qcow2 IMAGE NEW.qcow2" in r.stderr, r.stderr


# 6. qcow2 images that point elsewhere.
@pytest.mark.parametrize(
    "opts",
    [
        ["-o", "backing_file=/etc/shadow,backing_fmt=raw"],
        ["-o", 'backing_file=json:{"file":{"driver":"file",,"filename":"/etc/shadow"}},backing_fmt=raw'],
        ["-o", "backing_file=/root/bob.img,backing_fmt=raw"],
        ["-o", "data_file=/etc/shadow"],
    ],
    ids=["backing-shadow", "json-backing", "backing-other-user", "data-file"],
)
def test_qcow2_pointing_elsewhere_is_refused(
    kg: Kvmgate, alice: str, alice_vm: str, tmp_path: Path, opts: list[str], unchanged: None
) -> None:
    if "data_file" in opts[1]:
        data = tmp_path / "data.raw"
        img = tmp_path / "d.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-f", "qcow2", "-o", f"data_file={data}", str(img), "16M"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["qemu-img", "amend", "-f", "qcow2", "-o", "data_file=/etc/shadow", str(img)], capture_output=True
        )
    else:
        img = _qcow2_with(tmp_path, "b.qcow2", *opts)
    mine = give(alice, img, "pointer.qcow2")
    r = kg("start", alice_vm, "--", "-hdb", str(mine), user=alice)
    assert r.returncode == 3 and ("backing file" in r.stderr or "data file" in r.stderr), r.stderr


# 7. Files the user cannot read look exactly like missing files.
def test_unreadable_files_look_missing(
    kg: Kvmgate, alice: str, bob: str, alice_vm: str, guest: Path, unchanged: None
) -> None:
    secret = Path("/root/kvmgate-secret.img")
    secret.write_bytes(bytes(1 << 20))
    secret.chmod(0o600)
    bobs = give(bob, guest / "disk.raw", "bob-private.img", 0o600)
    link = home(alice) / "sneaky.img"
    if link.is_symlink():
        link.unlink()
    os.symlink(str(bobs), link)
    os.lchown(link, *(lambda p: (p.st_uid, p.st_gid))(home(alice).stat()))
    try:
        messages = set()
        for path in (
            "/root/kvmgate-secret.img",
            str(bobs),
            str(link),
            "/etc/shadow",
            str(home(alice) / "nope.img"),
            str(home(alice) / "../" / bob / "bob-private.img"),
        ):
            r = kg("start", alice_vm, "--", "-hdb", path, user=alice)
            assert r.returncode == 3
            messages.add(r.stderr.replace(path, "PATH").replace(os.path.normpath(path), "PATH"))
        assert len(messages) == 1, messages
    finally:
        secret.unlink()
        link.unlink()


# 8. TOCTOU: a symlink swapped in a loop, and a hard link.
def test_symlink_swap_race(kg: Kvmgate, alice: str, alice_vm: str, guest: Path) -> None:
    good = give(alice, guest / "disk.raw", "good.img")
    swap = home(alice) / "swap.img"
    script = (
        "import os,sys\n"
        f"good, target, link = {str(good)!r}, '/etc/shadow', {str(swap)!r}\n"
        "tmp = link + '.t'\n"
        "while not os.path.exists(link + '.stop'):\n"
        "    for t in (good, target):\n"
        "        try: os.unlink(tmp)\n"
        "        except FileNotFoundError: pass\n"
        "        os.symlink(t, tmp); os.replace(tmp, link)\n"
    )
    proc = threading.Thread(target=lambda: as_user(alice, ["/usr/bin/python3", "-c", script], timeout=120))
    proc.start()
    try:
        seen_ok = 0
        for _ in range(12):
            before = qemu_pids()
            r = kg("start", alice_vm, "--paused", "--", "-hdb", str(swap), user=alice)
            if r.returncode == 0:
                seen_ok += 1
                pid = kg.json("status", alice_vm, user=alice)["pid"]
                assert not any("shadow" in t for t in fd_targets(pid))
                kg.ok("stop", alice_vm, "--force", user=alice)
            else:
                assert r.returncode == 3 and "no such file, or not permitted" in r.stderr
                assert qemu_pids() <= before  # no new QEMU (a stopped one may still be exiting)
        assert seen_ok  # the race was really run both ways
    finally:
        (home(alice) / "swap.img.stop").touch()
        proc.join()
        for p in (swap, home(alice) / "swap.img.stop", home(alice) / "swap.img.t"):
            if p.is_symlink() or p.exists():
                p.unlink()


def test_hardlink_to_a_root_file(kg: Kvmgate, alice: str, alice_vm: str, unchanged: None) -> None:
    target = Path(STATE).parent / "hardlink-target.img"
    target.write_bytes(bytes(1 << 20))
    target.chmod(0o600)
    try:
        link = home(alice) / "hard.img"
        r = as_user(alice, ["ln", str(target), str(link)])
        if r.returncode == 0:  # protected_hardlinks off: the link exists but grants nothing
            refused(kg("start", alice_vm, "--", "-hdb", str(link), user=alice), 3, "no such file, or not permitted")
            link.unlink()
        else:
            assert "Operation not permitted" in r.stderr
    finally:
        target.unlink()


# 15. -loadvm tags, -incoming in every spelling, VNC addresses.
@pytest.mark.parametrize(
    "opts, text",
    [
        (["-loadvm", "../../etc/shadow"], "-loadvm: must be a snapshot tag"),
        (["-loadvm", "-incoming"], "-loadvm: value must not start with '-'"),
        (["-loadvm", "a" * 65], "-loadvm: must be a snapshot tag"),
        (["-incoming", "tcp:0:4444"], "-incoming: unknown option"),
        (["--incoming", "tcp:0:4444"], "--incoming: unknown option"),
        (["-incoming=defer"], "-incoming: unknown option"),
        (["-append", "x", "-incoming", "exec:sh"], "-incoming: unknown option"),
        (["-vnc", "0.0.0.0:1"], "-vnc: must be a display number"),
        (["-vnc", ":0"], "-vnc: display must be between :1 and :99"),
        (["-vnc", ":100"], "-vnc: display must be between :1 and :99"),
        (["-vnc", "unix:/tmp/x"], "-vnc: must be a display number"),
    ],
)
def test_loadvm_incoming_vnc(
    kg: Kvmgate, alice: str, alice_vm: str, opts: list[str], text: str, unchanged: None
) -> None:
    refused(kg("start", alice_vm, "--", *opts, user=alice), 3, text)


# 16. Names.
@pytest.mark.parametrize(
    "name",
    [
        "a" * 15,
        "a" * 16,
        "a" * 17,
        "a" * 255,
        "a" * 256,
        "target ",
        " target",
        "target\t",
        "../target",
        "TARGET",
        "t\u0430rget",
        "target/",
        "./target",
        "kg1.a3ZtZ2F0ZS1pZC0x",
    ],
)
def test_names(kg: Kvmgate, alice: str, alice_vm: str, name: str, unchanged: None) -> None:
    r = kg("status", name, user=alice)
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)  # control characters escaped
    assert r.returncode == 4 and r.stderr == f"kvmgate: no such VM: {shown}\n"


def test_identity_directory_name_is_not_a_vm_name(kg: Kvmgate, alice: str, alice_vm: str, unchanged: None) -> None:
    ident = Path(kg.json("status", alice_vm, user=alice)["directory"]).name
    assert kg("status", ident, user=alice).returncode == 4


# 17. The owner cannot re-point their name at another VM's directory.
def test_owner_cannot_touch_name_links_or_identities(
    kg: Kvmgate, alice: str, alice_vm: str, bob_vm: str, unchanged: None
) -> None:
    for path in (f"{STATE}/names/{alice}/{alice_vm}", f"{STATE}/names/{alice}", f"{STATE}/vms"):
        r = as_user(alice, ["ln", "-sfn", "/tmp", path])
        assert r.returncode != 0
    d = kg.json("status", alice_vm, user=alice)["directory"]
    r = as_user(alice, ["mv", d, d + "x"])
    assert r.returncode != 0
    r = as_user(alice, ["mkdir", f"{d}/id"])
    assert r.returncode != 0


def test_direct_helper_call_is_parsed_strictly(kg: Kvmgate, alice: str, alice_vm: str, unchanged: None) -> None:
    for argv in (
        ["admin", "create", "x", "--owner", alice],
        ["start", alice_vm, "--owner", "root"],
        ["start", alice_vm, "--evil"],
        ["bogus"],
    ):
        r = as_user(alice, ["sudo", "-n", HELPER, *argv])
        assert r.returncode in (2, 3), (argv, r.stderr)


def test_users_cannot_run_anything_else_through_sudo(kg: Kvmgate, alice: str) -> None:
    for cmd in (["/bin/sh", "-c", "id"], ["/usr/bin/qemu-system-x86_64", "-version"], ["-u", "root", "/bin/true"]):
        r = as_user(alice, ["sudo", "-n", *cmd])
        assert r.returncode != 0 and "password is required" in r.stderr
