"""The image library, copy-on-write VM disks, `admin import`, and the cloud-init
seed, through the installed commands, as root and as real users, with the
busybox guest (fast). The Debian guest's journey is in test_debian_guest.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import BOOT_LINE, STATE, Kvmgate, as_user, boot_options
from ..security.conftest import home

LIBRARY = Path(STATE, "images")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_files() -> list[str]:
    return sorted(os.listdir(LIBRARY)) if LIBRARY.is_dir() else []


@pytest.fixture
def images(kg: Kvmgate) -> Iterator[list[str]]:
    """Tests append library names; removed afterwards (their VMs first)."""
    made: list[str] = []
    yield made
    for name in made:
        kg("admin", "image", "remove", name)


@pytest.fixture
def source(tmp_path: Path, guest: Path) -> Path:
    """A copy of the busybox guest's ext4 data disk (marker "test-disk") as qcow2,
    root's own file (0600) in a directory only root can enter."""
    tmp_path.chmod(0o700)
    p = tmp_path / "bb.qcow2"
    shutil.copy(guest / "disk.qcow2", p)
    p.chmod(0o600)
    return p


def vm_disk(kg: Kvmgate, owner: str, name: str) -> Path:
    return Path(kg.json("admin", "show", name, "--owner", owner)["default_disk"])  # type: ignore[index]


def test_an_image_goes_into_the_library_root_owned_and_read_only(
    kg: Kvmgate, alice: str, images: list[str], source: Path
) -> None:
    r = kg.ok("admin", "image", "add", "bbimg", str(source))
    images.append("bbimg")
    assert "added image bbimg: 16 MiB virtual" in r.stdout
    rows = kg.json("admin", "image", "list")
    (row,) = [x for x in rows if x["name"] == "bbimg"]  # type: ignore[union-attr]
    assert row["virtual_size"] == 16 << 20 and row["vms"] == [] and row["bytes"] > 0
    data = Path(row["path"])
    st = data.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o444)
    assert stat.S_IMODE(LIBRARY.stat().st_mode) == 0o700 and LIBRARY.stat().st_uid == 0
    subprocess.run(["qemu-img", "check", "-f", "qcow2", str(data)], check=True, capture_output=True)
    # Users see what is offered, never the files.
    offered = kg.json("images", user=alice)
    assert {"name": "bbimg", "virtual_size": 16 << 20, "cloud_init": False} in offered  # type: ignore[operator]
    assert "path" not in json.dumps(offered)
    peek = as_user(alice, ["cat", str(data)])
    assert peek.returncode != 0 and not peek.stdout
    assert kg("admin", "image", "list", user=alice).returncode == 3


def test_a_vm_from_an_image_gets_its_own_overlay_and_never_writes_the_image(
    kg: Kvmgate, alice: str, images: list[str], source: Path, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    kg.ok("admin", "image", "add", "bbcow", str(source))
    images.append("bbcow")
    data = Path(next(x["path"] for x in kg.json("admin", "image", "list") if x["name"] == "bbcow"))  # type: ignore[union-attr,index]
    before = sha(data)
    kg.ok("admin", "create", vm_name, "--owner", alice, "--image", "bbcow", "--disk-size", "64M",
          "--", *boot_options(guest))  # fmt: skip
    cleanup_vms.append((alice, vm_name))
    disk = vm_disk(kg, alice, vm_name)
    st = disk.stat()
    assert st.st_uid == os.stat(home(alice)).st_uid and stat.S_IMODE(st.st_mode) == 0o600
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert info["virtual-size"] == 64 << 20 and info["backing-filename"].startswith("kvmgate-image:")
    assert kg.json("admin", "image", "list")[0]["vms"] == [f"{alice}/{vm_name}"]  # type: ignore[index]
    # Refused while used, and nothing changes.
    r = kg("admin", "image", "remove", "bbcow")
    assert r.returncode == 5 and f"{alice}/{vm_name}" in r.stderr and (data.exists() and sha(data) == before)

    # The overlay grows like any disk; its header still names only its image.
    kg.ok("admin", "resize", vm_name, "disk0.qcow2", "96M", "--owner", alice)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert info["virtual-size"] == 96 << 20 and info["backing-filename"].startswith("kvmgate-image:")

    kg.ok("start", vm_name, user=alice)
    kg.ok("console", vm_name, "--expect", "disk=test-disk", "--timeout", "90", user=alice)
    kg.ok("console", vm_name, "--expect", "WRITTEN-2", "--timeout", "30", user=alice,
          input="echo WRITTEN-$((1+1)) > /mnt/mine; sync; cat /mnt/mine\n")  # fmt: skip
    kg.ok("stop", vm_name, user=alice)
    assert sha(data) == before, "the library image is never written"
    # The overlay holds the write: a fresh start reads it back through the chain.
    kg.ok("start", vm_name, user=alice)
    kg.ok("console", vm_name, "--expect", "disk=test-disk", "--timeout", "90", user=alice)
    kg.ok("console", vm_name, "--expect", "AGAIN-WRITTEN-2", "--timeout", "30", user=alice,
          input="echo AGAIN-$(cat /mnt/mine)\n")  # fmt: skip
    kg.ok("stop", vm_name, user=alice)

    # -snapshot over the overlay: neither the overlay nor the image changes.
    overlay_before = sha(disk)
    kg.ok("start", vm_name, "--", "-snapshot", user=alice)
    kg.ok("console", vm_name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    kg.ok("console", vm_name, "--expect", "SNAP-2", "--timeout", "90", user=alice,
          input="echo snap > /mnt/snap; sync; echo SNAP-$((1+1))\n")  # fmt: skip
    kg.ok("stop", vm_name, "--force", user=alice)
    assert sha(data) == before and sha(disk) == overlay_before


def test_an_overlay_whose_header_names_another_file_is_refused(
    kg: Kvmgate, alice: str, images: list[str], source: Path, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    kg.ok("admin", "image", "add", "bbhdr", str(source))
    images.append("bbhdr")
    kg.ok("admin", "create", vm_name, "--owner", alice, "--image", "bbhdr", "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    disk = vm_disk(kg, alice, vm_name)
    # alice owns her overlay and may rewrite its header: point it at a root-only file.
    r = as_user(alice, ["qemu-img", "rebase", "-u", "-F", "raw", "-b", "/etc/shadow", str(disk)])
    assert r.returncode == 0, r.stderr
    before = kg.state_snapshot()
    r = kg("start", vm_name, user=alice)
    assert r.returncode == 3 and "not this VM's library image" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert kg.state_snapshot() == before


def test_delete_keep_disks_keeps_a_standalone_copy_and_frees_the_image(
    kg: Kvmgate, alice: str, images: list[str], source: Path, vm_name: str, guest: Path, tmp_path: Path
) -> None:
    kg.ok("admin", "image", "add", "bbflat", str(source))
    images.append("bbflat")
    kg.ok("admin", "create", vm_name, "--owner", alice, "--image", "bbflat", "--", *boot_options(guest))
    kg.ok("start", vm_name, user=alice)
    kg.ok("console", vm_name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)
    kg.ok("console", vm_name, "--expect", "FLAT-2", "--timeout", "90", user=alice,
          input="echo flat > /mnt/flat; sync; echo FLAT-$((1+1))\n")  # fmt: skip
    kg.ok("stop", vm_name, user=alice)
    r = kg.ok("admin", "delete", vm_name, "--owner", alice, "--keep-disks")
    kept = Path(r.stdout.split("disks kept in ", 1)[1].split(";")[0].strip()) / "disk0.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(kept)], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert "backing-filename" not in info and kept.stat().st_uid == os.stat(home(alice)).st_uid
    raw = tmp_path / "kept.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(kept), str(raw)], check=True)
    subprocess.run(["e2fsck", "-fy", str(raw)], capture_output=True)  # replay the guest's journal first
    cat = subprocess.run(["debugfs", "-R", "cat /flat", str(raw)], capture_output=True, text=True)
    assert cat.stdout.strip() == "flat", "the kept copy holds the VM's writes"
    cat = subprocess.run(["debugfs", "-R", "cat /kvmgate-disk", str(raw)], capture_output=True, text=True)
    assert cat.stdout.strip() == "test-disk", "and the image's data"
    kg.ok("admin", "image", "remove", "bbflat")
    images.remove("bbflat")


def test_import_makes_a_file_the_vms_disk_owned_by_its_owner(
    kg: Kvmgate, alice: str, vm_name: str, cleanup_vms: list, guest: Path, tmp_path: Path
) -> None:
    tmp_path.chmod(0o700)
    src = tmp_path / "data.img"  # a name that says nothing: --format is needed
    shutil.copy(guest / "disk.raw", src)
    kg.ok("admin", "create", vm_name, "--owner", alice, "--disk-size", "8M", "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    r = kg("admin", "import", vm_name, str(src), "--owner", alice)
    assert r.returncode == 2 and "--format" in r.stderr
    r = kg("admin", "import", vm_name, str(src), "--owner", alice, "--format", "raw")
    assert r.returncode == 5 and "--replace" in r.stderr
    kg.ok("admin", "import", vm_name, str(src), "--owner", alice, "--format", "raw", "--replace")
    disk = vm_disk(kg, alice, vm_name)
    st = disk.stat()
    assert st.st_uid == os.stat(home(alice)).st_uid and stat.S_IMODE(st.st_mode) == 0o600
    assert disk.read_bytes()[:4] == b"QFI\xfb"
    kg.ok("start", vm_name, user=alice)
    kg.ok("console", vm_name, "--expect", "disk=test-disk", "--timeout", "90", user=alice)
    r = kg("admin", "import", vm_name, str(src), "--owner", alice, "--format", "raw", "--replace")
    assert r.returncode == 5, "never under a running VM"


def bad_inputs(tmp_path: Path, guest: Path) -> dict[str, tuple[list[str], int, str]]:
    q = tmp_path / "ok.qcow2"
    shutil.copy(guest / "disk.qcow2", q)
    liar = tmp_path / "liar.raw"
    shutil.copy(guest / "disk.qcow2", liar)
    backed = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(q), str(backed)], check=True)
    datafile = tmp_path / "datafile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path}/d.raw",
                    str(datafile), "16M"], check=True)  # fmt: skip
    notq = tmp_path / "notq.qcow2"
    notq.write_bytes(b"\0" * 65536)
    fifo = tmp_path / "fifo.raw"
    os.mkfifo(fifo)
    link = tmp_path / "link.qcow2"
    link.symlink_to(q)
    return {
        "raw name, qcow2 inside": ([str(liar)], 3, "header says qcow2, not raw"),
        "backing file": ([str(backed)], 3, "backing file"),
        "data file": ([str(datafile)], 3, "data file"),
        "not qcow2": ([str(notq)], 3, "not a qcow2 image"),
        "fifo": ([str(fifo)], 3, "not a regular file"),
        "device": (["/dev/null", "--format", "raw"], 3, "not a regular file"),
        "symlink": ([str(link)], 3, "symbolic link"),
        "silent name": ([str(guest / "disk.raw").replace(".raw", "") + ".img"], 2, "--format"),
        "missing": ([str(tmp_path / "nope.qcow2")], 3, "cannot open"),
        "move a raw": ([str(tmp_path / "x.raw"), "--move"], 3, ""),
    }


def test_bad_images_are_refused_in_one_line_and_leave_nothing(
    kg: Kvmgate, images: list[str], tmp_path: Path, guest: Path
) -> None:
    cases = bad_inputs(tmp_path, guest)
    (tmp_path / "x.raw").write_bytes(b"\0" * 4096)
    kg.ok("admin", "image", "add", "taken", str(tmp_path / "ok.qcow2"))
    images.append("taken")
    before = library_files()
    for what, (args, code, words) in cases.items():
        r = kg("admin", "image", "add", "badimg", *args)
        assert r.returncode in (code, 2), f"{what}: {r.returncode} {r.stderr}"
        assert len(r.stderr.strip().splitlines()) == 1, f"{what}: {r.stderr}"
        assert words in r.stderr, f"{what}: {r.stderr}"
        assert library_files() == before, what
    r = kg("admin", "image", "add", "taken", str(tmp_path / "ok.qcow2"))
    assert r.returncode == 2 and "already has an image named taken" in r.stderr
    r = kg("admin", "image", "add", "../x", str(tmp_path / "ok.qcow2"))
    assert r.returncode == 2 and library_files() == before


def test_a_full_filesystem_in_the_middle_of_a_convert_leaves_nothing(kg: Kvmgate, tmp_path: Path) -> None:
    """The library on a tiny tmpfs: qemu-img fails half-way, the stage goes."""
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.write(os.urandom(24 << 20))
    lib = LIBRARY
    lib.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(lib)], check=True)
    try:
        r = kg("admin", "image", "add", "huge", str(big))
        assert r.returncode in (1, 3) and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "space" in r.stderr.lower()
        assert os.listdir(lib) == []
    finally:
        subprocess.run(["umount", str(lib)], check=True)


def test_move_takes_a_root_file_without_copying(kg: Kvmgate, images: list[str], source: Path) -> None:
    moved = LIBRARY.parent / "tomove.qcow2"  # the state's filesystem
    shutil.copy(source, moved)
    ino = moved.stat().st_ino
    kg.ok("admin", "image", "add", "bbmove", str(moved), "--move")
    images.append("bbmove")
    assert not moved.exists()
    data = Path(next(x["path"] for x in kg.json("admin", "image", "list") if x["name"] == "bbmove"))  # type: ignore[union-attr,index]
    assert data.stat().st_ino == ino and stat.S_IMODE(data.stat().st_mode) == 0o444


def test_the_seed_holds_the_owners_keys_and_nothing_else(
    kg: Kvmgate, alice: str, images: list[str], source: Path, vm_name: str, cleanup_vms: list, guest: Path
) -> None:
    kg.ok("admin", "image", "add", "bbseed", str(source), "--cloud-init")
    images.append("bbseed")
    kg.ok("admin", "create", vm_name, "--owner", alice, "--image", "bbseed", "--", *boot_options(guest))
    cleanup_vms.append((alice, vm_name))
    ssh = home(alice) / ".ssh"
    as_user(
        alice,
        [
            "sh",
            "-c",
            "mkdir -p ~/.ssh && rm -f ~/.ssh/id_* && ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/id_ed25519 -C alice@host",
        ],
        check=True,
    )
    pub = (ssh / "id_ed25519.pub").read_text().strip()
    as_user(alice, ["sh", "-c", f"printf '%s\\n' '# mine' 'restrict {pub}' > ~/.ssh/authorized_keys"], check=True)
    shown = kg.json("keys", vm_name, user=alice)
    assert [k["from"] for k in shown["keys"]] == ["~/.ssh/id_ed25519.pub:1"]  # type: ignore[index]
    assert shown["skipped"][0]["source"] == "~/.ssh/authorized_keys:2"  # type: ignore[index]
    kg.ok("start", vm_name, user=alice)
    pid = kg.json("status", vm_name, user=alice)["pid"]  # type: ignore[index]
    fds = [f for f in os.listdir(f"/proc/{pid}/fd") if "kvmgate-seed" in os.readlink(f"/proc/{pid}/fd/{f}")]
    seed = Path(f"/proc/{pid}/fd/{fds[0]}").read_bytes()
    iso = Path(f"/tmp/{vm_name}-seed.iso")
    iso.write_bytes(seed)
    try:

        def get(name: str) -> str:
            return subprocess.run(["isoinfo", "-J", "-x", f"/{name}", "-i", str(iso)], capture_output=True,
                                  text=True, check=True).stdout  # fmt: skip

        assert get("meta-data").splitlines()[1] == f"local-hostname: {vm_name}"
        ud = json.loads(get("user-data").split("\n", 1)[1])
        assert ud["ssh_authorized_keys"] == [pub] and ud["users"][1]["name"] == alice
        assert len(seed) < 64 << 10
        seeddir = iso.with_suffix(".d")
        seeddir.mkdir()
        for name in ("meta-data", "user-data", "network-config"):
            (seeddir / name).write_text(get(name))
        cloud_init_accepts(seeddir, vm_name, pub)
    finally:
        iso.unlink()
        shutil.rmtree(iso.with_suffix(".d"), ignore_errors=True)
    assert kg.json("keys", vm_name, user=alice)["keys"][0]["fingerprint"].startswith("SHA256:")  # type: ignore[index]
    kg.ok("console", vm_name, "--expect", BOOT_LINE, "--timeout", "90", user=alice)


CLOUD_INIT = "/var/cache/kvmgate-test-cloudinit"
CHECK = """
import json, sys
from cloudinit import util
from cloudinit.config.schema import get_schema, validate_cloudconfig_schema
from cloudinit.net import network_state
md, ud, _ = util.read_seeded(base="file://" + sys.argv[1] + "/")
cfg = util.load_yaml(ud.decode() if isinstance(ud, bytes) else ud)
validate_cloudconfig_schema(cfg, schema=get_schema(), strict=True)
net = network_state.parse_net_config_data(util.load_yaml(open(sys.argv[1] + "/network-config").read()))
macs = [i.get("mac_address") for i in net.iter_interfaces()]
print(json.dumps({"md": md, "keys": cfg["users"][1]["ssh_authorized_keys"], "macs": macs}))
"""


def cloud_init_accepts(seeddir: Path, hostname: str, key: str) -> None:
    """cloud-init's own NoCloud reader, schema (strict) and network-config parser,
    from Debian's package (extracted, never installed: it would take over a host)."""
    version = subprocess.run(["apt-cache", "policy", "cloud-init"], capture_output=True, text=True).stdout
    version = version.split("Candidate:", 1)[1].split()[0]
    lib = Path(CLOUD_INIT, version)
    if not (lib / "usr/lib/python3/dist-packages/cloudinit").is_dir():
        work = Path(CLOUD_INIT, "download")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, mode=0o777)
        work.chmod(0o777)  # apt's sandbox user downloads into it
        subprocess.run(["apt-get", "download", "cloud-init"], cwd=work, check=True, capture_output=True)
        (deb,) = work.glob("cloud-init_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(lib)], check=True)
        shutil.rmtree(work)
    env = {"PYTHONPATH": str(lib / "usr/lib/python3/dist-packages"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["/usr/bin/python3", "-c", CHECK, str(seeddir)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["md"]["local-hostname"] == hostname and got["keys"] == [key] and len(got["macs"]) == 1


@pytest.mark.parametrize("attack", ["huge", "fifo", "root-only symlink", "garbage"])
def test_a_bad_key_file_refuses_the_start_and_changes_nothing(
    kg: Kvmgate, alice: str, images: list[str], source: Path, guest: Path, attack: str
) -> None:
    name = f"seedbad{['huge', 'fifo', 'root-only symlink', 'garbage'].index(attack)}"
    if "bbkeys" not in [x["name"] for x in kg.json("admin", "image", "list")]:  # type: ignore[union-attr,index]
        kg.ok("admin", "image", "add", "bbkeys", str(source), "--cloud-init")
    kg("admin", "delete", name, "--owner", alice)
    kg.ok("admin", "create", name, "--owner", alice, "--image", "bbkeys", "--", *boot_options(guest))
    try:
        keys = home(alice) / ".ssh" / "authorized_keys"
        as_user(alice, ["sh", "-c", "mkdir -p ~/.ssh && rm -f ~/.ssh/authorized_keys ~/.ssh/*.pub"], check=True)
        script = {
            "huge": "head -c 1000000 /dev/zero | tr '\\0' '#' > ~/.ssh/authorized_keys",
            "fifo": "mkfifo ~/.ssh/authorized_keys",
            "root-only symlink": "ln -s /etc/shadow ~/.ssh/authorized_keys",
            "garbage": "printf 'hello world\\n' > ~/.ssh/authorized_keys",
        }[attack]
        as_user(alice, ["sh", "-c", script], check=True)
        before = kg.state_snapshot()
        r = kg("start", name, user=alice, timeout=30)
        assert r.returncode == 3, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "authorized_keys" in r.stderr
        assert "root:" not in r.stderr + r.stdout
        assert kg.state_snapshot() == before
    finally:
        if keys.is_symlink() or keys.exists():
            keys.unlink()
        kg("admin", "delete", name, "--owner", alice, "--force")
        kg("admin", "image", "remove", "bbkeys")
