"""Translation to QEMU argv: expected command lines per VM definition (kept in
tests/argv/, regenerate with KVMGATE_REGEN=1), and property tests over any input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmgate.errors import PolicyError
from kvmgate.model.policy.policy import ParsedOption, Policy
from kvmgate.model.settings import Forward, Nic
from kvmgate.model.translate import Context, Port, Resource, Seed, base_image, merge, translate

ARGV_DIR = Path(__file__).resolve().parent.parent / "argv"
CTX = Context(accel="kvm", default_disk=None, key="0123456789abcdef01234567")

# name -> (admin options, user options)
DEFINITIONS: dict[str, tuple[list[str], list[str]]] = {
    "minimal": ([], []),
    "note-default-net": (["-m", "256"], []),
    "no-net": (["-m", "256", "-net", "none", "-nographic"], []),
    "user-disks": (
        ["-m", "512"],
        ["-hda", "/home/a/d.qcow2", "-hdb", "/home/a/e.img", "-cdrom", "/home/a/x.iso", "-boot", "d"],
    ),
    "snapshot": (["-m", "256"], ["-hda", "/home/a/d.qcow2", "-snapshot"]),
    "kernel-boot": (["-m", "256", "-nographic"], ["-kernel", "/k", "-initrd", "/i", "-append", "console=ttyS0 a,b"]),
    "floppies-geometry": ([], ["-fda", "/f.img", "-hda", "/h.img", "-hdachs", "100,16,63,lba"]),
    "user-misc": (
        [],
        ["-localtime", "-no-acpi", "-no-reboot", "-loadvm", "snap1", "-vnc", ":3", "-option-rom", "/r.rom"],
    ),
    "admin-misc": (
        [
            "-usb",
            "-usbdevice",
            "tablet",
            "-win2k-hack",
            "-balloon",
            "virtio",
            "-serial",
            "null",
            "-parallel",
            "none",
            "-monitor",
            "none",
            "-no-rtc",
            "-vmchannel",
            "di:org.kvmgate.x,null",
            "-pidfile",
            "/run/p.pid",
        ],
        [],
    ),
    "vlans": (
        [
            "-net",
            "nic,vlan=0,model=e1000",
            "-net",
            "user,vlan=0,hostname=web",
            "-redir",
            "tcp:2222::22",
            "-tftp",
            "/srv/tftp,x",
            "-net",
            "nic,vlan=1,model=virtio",
            "-net",
            "socket,vlan=1,listen=:4000",
            "-net",
            "tap,vlan=1,ifname=kgtap0,script=no",
        ],
        [],
    ),
    "smb": (["-net", "nic", "-net", "user", "-smb", "/srv/share"], []),
    "tap-only": (["-net", "nic", "-net", "tap,ifname=kgtap1,script=no"], []),
    "named-networks": (["-m", "256"], []),
    "vnc-unix": ([], ["-vnc", "1"]),
    "library-overlay": (["-m", "512", "-nographic"], []),
    "library-overlay-snapshot": (["-nographic"], ["-snapshot"]),
}

NICS = (
    Port(Nic("user", "52:54:00:00:00:01")),
    Port(Nic("services", "52:54:00:00:00:02", "kgt7", "10.77.0.2"), "kgsvc0", isolated=True),
    Port(Nic("private", "52:54:00:00:00:03", "kgt8"), "kgp3e8"),
)
# name -> the context it is translated in, where it is not CTX
CONTEXTS = {
    "named-networks": CTX._replace(
        nics=NICS, forwards=(Forward("ssh", 22, 20000), Forward("http", 80, 20001, internal=40000))
    ),
    "vnc-unix": CTX._replace(vnc_socket="/run/kvmgate-display/k/vnc.sock"),
    "library-overlay": CTX._replace(
        default_disk="/s/vms/x/disks/disk0.qcow2",
        base_image=base_image("/s/images", "0" * 32),
        seed=Seed("deb", "kvmgate-0123", "alice"),
        agent=True,
    ),
    "library-overlay-snapshot": CTX._replace(
        default_disk="/s/vms/x/disks/disk0.qcow2",
        base_image=base_image("/s/images", "0" * 32),
        seed=Seed("deb", "kvmgate-0123", "alice"),
    ),
}


def argv_for(admin: list[str], user: list[str], policy: Policy | None = None, ctx: Context = CTX) -> list[str]:
    p = policy or Policy()
    return list(translate(merge(p.parse(admin, "admin"), p.parse(user, "user")), ctx).argv)


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_expected_argv(name: str) -> None:
    admin, user = DEFINITIONS[name]
    got = argv_for(admin, user, ctx=CONTEXTS.get(name, CTX))
    path = ARGV_DIR / f"{name}.json"
    if os.environ.get("KVMGATE_REGEN"):
        path.write_text(json.dumps({"admin": admin, "user": user, "argv": got}, indent=1) + "\n")
    assert got == json.loads(path.read_text())["argv"]


def test_always_nodefaults_sandbox_and_no_hmp() -> None:
    for admin, user in DEFINITIONS.values():
        argv = argv_for(admin, user)
        assert argv[:3] == ["-nodefaults", "-no-user-config", "-machine"]
        assert argv[argv.index("-sandbox") + 1].startswith("on,obsolete=deny,elevateprivileges=deny,spawn=")
        assert "stdio" not in " ".join(argv) and "vc" not in argv
        mons = [argv[i + 1] for i, a in enumerate(argv) if a == "-mon"]
        assert mons == ["chardev=kgqmp,mode=control"]


def test_spawn_allowed_only_for_smb() -> None:
    assert "spawn=allow" in " ".join(argv_for(*DEFINITIONS["smb"]))
    assert all("spawn=deny" in " ".join(argv_for(*d)) for n, d in DEFINITIONS.items() if n != "smb")


def test_admin_values_win() -> None:
    with pytest.raises(PolicyError, match="-boot: fixed by the administrator"):
        argv_for(["-boot", "c"], ["-boot", "d"])


def test_no_kvm_means_tcg() -> None:
    p = Policy.from_dict({"lists": {"admin": ["-no-kvm"]}})
    argv = argv_for(["-no-kvm"], [], p)
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=128", "TCG's cache is bounded"
    plan = translate(merge(p.parse(["-no-kvm", "-m", "256"], "admin"), []), CTX)
    assert plan.tcg and plan.memory_limit_mib == 256 + 128, "and counted in the cgroup's limit"
    assert not translate(merge(p.parse(["-m", "256"], "admin"), []), CTX).tcg


@pytest.mark.parametrize(
    "admin, user, message",
    [
        (["-redir", "tcp:1::2", "-net", "none"], [], "-redir: needs -net user"),
        (["-net", "none", "-net", "user"], [], "none cannot be combined"),
        ([], ["-hdachs", "1,1,1"], "-hdachs: needs hard disk 0"),
    ],
)
def test_translation_refusals(admin: list[str], user: list[str], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        argv_for(admin, user)


# ----------------------------------------------------------------- property tests

USER_OPTS = [n for n, o in Policy().lists.items() if o == "user"]
values = st.one_of(
    st.sampled_from(
        [
            "/home/u/a.img",
            "/x,file.driver=vvfat",
            "fat:rw:/etc",
            "json:{}",
            "c",
            "d",
            ":1",
            "snap1",
            "1,1,1",
            "0.0.0.0:1",
            "-m",
            "--",
            "a\nb",
            "console=ttyS0",
            ":1,websocket=1",
            "c,splash=/x",
            "/home/u/x.qcow2",
            "/dev/fdset/1",
            "/proc/self/fd/3",
        ]
    ),
    st.text(max_size=20),
)
# Short paths (substrings of much of any argv), paths that spell kvmgate's own fd
# references, and paths with characters of QEMU's option and JSON syntax.
paths = st.one_of(
    st.sampled_from(
        ["/", "//", "/.", "/d", "/f", "/1", "/7", "/dev", "/dev/fdset/7", "/proc/self/fd/7", '/a"b', "/a\\b"]
    ),
    st.text(alphabet='/.,=:"\\{}adefv017', max_size=8).map(lambda s: "/" + s),
)
# User files, each option at most once: most such lists are accepted and translated.
files = st.lists(
    st.tuples(st.sampled_from(["-hda", "-hdb", "-cdrom", "-fda", "-fdb", "-kernel", "-initrd", "-option-rom"]), paths),
    max_size=5,
    unique_by=lambda t: t[0],
).map(lambda pairs: [w for pair in pairs for w in pair])
junk = st.lists(
    st.one_of(st.sampled_from([*USER_OPTS, "-m", "-net", "-monitor", "-incoming", "--m", "-S"]), values, paths),
    max_size=12,
)
tokens = st.one_of(junk, files, st.tuples(files, junk).map(lambda t: t[0] + t[1]))
ADMIN = ["-m", "384", "-net", "nic", "-net", "user", "-nographic"]
# Every option the translation of user-list options (plus the admin's) may emit.
ALLOWED_ARGV_OPTIONS = {
    "-nodefaults",
    "-no-user-config",
    "-machine",
    "-accel",
    "-m",
    "-display",
    "-sandbox",
    "-msg",
    "-chardev",
    "-mon",
    "-add-fd",
    "-serial",
    "-vga",
    "-blockdev",
    "-device",
    "-boot",
    "-kernel",
    "-initrd",
    "-append",
    "-readconfig",
    "-option-rom",
    "-loadvm",
    "-rtc",
    "-no-reboot",
    "-vnc",
    "-netdev",
}


# argv options that take no value
FLAG_OPTIONS = {"-nodefaults", "-no-user-config", "-no-reboot", "-usb", "-win2k-hack", "-no-fd-bootchk", "-S"}
PATH_OPTS = ("-hda", "-hdb", "-cdrom", "-fda", "-fdb", "-kernel", "-initrd", "-option-rom")
FD_REF = re.compile(r"/dev/fdset/(\d+)|/proc/self/fd/(\d+)")


@settings(max_examples=400, deadline=None)
@given(tokens)
def test_any_user_input_is_refused_or_safe(user: list[str]) -> None:
    p = Policy()
    try:
        opts = p.parse(user, "user")
        plan = translate(merge(p.parse(ADMIN, "admin"), opts), CTX)
    except PolicyError:
        return
    argv = list(plan.argv)
    # only options the user's list and the admin's options produce
    option_positions = _option_positions(argv)
    assert {argv[i] for i in option_positions} <= ALLOWED_ARGV_OPTIONS
    # the admin's values are intact
    assert argv[argv.index("-m") + 1] == "384" and argv.count("-m") == 1
    # user values appear only where QEMU cannot parse them as its own syntax
    for o in opts:
        raw = o.value.canonical
        if o.spec.parse is None or not raw or o.name in PATH_OPTS:
            continue
        if o.name == "-append":  # on the command line, or in the config QEMU reads by descriptor
            config = "".join(r.text or "" for r in plan.resources if r.kind == "config")
            assert f'append = "{raw}"' in config or argv[argv.index("-append") + 1] == raw
        else:
            assert "," not in raw and "=" not in raw and not raw.startswith("-") and "\n" not in raw
    _paths_reach_qemu_only_as_fds(argv, plan.resources, [o for o in opts if o.name in PATH_OPTS])


def _paths_reach_qemu_only_as_fds(argv: list[str], resources: tuple[Resource, ...], opts: list[ParsedOption]) -> None:
    """No user path is an argv element or a value inside one (keyval parts, JSON
    strings): every file QEMU is told about is /dev/fdset/N or /proc/self/fd/N,
    N a descriptor kvmgate opens itself, and the user's files are exactly those
    descriptors' paths."""
    paths = {o.value.canonical for o in opts}
    fds = {r.fd: r for r in resources}
    fdsets: set[int] = set()
    referenced: set[int] = set()
    for i in _option_positions(argv):
        if argv[i] in FLAG_OPTIONS:
            continue
        opt, value = argv[i], argv[i + 1]
        if opt == "-append":
            continue  # the kernel command line: QEMU hands it to the guest and opens nothing it names
        if opt == "-add-fd":
            kv = dict(part.split("=", 1) for part in value.split(","))
            assert kv["fd"] == kv["set"] and int(kv["fd"]) in fds
            fdsets.add(int(kv["set"]))
        words = _strings(json.loads(value)) if value.startswith("{") else _keyval_words(value)
        for word in [value, *words]:
            ref = FD_REF.fullmatch(word)
            if ref:  # QEMU reads this as a descriptor kvmgate passes, whatever a user's path spells
                n = int(ref[1] or ref[2])
                assert n in fds, word
                if ref[1]:
                    assert n in fdsets, f"{word} before its -add-fd"
                referenced.add(n)
                continue
            assert word not in paths, f"a user path reaches QEMU: {opt} {value}"
            assert not word.startswith("/"), f"a file QEMU would open by name: {opt} {value}"
        if opt == "-readconfig":  # the kernel command line, in a sealed config: one line, one section
            ref = FD_REF.fullmatch(value)
            assert ref and ref[2], value
            text = fds[int(ref[2])].text or ""
            assert fds[int(ref[2])].kind == "config" and text.startswith('[machine]\n  append = "')
            assert text.count("\n") == 2 and text.count('"') == 2 and text.endswith('"\n'), text
        if opt in ("-kernel", "-initrd", "-option-rom"):
            ref = FD_REF.fullmatch(value)
            assert ref and ref[2], value
            assert fds[int(ref[2])].kind == "blob" and fds[int(ref[2])].of == opt.lstrip("-")
        if opt == "-blockdev":
            node = json.loads(value)
            if node["driver"] == "file":
                ref = FD_REF.fullmatch(node["filename"])
                assert ref and ref[1], value
                assert fds[int(ref[1])].kind in ("disk", "overlay")
    # every user file is a descriptor QEMU is told about, opened from exactly that path
    files = [r for r in resources if r.kind in ("disk", "blob")]
    assert all(r.fd in referenced for r in files)
    assert sorted((r.of, r.path) for r in files) == sorted((o.name.lstrip("-"), o.value.canonical) for o in opts)


def _strings(obj: object) -> list[str]:
    """Every key and string value in a JSON document."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [w for k, v in obj.items() for w in (k, *_strings(v))]
    if isinstance(obj, list):
        return [w for v in obj for w in _strings(v)]
    return []


def _keyval_words(value: str) -> list[str]:
    """The parts of QEMU's `a,b=c,d=e,,f` syntax as QEMU reads them (",," is a
    literal comma), and each part's value."""
    parts = [p.replace("\0", ",") for p in value.replace(",,", "\0").split(",")]
    return [w for part in parts for w in (part, *part.split("=", 1)[1:])]


def _option_positions(argv: list[str]) -> list[int]:
    """Indices of option tokens: every option in our argv takes exactly one value
    except the known flags."""
    out, i = [], 0
    while i < len(argv):
        out.append(i)
        i += 1 if argv[i] in FLAG_OPTIONS else 2
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["-hda", "-hdb", "-cdrom", "-fda", "-kernel", "-initrd", "-option-rom"]), max_size=5),
    st.text(min_size=1, max_size=30),
)
def test_files_become_fds(opts: list[str], name: str) -> None:
    user: list[str] = []
    for o in dict.fromkeys(opts):
        user += [o, "/home/u/" + name.replace("\0", "")]
    p = Policy()
    try:
        plan = translate(merge([], p.parse(user, "user")), CTX)
    except PolicyError:
        return
    fds = plan.fds()
    assert fds == list(range(3, 3 + len(fds))), "fd numbers are dense from 3"
    paths = [r.path for r in plan.resources if r.kind in ("disk", "blob")]
    assert sorted(paths) == sorted(p.parse(user, "user")[i].value.canonical for i in range(len(paths)))


@pytest.mark.parametrize(
    "family, recorded, expected",
    [
        ([], "pc-i440fx-7.2", "pc-i440fx-7.2"),
        ([], "7.2", "pc-i440fx-7.2"),  # a record from before machine types were recorded
        (["-M", "q35"], "7.2", "pc-q35-7.2"),
        (["-M", "q35"], "pc-q35-10.0", "pc-q35-10.0"),
    ],
)
def test_a_restore_starts_the_machine_type_the_state_was_saved_with(
    family: list[str], recorded: str, expected: str
) -> None:
    p = Policy.from_dict({"lists": {"admin": ["-M"]}})
    plan = translate(merge(p.parse([*family, "-m", "256"], "admin"), []), CTX._replace(incoming=True, machine=recorded))
    assert plan.argv[plan.argv.index("-machine") + 1] == expected
    assert "-incoming" in plan.argv


@pytest.mark.parametrize(
    "family, recorded",
    [([], "pc-q35-7.2"), (["-M", "q35"], "pc-i440fx-7.2"), ([], "pc"), ([], "pc-i440fx-7.2,accel=kvm"), ([], "x")],
)
def test_a_recorded_machine_type_of_another_family_or_shape_is_refused(family: list[str], recorded: str) -> None:
    p = Policy.from_dict({"lists": {"admin": ["-M"]}})
    with pytest.raises(PolicyError, match="machine type"):
        translate(merge(p.parse([*family, "-m", "256"], "admin"), []), CTX._replace(incoming=True, machine=recorded))


def test_the_policys_qemu_data_directories_become_minus_L() -> None:
    dirs = ["/var/cache/q/usr/share/qemu", "/var/cache/q/usr/share/seabios"]
    p = Policy.from_dict({"qemu": "/var/cache/q/usr/bin/qemu-system-x86_64", "qemu_data": dirs})
    argv = translate(merge(p.parse(["-m", "256"], "admin"), []), CTX._replace(data_dirs=p.qemu_data)).argv
    assert [argv[i + 1] for i, t in enumerate(argv) if t == "-L"] == dirs
    for bad in (["relative"], ["/a/../b"], ["/a,b"], "/a", [f"/d{i}" for i in range(9)]):
        with pytest.raises(PolicyError, match="qemu_data"):
            Policy.from_dict({"qemu_data": bad})


def test_a_clusters_cpu_model_is_every_vms() -> None:
    """[backend] cpu_model: one CPU model on every node, so a saved state restores on any."""
    p = Policy.from_dict({})
    plan = translate(merge(p.parse(["-m", "256"], "admin"), []), CTX._replace(cpu="Haswell-noTSX"))
    assert plan.argv[plan.argv.index("-cpu") + 1] == "Haswell-noTSX"
    assert "-cpu" not in translate(merge(p.parse(["-m", "256"], "admin"), []), CTX).argv
