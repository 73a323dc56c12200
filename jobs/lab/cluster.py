"""A cluster on one machine: hosts in network namespaces on one switch, shaped links, and a shared file system
served over the network, for tests and benchmarks that need what loopback hides.

    python -m pervade.jobs.lab.cluster up --dir /tmp/lab --compute 4            # prints the hosts, then returns
    python -m pervade.jobs.lab.cluster exec --dir /tmp/lab compute-0 -- pervade worker --broker ...
    python -m pervade.jobs.lab.cluster cut --dir /tmp/lab compute-0                 # heal: the same, ``heal``
    python -m pervade.jobs.lab.cluster down --dir /tmp/lab

What it builds (root only; the Debian packages it needs are installed on first use, like the Slurm lab's):

- a *switch*: a namespace of its own holding a Linux bridge, so nothing of the lab touches this machine's own
  network, and two labs never see each other;
- hosts: ``login`` (broker, sink, producers), ``storage`` (the file server) and ``compute-N``, each a network
  namespace with one interface, ``eth0``, on a private address (10.231.0.0/24 inside the lab only), joined
  to the bridge by a veth pair: the host's *link*;
- each link shaped both ways (``LinkShape``): bandwidth with ``tc tbf`` on both ends of the veth, loss with
  an iptables ``statistic`` rule, and delay by an NFQUEUE rule and ``netdelay.py`` (kernels built without
  netem, this VM's among them, have no delay qdisc). A packet between two hosts crosses both their links;
- the shared file system: an sshd in the storage namespace serves ``export/`` (the storage host's disk),
  and every other host mounts it with sshfs at one path, ``shared/``, each in a mount namespace of its own,
  so every host's reads cross its own link and the storage link. FUSE drops a file's cached pages at each
  open (sshfs is mounted without ``kernel_cache``), so every model load from the origin is a network read
  (measured: a second read of a 200 MB file runs at the link's rate, not the page cache's);
- ``cut`` takes a host's link down at the switch (no packet passes, no connection is told: a partition),
  ``heal`` brings it back.

A process runs on a host through ``Host.command`` (``nsenter`` into the host's network and mount namespaces:
it sees this machine's files, its host's network and its host's mount of the shared file system). ``stop``
ends every process the lab started, by pid, and any other left in its namespaces, unmounts, and removes the
namespaces. What it cannot emulate: CPU and memory are this machine's, shared by every host; a parallel file
system's metadata servers and striping; a multi-switch topology (one bridge joins everyone).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pervade.errors import PervadeError

#: The lab's subnet: private, and reachable only inside the lab's own switch namespace.
SUBNET = "10.231.0"
LOGIN, STORAGE = "login", "storage"
#: Commands the lab runs, and the Debian package of each (installed when missing).
PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "sshfs": "sshfs", "iptables": "iptables",
            "nsenter": "util-linux", "tc": "iproute2"}  # fmt: skip
COMMAND_TIMEOUT_S = 30
INSTALL_TIMEOUT_S = 600
#: Seconds a mount or a delayer of the lab may take to come up.
START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 10
#: The NFQUEUE number each host's delay rule uses (every host has its own netfilter: no clash).
DELAY_QUEUE = 0
STATE_FILE = "lab.json"


@dataclass(frozen=True)
class LinkShape:
    """A host's link to the switch, shaped alike both ways. Rates in megabits per second (None: as fast as the
    machine goes), delay in milliseconds added each way, loss in percent of packets dropped each way."""

    rate_mbit: float | None = 10_000
    delay_ms: float = 0.0
    loss_pct: float = 0.0

    def check(self) -> LinkShape:
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise PervadeError(f"a link's rate must be positive, not {self.rate_mbit} Mbit/s")
        if self.delay_ms < 0 or not 0 <= self.loss_pct < 100:
            raise PervadeError(f"a link's delay must be >= 0 ms and its loss in [0, 100) %: {self}")
        return self


@dataclass(frozen=True)
class LabConfig:
    """A lab's hosts and links. The defaults are a small cluster's: a 1 Gb/s storage link that every reader of
    the shared file system shares, 10 Gb/s between hosts, 0.2 ms each way on every link."""

    compute_hosts: int = 4
    storage_link: LinkShape = LinkShape(rate_mbit=1_000)
    host_link: LinkShape = LinkShape()

    def __post_init__(self) -> None:
        if not 1 <= self.compute_hosts <= 200:
            raise PervadeError(f"a lab has 1 to 200 compute hosts, not {self.compute_hosts}")
        self.storage_link.check()
        self.host_link.check()


@dataclass(frozen=True)
class Host:
    """One host of the lab: its address, its network namespace, the switch port its link ends in, and the mount
    namespace in which it sees the shared file system (None for the storage host, which serves it)."""

    name: str
    address: str
    netns: str
    port: str
    mount_ns: str | None

    def command(self, *argv: str) -> list[str]:
        """``argv`` as run on this host: in its network namespace, and its mount namespace if it has one."""
        enter = ["nsenter", f"--net=/run/netns/{self.netns}"]
        if self.mount_ns is not None:
            enter.append(f"--mount={self.mount_ns}")
        return [*enter, "--", *argv]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        raise PervadeError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()}")
    return done


def ensure_packages() -> None:
    """Install the Debian packages of any missing command (apt-get, as root)."""
    missing = sorted({package for command, package in PACKAGES.items() if shutil.which(command) is None})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(step, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise PervadeError(f"installing {', '.join(missing)} failed: {done.stderr.strip()[-500:]}")


def why_not_here() -> str | None:
    """Why a lab cannot be built on this machine (None: it can)."""
    if os.geteuid() != 0:
        return "the cluster lab needs root (network namespaces, tc, mounts); CI runs as root"
    if not Path("/dev/fuse").exists():
        return "the cluster lab needs FUSE (/dev/fuse) for its shared file system"
    return None


@dataclass
class ClusterLab:
    """A running lab: its hosts by name, its directory, and the pids of the processes it started."""

    root: Path
    config: LabConfig
    tag: str
    hosts: dict[str, Host] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def switch(self) -> str:
        return f"{self.tag}-switch"

    @property
    def login(self) -> Host:
        return self.hosts[LOGIN]

    @property
    def storage(self) -> Host:
        return self.hosts[STORAGE]

    @property
    def compute(self) -> list[Host]:
        return [self.hosts[f"compute-{i}"] for i in range(self.config.compute_hosts)]

    @property
    def export_dir(self) -> Path:
        """The storage host's disk: files written here are served to every host at ``shared_dir``."""
        return self.root / "export"

    @property
    def shared_dir(self) -> Path:
        """Where every host but the storage host sees the shared file system."""
        return self.root / "shared"

    def on_shared(self, exported: Path) -> Path:
        """The path on the shared file system of a file or directory under ``export_dir``."""
        return self.shared_dir / exported.resolve().relative_to(self.export_dir.resolve())

    # -- building ------------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: LabConfig | None = None, root: Path | None = None) -> ClusterLab:
        """Build the lab under ``root`` (a fresh temporary directory by default); PervadeError if it cannot,
        after undoing whatever it had built."""
        reason = why_not_here()
        if reason is not None:
            raise PervadeError(reason)
        ensure_packages()
        root = Path(root) if root is not None else Path(f"/tmp/pervade-lab-{secrets.token_hex(3)}")
        root.mkdir(parents=True, exist_ok=True)
        lab = cls(root=root.resolve(), config=config or LabConfig(), tag=f"pvl{secrets.token_hex(3)}")
        try:
            lab._build()
        except BaseException:
            lab.stop()
            raise
        return lab

    def _build(self) -> None:
        for sub in ("export", "shared", "ns", "ssh", "logs"):
            (self.root / sub).mkdir(exist_ok=True)
        names = [LOGIN, STORAGE] + [f"compute-{i}" for i in range(self.config.compute_hosts)]
        addresses = [f"{SUBNET}.1", f"{SUBNET}.2"] + [f"{SUBNET}.{10 + i}" for i in range(self.config.compute_hosts)]
        for index, (name, address) in enumerate(zip(names, addresses, strict=True)):
            mount_ns = None if name == STORAGE else str(self.root / "ns" / f"{name}.mnt")
            self.hosts[name] = Host(name, address, f"{self.tag}-{name}", f"p{index}", mount_ns)
        self._save()  # from here on, `down` can undo what was built
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        for device in ("lo", "br0"):
            _run("ip", "-n", self.switch, "link", "set", device, "up")
        for host in self.hosts.values():
            self._add_host(host)
        self._start_file_server()
        self._mount_shared()
        self._save()

    def _add_host(self, host: Host) -> None:
        _run("ip", "netns", "add", host.netns)
        _run(
            "ip",
            "-n",
            self.switch,
            "link",
            "add",
            host.port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.netns,
        )
        _run("ip", "-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        for device in ("lo", "eth0"):
            _run("ip", "-n", host.netns, "link", "set", device, "up")
        self.shape(host.name, self.config.storage_link if host.name == STORAGE else self.config.host_link)

    def shape(self, host_name: str, link: LinkShape) -> None:
        """Shape a host's link (at start, or again while the lab runs: a benchmark's storage bandwidths)."""
        host = self.hosts[host_name]
        link.check()
        for namespace, device in ((host.netns, "eth0"), (self.switch, host.port)):
            _run("tc", "-n", namespace, "qdisc", "del", "dev", device, "root", check=False)
            if link.rate_mbit is not None:
                # the bucket holds 10 ms at the rate, and never less than two 64 KiB segments (veth passes GSO
                # segments whole: a bucket smaller than one would drop it)
                burst = max(int(link.rate_mbit * 1e6 / 8 / 100), 131_072)
                _run("tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", "rate", f"{link.rate_mbit}mbit",
                     "burst", str(burst), "latency", "200ms")  # fmt: skip
        self._filter(host, link)

    def _filter(self, host: Host, link: LinkShape) -> None:
        """Loss and delay: iptables rules on the host's eth0, both ways, and its delaying process."""
        iptables = ["nsenter", f"--net=/run/netns/{host.netns}", "iptables", "-w"]
        for chain in ("INPUT", "OUTPUT"):
            _run(*iptables, "-F", chain)
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            if link.loss_pct > 0:
                _run(*iptables, "-A", chain, direction, "eth0", "-m", "statistic", "--mode", "random",
                     "--probability", f"{link.loss_pct / 100:.6f}", "-j", "DROP")  # fmt: skip
            if link.delay_ms > 0:
                _run(*iptables, "-A", chain, direction, "eth0", "-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE),
                     "--queue-bypass")  # fmt: skip
        name = f"netdelay-{host.name}"
        self._stop_pid(name)
        if link.delay_ms > 0:
            ready = self.root / "logs" / f"{name}.ready"
            ready.unlink(missing_ok=True)
            delayer = [sys.executable, "-m", "pervade.jobs.lab.netdelay", "--queue", str(DELAY_QUEUE),
                       "--delay-ms", str(link.delay_ms), "--ready-file", str(ready)]  # fmt: skip
            self._spawn(name, ["nsenter", f"--net=/run/netns/{host.netns}", *delayer])
            # until the delayer has bound its queue, the rule's bypass passes packets undelayed
            self._wait_for(lambda: ready.exists(), name, f"{host.name}'s delayer did not start")

    def _start_file_server(self) -> None:
        ssh = self.root / "ssh"
        for key in ("host_key", "client_key"):
            if not (ssh / key).exists():
                _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / key))
        (ssh / "authorized_keys").write_text((ssh / "client_key.pub").read_text())
        (ssh / "sshd_config").write_text("\n".join([
            f"ListenAddress {self.storage.address}:22", f"HostKey {ssh / 'host_key'}",
            f"AuthorizedKeysFile {ssh / 'authorized_keys'}", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "Subsystem sftp internal-sftp", "Ciphers aes128-gcm@openssh.com", "Compression no", "MaxStartups 256",
            "PidFile none", "",
        ]))  # fmt: skip
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self._spawn("sshd", self.storage.command("/usr/sbin/sshd", "-D", "-e", "-f", str(ssh / "sshd_config")))
        # sshfs does not retry its first connection: mounting before sshd listens fails with "connection refused"
        self._wait_for(self._sshd_listening, "sshd", "the storage host's sshd did not start")

    def _sshd_listening(self) -> bool:
        listening = _run(*self.storage.command("ss", "-H", "-l", "-t", "-n", "sport = :22"), check=False).stdout
        return f"{self.storage.address}:22" in listening

    def _mount_shared(self) -> None:
        """A mount namespace per host (kept by a bind mount under ns/, which must not propagate), and in it the
        storage host's export mounted with sshfs at shared/."""
        ns = self.root / "ns"
        _run("mount", "--bind", str(ns), str(ns))
        _run("mount", "--make-private", str(ns))
        ssh = self.root / "ssh"
        options = ",".join([
            "ro", "reconnect", f"IdentityFile={ssh / 'client_key'}", "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null", "LogLevel=ERROR", "Ciphers=aes128-gcm@openssh.com", "ServerAliveInterval=5",
        ])  # fmt: skip
        mounting = [host for host in self.hosts.values() if host.mount_ns is not None]
        for host in mounting:
            Path(host.mount_ns).touch()
            _run("unshare", f"--mount={host.mount_ns}", "--propagation", "private", "true")
            source = f"root@{self.storage.address}:{self.export_dir}"
            self._spawn(f"sshfs-{host.name}", host.command("sshfs", "-f", source, str(self.shared_dir), "-o", options))
        for host in mounting:
            self._wait_for(functools.partial(self._mounted, host), f"sshfs-{host.name}",
                           f"{host.name} could not mount the shared file system")  # fmt: skip

    def _mounted(self, host: Host) -> bool:
        fstype = _run(*host.command("findmnt", "-n", "-o", "FSTYPE", str(self.shared_dir)), check=False).stdout
        return fstype.strip() == "fuse.sshfs"

    def _wait_for(self, condition: Callable[[], bool], name: str, failure: str) -> None:
        """Poll ``condition`` while the lab's process ``name`` lives; PervadeError with its log if it never holds."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline or not self._alive(name):
                log = (self.root / "logs" / f"{name}.log").read_text(errors="replace")
                raise PervadeError(f"{failure}: {log.strip()[-500:]}")
            time.sleep(0.05)

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / "logs" / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        self.pids[name] = process.pid
        self._save()

    def _alive(self, name: str) -> bool:
        pid = self.pids.get(name)
        if pid is None:
            return False
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (a lab reloaded by `down`): is the pid there at all?
            return Path(f"/proc/{pid}").exists()
        return finished == 0

    # -- running -------------------------------------------------------------------------------------------------

    def cut(self, host_name: str) -> None:
        """Take a host's link down at the switch: nothing reaches it or leaves it, and nobody is told."""
        _run("ip", "-n", self.switch, "link", "set", self.hosts[host_name].port, "down")

    def heal(self, host_name: str) -> None:
        _run("ip", "-n", self.switch, "link", "set", self.hosts[host_name].port, "up")

    def link_bytes(self, host_name: str) -> dict[str, int]:
        """Bytes the host has sent and received on its link (its eth0's counters)."""
        host = self.hosts[host_name]
        out = _run("ip", "-n", host.netns, "-s", "-j", "link", "show", "eth0").stdout
        counters = json.loads(out)[0]["stats64"]
        return {"sent": counters["tx"]["bytes"], "received": counters["rx"]["bytes"]}

    # -- stopping ------------------------------------------------------------------------------------------------

    def _stop_pid(self, name: str) -> None:
        pid = self.pids.pop(name, None)
        if pid is not None:
            _end(pid)

    def stop(self) -> None:
        """End every process the lab started (by pid) and any other left in its namespaces, unmount, remove the
        namespaces and the lab's directory. PervadeError, after doing all it could, if something is left."""
        problems = []
        for host in self.hosts.values():
            if host.mount_ns is not None and Path(host.mount_ns).exists():
                _run(*host.command("umount", "-l", str(self.shared_dir)), check=False)
        for name in list(self.pids):
            self._stop_pid(name)
        for namespace in [host.netns for host in self.hosts.values()] + [self.switch]:
            if not Path(f"/run/netns/{namespace}").exists():
                continue
            strays = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
            for pid in strays:
                _end(int(pid))
            if strays:
                problems.append(f"{namespace} still ran pids {', '.join(strays)} (ended)")
            done = _run("ip", "netns", "delete", namespace, check=False)
            if done.returncode != 0:
                problems.append(f"{namespace}: {done.stderr.strip()}")
        for host in self.hosts.values():
            if host.mount_ns is not None:
                _run("umount", host.mount_ns, check=False)
        _run("umount", str(self.root / "ns"), check=False)
        still_mounted = _run("findmnt", "-rn", "-o", "TARGET", check=False).stdout.split()
        left = [target for target in still_mounted if target.startswith(str(self.root))]
        if left:
            raise PervadeError(f"the lab's mounts are still there: {left}; {'; '.join(problems)}")
        shutil.rmtree(self.root, ignore_errors=True)
        if any(not problem.endswith("(ended)") for problem in problems):
            raise PervadeError("the lab did not stop cleanly: " + "; ".join(problems))

    # -- its state on disk, for the command line ------------------------------------------------------------------

    def _save(self) -> None:
        state = {"tag": self.tag, "config": asdict(self.config), "hosts": {n: asdict(h) for n, h in self.hosts.items()},
                 "pids": self.pids}  # fmt: skip
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, root: Path) -> ClusterLab:
        """The lab whose directory is ``root`` (built by ``up``)."""
        path = Path(root) / STATE_FILE
        if not path.exists():
            raise PervadeError(f"{root} holds no lab ({STATE_FILE} is missing)")
        state = json.loads(path.read_text())
        raw = state["config"]
        config = LabConfig(raw["compute_hosts"], LinkShape(**raw["storage_link"]), LinkShape(**raw["host_link"]))
        hosts = {name: Host(**fields) for name, fields in state["hosts"].items()}
        return cls(root=Path(root).resolve(), config=config, tag=state["tag"], hosts=hosts, pids=state["pids"])


def _end(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; reaps it if it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] != 0:
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pervade.jobs.lab.cluster", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="build a lab and print its hosts")
    up.add_argument("--compute", type=int, default=LabConfig.compute_hosts, help="compute hosts")
    up.add_argument("--storage-mbit", type=float, default=LabConfig.storage_link.rate_mbit, help="storage link rate")
    up.add_argument("--link-mbit", type=float, default=LabConfig.host_link.rate_mbit, help="every other link's rate")
    up.add_argument("--delay-ms", type=float, default=LabConfig.host_link.delay_ms, help="delay each way, every link")
    up.add_argument("--loss-pct", type=float, default=0.0, help="packets dropped each way, every link (percent)")
    for verb, what in (("down", "stop the lab and remove it"), ("cut", "cut a host off"), ("heal", "heal a cut host"),
                       ("exec", "run a command on a host")):  # fmt: skip
        sub = verbs.add_parser(verb, help=what)
        sub.add_argument("--dir", type=Path, required=True, help="the lab's directory")
        if verb in ("cut", "heal", "exec"):
            sub.add_argument("host", help="login, storage or compute-N")
        if verb == "exec":
            sub.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    up.add_argument("--dir", type=Path, default=None, help="the lab's directory (default: a new one under /tmp)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "up":
            config = LabConfig(
                compute_hosts=args.compute,
                storage_link=LinkShape(args.storage_mbit, args.delay_ms, args.loss_pct),
                host_link=LinkShape(args.link_mbit, args.delay_ms, args.loss_pct),
            )
            lab = ClusterLab.start(config, args.dir)
            print(f"lab {lab.root}: shared file system at {lab.shared_dir} (files go in {lab.export_dir})")
            for host in lab.hosts.values():
                print(f"  {host.name:<12} {host.address:<12} {' '.join(host.command())}")
            print(f"stop it with: python -m pervade.jobs.lab.cluster down --dir {lab.root}")
            return 0
        lab = ClusterLab.load(args.dir)
        if args.verb == "down":
            lab.stop()
        elif args.host not in lab.hosts:
            raise PervadeError(f"no host {args.host!r} in the lab; it has {', '.join(lab.hosts)}")
        elif args.verb == "cut":
            lab.cut(args.host)
        elif args.verb == "heal":
            lab.heal(args.host)
        else:
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                raise PervadeError("exec needs a command after --")
            os.execvp("nsenter", lab.hosts[args.host].command(*command))
        return 0
    except PervadeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
