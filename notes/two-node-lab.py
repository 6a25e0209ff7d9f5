import os, subprocess, sys, tempfile, time
from pathlib import Path
sys.path[:0] = ["src", "."]
from tests.integration.slurm_cluster import Cluster, conf
def sh(*a, check=True): return subprocess.run(a, check=check, capture_output=True, text=True)
d = Path(tempfile.mkdtemp(prefix="kgslurm-", dir="/var/tmp"))
sh("ip", "link", "add", "kgslb0", "type", "bridge"); sh("ip", "addr", "add", "10.99.0.1/24", "dev", "kgslb0"); sh("ip", "link", "set", "kgslb0", "up")
nodes = ["kg-a", "kg-b"]
for i, n in enumerate(nodes):
    ns = f"kgn{i}"
    sh("ip", "netns", "add", ns); sh("ip", "link", "add", f"kgsv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", f"kgsv{i}", "master", "kgslb0", "up")
    sh("ip", "-n", ns, "addr", "add", f"10.99.0.{i+2}/24", "dev", "eth0"); sh("ip", "-n", ns, "link", "set", "eth0", "up"); sh("ip", "-n", ns, "link", "set", "lo", "up")
c = Cluster(d, [])
text = conf(d, os.uname().nodename, [], 26817, 26818).replace(f"SlurmctldHost={os.uname().nodename}", f"SlurmctldHost={os.uname().nodename}(10.99.0.1)")
lines = [l for l in text.splitlines() if not l.startswith("PartitionName")]
for i, n in enumerate(nodes):
    lines.append(f"NodeName={n} NodeAddr=10.99.0.{i+2} NodeHostname={n} Port=26818 CPUs=2 RealMemory=8000 State=UNKNOWN")
lines.append(f"PartitionName=vms Nodes={','.join(nodes)} Default=YES MaxTime=UNLIMITED State=UP")
(d / "slurm.conf").write_text("\n".join(lines) + "\n")
c.nodes = []
try:
    c.start(wait=False)
    for i, n in enumerate(nodes):
        (d / "spool" / n).mkdir(parents=True, exist_ok=True); subprocess.run(["nsenter", f"--net=/run/netns/kgn{i}", "unshare", "--uts", "sh", "-c", f"hostname {n}; exec /usr/sbin/slurmd -f {d}/slurm.conf -N {n}"], check=False, env=c.env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = c.run("sinfo", "-N", "-h", "-o", "%N %t").stdout.split("\n")
        if all(" idle" in x for x in st if x.strip()) and len([x for x in st if x.strip()]) == 2: break
        time.sleep(0.5)
    print(c.run("sinfo", "-N", "-o", "%N %t %E").stdout)
    for n in nodes:
        r = c.run("sbatch", "--parsable", "--uid=1002", "--gid=1002", "-N1", "-n1", "--mem=50M", "--time=UNLIMITED", "--export=NONE", "--chdir=/", "--output=/dev/null", "-w", n, "--wrap=exec sleep 20")
        print(n, "job", r.stdout.strip(), r.stderr.strip()[-200:])
    time.sleep(4)
    print(c.run("squeue", "-o", "%i %u %T %N").stdout)
    j = c.run("squeue", "-h", "-o", "%i", "-w", "kg-b").stdout.split()[0]
    s = c.run("srun", f"--jobid={j}", "--overlap", "-n1", "--export=NONE", "/bin/sh", "-c", "hostname; ip -br addr | grep eth0", user="kvmdemo")
    print("srun as user into kg-b:", s.returncode, s.stdout, s.stderr[-300:])
finally:
    print(open(d / "log" / "slurmd-kg-a.log").read()[-600:] if (d / "log" / "slurmd-kg-a.log").exists() else "no slurmd log"); c.stop()
    for i in range(2):
        for pid in sh("ip", "netns", "pids", f"kgn{i}", check=False).stdout.split(): subprocess.run(["kill", "-9", pid])
        sh("ip", "netns", "del", f"kgn{i}", check=False)
    sh("ip", "link", "del", "kgslb0", check=False)
