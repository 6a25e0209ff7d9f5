"""The admin's network vocabulary (policy/network.py), allocation (allocate.py) and
the host rules' text (hostnet.py): pure, so checked here without touching the host,
except that the generated ruleset is given to `nft --check` where nft exists."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmgate.errors import PolicyError
from kvmgate.model import allocate, hostnet
from kvmgate.model.policy.network import Ports, Subnet, parse, parse_forwards
from kvmgate.model.policy.policy import Policy
from kvmgate.model.settings import Forward, Nic
from kvmgate.model.translate import Context, Port, merge, translate

SERVICES = {"type": "services", "bridge": "kgsvc1", "subnet": "10.9.0.0/24"}


def test_defaults_name_three_networks() -> None:
    net = Policy().net
    assert {n: v.kind for n, v in net.networks.items()} == {
        "user": "user",
        "private": "private",
        "services": "services",
    }
    assert net.ports == Ports() and net.ports.bind == "127.0.0.1" and net.ports.protect
    assert net.vnc == "unix"


def test_private_bridges_are_per_owner_and_fit_ifnamsiz() -> None:
    priv = Policy().net.networks["private"]
    assert priv.bridge_for("kg", 1000) != priv.bridge_for("kg", 1001)
    assert len(priv.bridge_for("abcd", 0xFFFFFFFF)) <= 15


@pytest.mark.parametrize(
    "data, message",
    [
        ({"networks": {"s": {**SERVICES, "bridge": "averyveryverylongbr"}}}, "longer than 15 characters (IFNAMSIZ)"),
        ({"networks": {"s": {**SERVICES, "bridge": "br-0"}}}, "must be an interface name"),
        ({"networks": {"s": {**SERVICES, "subnet": "10.9.0.1/24"}}}, "host bits set"),
        ({"networks": {"s": {**SERVICES, "subnet": "10.9.0.0/30"}}}, "between 16 and 29"),
        ({"networks": {"s": SERVICES, "t": {**SERVICES, "bridge": "kgsvc2", "subnet": "10.9.0.128/25"}}}, "overlaps"),
        ({"networks": {"s": SERVICES, "t": SERVICES}}, "is also networks.s's bridge"),
        ({"networks": {"s": {**SERVICES, "bridge": "kgt0"}}}, "kvmgate's own names"),
        ({"networks": {"user": {"type": "private"}}}, "cannot be redefined"),
        ({"networks": {"p": {"type": "private", "bridge": "x"}}}, "only services networks"),
        ({"networks": {"p": {"type": "vde"}}}, "type must be one of"),
        ({"networks": {"Bad": {"type": "private"}}}, "names are"),
        ({"ports": {"pool": [80, 90]}}, "within 1024..65535"),
        ({"ports": {"pool": [40000, 40010]}}, "overlap"),
        ({"ports": {"bind": "10.0.0.1"}}, "ports.bind"),
        ({"ports": {"protect": "yes"}}, "true or false"),
        ({"ports": {"range": [1, 2]}}, "unknown key ports.range"),
        ({"vnc": {"mode": "public"}}, "vnc.mode"),
        ({"host": {"ifprefix": "kvmgate"}}, "1 to 4 lowercase letters"),
    ],
)
def test_bad_network_policy_is_refused(data: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Policy.from_dict(data)


def test_networks_table_replaces_the_defaults_but_user_stays() -> None:
    net = parse({"networks": {"lab": SERVICES}})
    assert set(net.networks) == {"user", "lab"}
    assert str(net.networks["lab"].subnet) == "10.9.0.0/24" and net.networks["lab"].subnet.gateway == "10.9.0.1"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("ssh", [("ssh", 22, None)]),
        ("ssh,http@20080", [("ssh", 22, None), ("http", 80, 20080)]),
        ("web=8080", [("web", 8080, None)]),
        ("8081@20001", [("tcp8081", 8081, 20001)]),
        ("none", []),
    ],
)
def test_forward_specs(spec: str, expect: list) -> None:
    assert [tuple(f) for f in parse_forwards(spec, Ports())] == expect


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ssh@80", "within the pool 20000-20999"),
        ("ssh@30000", "within the pool"),
        ("gopher", "use a service"),
        ("x=0", "use a service"),
        ("x=70000", "use a service"),
        ("ssh,ssh", "given twice"),
        ("ssh@", "within the pool"),
    ],
)
def test_bad_forward_specs(spec: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_forwards(spec, Ports())


@given(st.sets(st.integers(20000, 20010)), st.sets(st.integers(0, 30)))
def test_first_free_is_the_lowest_free(taken: set[int], unusable: set[int]) -> None:
    pool = range(20000, 20011)
    free = [p for p in pool if p not in taken and p - 20000 not in unusable]
    if not free:
        with pytest.raises(allocate.Exhausted):
            allocate.first_free(pool, taken, lambda p: p - 20000 not in unusable)
    else:
        assert allocate.first_free(pool, taken, lambda p: p - 20000 not in unusable) == free[0]


@given(
    st.text("0123456789abcdef", min_size=24, max_size=24), st.integers(0, 7), st.sets(st.text(min_size=17, max_size=17))
)
def test_macs_are_unicast_local_and_avoid_taken(key: str, index: int, taken: set[str]) -> None:
    m = allocate.mac(key, index, taken)
    assert m.startswith("52:54:00:") and m not in taken
    assert allocate.mac(key, index, taken) == m  # deterministic
    assert allocate.mac(key, index, taken | {m}) != m


@given(st.sets(st.integers(0, 50)))
def test_tap_names_are_unique_and_fit(taken: set[int]) -> None:
    names = {f"kgt{n}" for n in taken} | {"kgsvc0", "kgtx", "eth0"}
    t = allocate.tap("kg", names)
    assert t not in names and len(t) <= 15 and t.startswith("kgt")


def test_subnet_hosts_skip_network_gateway_broadcast() -> None:
    s = Subnet.parse("10.1.2.0/29")
    assert [h & 7 for h in s.hosts()] == [2, 3, 4, 5, 6]


TAPS = [hostnet.TapRule("kgt0", "52:54:00:00:00:01", "10.77.0.2"), hostnet.TapRule("kgt1", "52:54:00:00:00:02", None)]
PORTS = [hostnet.PortRule(20000, (1001,)), hostnet.PortRule(40000, (999,))]


def test_ruleset_names_every_tap_mac_address_and_port() -> None:
    text = hostnet.ruleset("kvmgate_kg", ["kgsvc0", "kgp3e8"], TAPS, PORTS)
    for needle in ('"kgt0" . 52:54:00:00:00:01', '"kgt0" . 10.77.0.2', "20000 . 1001", "40000 . 999", '"kgp3e8"'):
        assert needle in text
    assert '"kgt1" . 10' not in text  # private NICs have no kvmgate address: MAC checks only
    # DHCP speaks for its payload's MAC: it must be the tap's own (a DECLINE for another VM's is dropped).
    assert 'iifname "kgt0" @th,288,48 != 0x525400000001 drop' in text and '"kgt1" @th' not in text
    assert text.startswith("table bridge kvmgate_kg {}\ndelete table bridge kvmgate_kg\n")  # one atomic replacement


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")
@pytest.mark.parametrize("taps, ports", [(TAPS, PORTS), ([], [])])
def test_ruleset_is_valid_nftables(taps: list, ports: list) -> None:
    text = hostnet.ruleset("kvmgate_unit", ["kgsvc0"], taps, ports)
    r = subprocess.run(["nft", "--check", "-f", "-"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dnsmasq_serves_dhcp_only_and_only_known_macs() -> None:
    net = Policy().net.networks["services"]
    argv = hostnet.dnsmasq_argv("/usr/sbin/dnsmasq", net, "/run/x.pid", "/run/x.hosts")
    assert "--port=0" in argv and "--interface=kgsvc0" in argv and "--bind-interfaces" in argv
    assert "--dhcp-range=10.77.0.0,static,255.255.255.0,12h" in argv and "--user=nobody" in argv
    assert hostnet.dhcp_hosts([("52:54:00:00:00:02", "10.77.0.3"), ("52:54:00:00:00:01", "10.77.0.2")]) == (
        "52:54:00:00:00:01,10.77.0.2\n52:54:00:00:00:02,10.77.0.3\n"
    )


def _argv(admin: list[str], ctx: Context) -> list[str]:
    p = Policy()
    return list(translate(merge(p.parse(admin, "admin"), []), ctx).argv)


CTX = Context(accel="tcg", key="0" * 24)


def test_named_networks_refuse_legacy_net() -> None:
    with pytest.raises(PolicyError, match="-net: this VM is on named networks"):
        _argv(["-net", "nic"], CTX._replace(nics=(Port(Nic("user", "52:54:00:00:00:01")),)))


def test_forwards_need_a_user_network() -> None:
    ctx = CTX._replace(
        nics=(Port(Nic("services", "52:54:00:00:00:01", "kgt0"), "kgsvc0"),), forwards=(Forward("ssh", 22, 20000),)
    )
    with pytest.raises(PolicyError, match="--forward: needs the user network"):
        _argv([], ctx)
    with pytest.raises(PolicyError, match="--forward: needs the user network"):
        _argv(["-net", "none"], CTX._replace(forwards=(Forward("ssh", 22, 20000),)))


def test_taps_are_resources_with_their_bridge() -> None:
    p = Policy()
    nics = (
        Port(Nic("services", "52:54:00:00:00:01", "kgt0"), "kgsvc0", True),
        Port(Nic("private", "52:54:00:00:00:02", "kgt1"), "kgp1"),
    )
    plan = translate(merge(p.parse([], "admin"), []), CTX._replace(nics=nics))
    taps = [r for r in plan.resources if r.kind == "tap"]
    assert [(r.path, r.bridge, r.isolated) for r in taps] == [("kgt0", "kgsvc0", True), ("kgt1", "kgp1", False)]
    assert all(f"fd={r.fd}" in " ".join(plan.argv) for r in taps)
    assert "/dev/net/tun" not in " ".join(plan.argv)


@given(st.sampled_from(["1", "5", "99"]), st.booleans())
def test_vnc_never_listens_publicly(display: str, unix: bool) -> None:
    p = Policy()
    ctx = CTX._replace(vnc_socket="/run/kvmgate-display/k/vnc.sock" if unix else None)
    argv = list(translate(merge(p.parse([], "admin"), p.parse(["-vnc", display], "user")), ctx).argv)
    v = argv[argv.index("-vnc") + 1]
    assert v.startswith("unix:") if unix else (v.startswith("127.0.0.1:") and v.endswith(",password=on"))


@pytest.mark.parametrize(
    "nic",
    [
        {"network": "services", "mac": "52:54:00:00:00:01", "tap": "kgt0\nlink del eth0", "ip": "10.77.0.2"},
        {"network": "services", "mac": "52:54:00:00:00:01", "tap": 'kgt0" } ; flush ruleset ; {', "ip": None},
        {"network": "services", "mac": "52:54:00:00:00:01,10.0.0.1\nff", "tap": "kgt0", "ip": None},
        {"network": "services", "mac": "52:54:00:00:00:01", "tap": "kgt0", "ip": "10.77.0.2,set:x"},
        {"network": "services", "mac": "52:54:00:00:00:01", "tap": "kgt0"},
    ],
)
def test_settings_that_could_inject_into_ip_nft_or_dnsmasq_are_corrupt(tmp_path: Path, nic: dict) -> None:
    from kvmgate.errors import KvmgateError
    from kvmgate.model.identity import Identity
    from kvmgate.store import registry

    vm = registry.VM(Identity("alice", "vm", ()), str(tmp_path), str(tmp_path))
    (tmp_path / "settings.json").write_text(json.dumps({"nics": [nic]}))
    with pytest.raises(KvmgateError, match="corrupt settings"):
        registry.read_settings(vm)


@given(st.integers(0, 2**32 - 1))
def test_ipv4_round_trip(n: int) -> None:
    from kvmgate.model.policy.network import int_to_ip, ip_to_int

    assert ip_to_int(int_to_ip(n)) == n


@pytest.mark.parametrize(
    "text", ["1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.-4", "\u0661.2.3.4", "a.b.c.d", ""]
)
def test_bad_ipv4_is_refused(text: str) -> None:
    from kvmgate.model.policy.network import ip_to_int

    with pytest.raises(ValueError):
        ip_to_int(text)


def test_redirs_are_read_from_the_admin_tokens() -> None:
    tokens = ["-m", "256", "-redir", "tcp:21000::22", "-append", "redir", "-redir", "udp:21001:10.0.2.15:53"]
    assert [(r.proto, r.host_port, r.guest_port) for r in hostnet.redirs(tokens)] == [
        ("tcp", 21000, 22),
        ("udp", 21001, 53),
    ]


SPANNING = {**SERVICES, "vxlan": 42, "peers": ["192.168.5.11", "192.168.5.12"]}
TUNNEL = hostnet.Tunnel("kgv2a", 789, ("192.168.5.12",), "10.9.0.1")


def test_a_services_network_spans_the_nodes_through_vxlan() -> None:
    net = parse({"networks": {"svc": SPANNING}}).networks["svc"]
    assert (net.vxlan, net.peers, net.vxlan_port, net.tunnel("kg")) == (
        42,
        ("192.168.5.11", "192.168.5.12"),
        789,
        "kgv2a",
    )
    assert parse({"networks": {"svc": SERVICES}}).networks["svc"].tunnel("kg") is None
    bad = [
        {"vxlan": 0, "peers": ["1.2.3.4", "1.2.3.5"]},
        {"vxlan": 1 << 24, "peers": ["1.2.3.4", "1.2.3.5"]},
        {"vxlan": 1, "peers": ["1.2.3.4"]},
        {"vxlan": 1, "peers": ["1.2.3.4", "1.2.3.4"]},
        {"vxlan": 1, "peers": ["1.2.3.4", "10.9.0.7"]},  # inside the network's own subnet
        {"vxlan": 1, "peers": ["1.2.3.4", "1.2.3.5; drop"]},
        {"vxlan": 1, "peers": ["1.2.3.4", "01.2.3.5"]},
        {"vxlan": 1, "peers": ["1.2.3.4", "1.2.3.5"], "vxlan_port": 4789},  # any user could bind it
        {"vxlan": 1, "peers": ["1.2.3.4", "1.2.3.5"], "vxlan_port": 1023},
        {"peers": ["1.2.3.4", "1.2.3.5"]},
        {"vxlan": True, "peers": ["1.2.3.4", "1.2.3.5"]},
    ]
    for extra in bad:
        with pytest.raises(PolicyError):
            parse({"networks": {"svc": {**SERVICES, **extra}}})
    with pytest.raises(PolicyError, match="one per network"):
        parse({"networks": {"a": SPANNING, "b": {**SPANNING, "bridge": "kgsvc2", "subnet": "10.10.0.0/24"}}})
    with pytest.raises(PolicyError, match="only services"):
        parse({"networks": {"p": {"type": "private", "vxlan": 3}}})


def test_a_tunnel_reaches_user_vms_only_from_service_vms_and_only_root_sends_into_it() -> None:
    taps = [*TAPS, hostnet.TapRule("kgt7", "52:54:00:00:00:07", "10.9.0.7", user=True),
            hostnet.TapRule("kgt8", "52:54:00:00:00:08", "10.9.0.8", service=True)]  # fmt: skip
    text = hostnet.ruleset("kvmgate_kg", ["kgsvc1"], taps, PORTS, [TUNNEL])
    assert "iifname @tunnels oifname @usertaps ether saddr != @servicemacs drop" in text
    assert 'set usertaps { type ifname; elements = { "kgt7" } }' in text
    assert "set servicemacs { type ether_addr; elements = { 52:54:00:00:00:08 } }" in text
    assert "udp dport @vxlanports ip saddr != @peers drop" in text and "elements = { 192.168.5.12 }" in text
    assert "udp dport @vxlanports meta skuid != 0 drop" in text
    assert "udp dport @vxlanports udp sport >= 1024 drop" in text
    assert "oifname @tunnels drop" in text and "ether type ip udp dport { 67, 68 } drop" in text
    assert "--dhcp-option=26,1450" in hostnet.dnsmasq_argv(
        "dnsmasq", parse({"networks": {"svc": SPANNING}}).networks["svc"], "/p", "/h"
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")
def test_a_ruleset_with_tunnels_is_valid_nftables() -> None:
    taps = [hostnet.TapRule("kgt7", "52:54:00:00:00:07", "10.9.0.7", user=True)]
    for tunnels in ([TUNNEL], [TUNNEL, TUNNEL._replace(dev="kgv2b", port=4790, gateway="10.10.0.1")]):
        text = hostnet.ruleset("kvmgate_unit", ["kgsvc1"], taps, PORTS, tunnels)
        r = subprocess.run(["nft", "--check", "-f", "-"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
