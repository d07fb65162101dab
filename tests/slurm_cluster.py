"""A real single-host SLURM cluster for tests: one slurmctld and one slurmd per node, all on this machine.

Each node is a separate slurmd (``slurmd -N NAME``) with its own port and loopback address; every path in the
generated slurm.conf lives under a temp dir, and client commands find it through ``SLURM_CONF`` (see ``env``).
Needs root, Debian's ``slurm-wlm`` and ``munge``. Tests ask for the ``slurm_cluster`` session fixture, which
tests/conftest.py imports from here.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
MUNGE_BINARIES = ("munged", "munge", "unmunge")
MUNGE_KEY = Path("/etc/munge/munge.key")
# slurmstepd puts unix sockets in the spool dir; their paths must fit in sun_path (108 bytes) with room to spare.
MAX_SPOOL_LEN = 60


def which(name: str) -> str | None:
    """Path of a binary; daemons live in /usr/sbin, which a non-login PATH may leave out."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def slurm_available() -> str | None:
    """None if a cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as root and munged must be started as the munge user)"
    missing = [b for b in SLURM_BINARIES + MUNGE_BINARIES if which(b) is None]
    if missing:
        return f"missing binaries {missing} (apt-get install -y --no-install-recommends slurm-wlm munge)"
    if not MUNGE_KEY.exists() and which("mungekey") is None:
        return f"{MUNGE_KEY} is missing and mungekey is not installed"
    return None


def munge_works(socket_path: Path | str) -> bool:
    """True if a munged answers on ``socket_path`` (a credential round-trips)."""
    try:
        cred = subprocess.run(["munge", "-n", "-S", str(socket_path)], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        out = subprocess.run(["unmunge", "-S", str(socket_path)], input=cred.stdout, capture_output=True, timeout=5)
        return out.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_ports(n: int) -> list[int]:
    """n distinct bindable TCP ports, drawn below the ephemeral range so outgoing connections cannot take them."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(20000, 32000)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def parse_scontrol(line: str) -> dict[str, str]:
    """``scontrol show ... -o`` output to a dict; a token with no ``Key=`` prefix continues the previous value."""
    fields: dict[str, str] = {}
    key = None
    for token in line.strip().split(" "):
        name, sep, value = token.partition("=")
        if sep and name and (name[0].isalpha()) and all(c.isalnum() or c in "/:_" for c in name):
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return fields


class SlurmCluster:
    """slurmctld + one slurmd per node on this host, configured under ``root``."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 2):
        self.root = Path(root)
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.state_dir = self.root / "state"
        self.pid_dir = self.root / "run"
        spool = self.root / "spool"
        # A long pytest basetemp would push stepd socket paths over the unix socket limit: spool elsewhere then.
        self._own_spool = len(str(spool)) > MAX_SPOOL_LEN
        self.spool_dir = Path(tempfile.mkdtemp(prefix="slurm-spool-")) if self._own_spool else spool
        # munged runs as the munge user, which cannot reach into root's 0700 pytest dirs: its dir lives in /tmp.
        self.munge_dir: Path | None = None
        self.env: dict[str, str] = {"SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen] = {}  # daemon name -> process we started (foreground mode)
        self._logs: list = []

    # ----- lifecycle -----------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Start a private munged, slurmctld and the slurmds; wait until every node is idle."""
        reason = slurm_available()
        if reason:
            raise RuntimeError(f"cannot start a SLURM cluster: {reason}")
        deadline = time.monotonic() + timeout
        for d in (self.log_dir, self.state_dir, self.pid_dir, *(self.spool_dir / n for n in self.nodes)):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge(deadline)
            self._write_conf()
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
            self._wait(lambda: self._run(["scontrol", "ping"], check=False).stdout.count("UP") > 0,
                       deadline, "slurmctld to answer scontrol ping")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self._wait(self._all_idle, deadline, f"nodes {self.nodes} to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel our jobs, then stop exactly the daemons start() launched (by pid) and their job processes."""
        if not self._procs:
            self._cleanup_files()
            return
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            # Let slurmd end its jobs (slurmstepd) cleanly before the daemons go away; best effort only.
            try:
                jobs = self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
                if jobs:
                    self._run(["scancel", *jobs], check=False)
                    end = time.monotonic() + 10
                    while time.monotonic() < end and self._run(
                            ["squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i"], check=False).stdout.strip():
                        time.sleep(0.2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        # slurmds first, then the controller, munged last (the others talk to it while shutting down).
        order = sorted(self._procs, key=lambda n: (n == "munged", n == "slurmctld"))
        for name in order:
            self._terminate(self._procs[name])
        # A job that ignored scancel keeps running: slurmstepd detaches from slurmd (new session, parent init),
        # so find it and its job by the SLURM_CONF they inherited, which names this cluster alone.
        for pid in self._strays():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._procs.clear()
        for f in self._logs:
            f.close()
        self._logs.clear()
        self._cleanup_files()

    def subprocess_env(self) -> dict[str, str]:
        """os.environ plus ``env``, minus SLURM_* variables inherited from an outer job, which would steer the
        clients (srun, sbatch) toward that job's allocation and cluster."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**base, **self.env}

    def pids(self) -> dict[str, int]:
        """Pids of the daemons this cluster started and has not stopped yet."""
        return {name: p.pid for name, p in self._procs.items()}

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- jobs ----------------------------------------------------------------------------------------------

    def sbatch(self, script: Path | str, *args: str, cwd: Path, extra_env: dict | None = None,
               sbatch_opts: list[str] | tuple[str, ...] = ()) -> int:
        """Submit ``script`` with ``args``; returns the job id. The job inherits this environment (--export=ALL)."""
        env = {**self.subprocess_env(), **(extra_env or {})}
        out = subprocess.run(["sbatch", "--parsable", *sbatch_opts, str(script), *args], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}\n{self.log_tail(20)}")
        return int(out.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> dict:
        """Fields of ``scontrol show job -o JOBID`` (JobState, ExitCode, Restarts, NodeList, ...); {} if gone."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return {}
        return parse_scontrol(out.stdout.splitlines()[0])

    def wait_for_state(self, job_id: int, states: set[str], timeout: float) -> dict:
        """Poll until the job's JobState is in ``states``; on timeout raise with the daemon log tails."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while True:
            info = self.job_state(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s; last state "
                                   f"{info.get('JobState')!r} reason {info.get('Reason')!r}\n{info}\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """Send ``sig`` to the job's batch shell only (what a trap in the script sees)."""
        self._run(["scancel", "--batch", f"--signal={sig}", str(job_id)])

    def log_tail(self, n: int = 60) -> str:
        """Last ``n`` lines of the controller and node logs, for failure messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"===== {log.name} (last {len(lines)} lines) =====\n" + "\n".join(lines))
        return "\n".join(parts) or f"(no logs in {self.log_dir})"

    # ----- internals -----------------------------------------------------------------------------------------

    def _write_conf(self) -> None:
        assert self.munge_dir is not None
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]  # SlurmctldHost must be `hostname -s`
        plugstack = self.root / "plugstack.conf"
        plugstack.write_text("")  # keep /etc/slurm/plugstack.conf.d out of the tests
        lines = [
            "ClusterName=testcluster",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Job credentials normally live 120 s and a requeued job may not start again on a node until its
            # old credential has expired: 10 s makes a requeue restart after ~11 s instead of ~160 s.
            # socket=: our own munged (see _start_munge), used by every daemon and client that reads this file.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={self.state_dir}",
            f"SlurmctldPidFile={self.pid_dir / 'slurmctld.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            # %n (node name) keeps the slurmds that share this host apart.
            f"SlurmdSpoolDir={self.spool_dir / '%n'}",
            f"SlurmdPidFile={self.pid_dir / 'slurmd-%n.pid'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            f"PlugStackConfig={plugstack}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups needed (containers, CI runners).
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            # Defaults hold a submitted batch job up to 3 s, and a requeued job, once its BeginTime passes, waits
            # for the next backfill pass (30 s) or main pass (60 s): poll every second instead.
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            # Trust the CPUs= below even on a machine with fewer cores, instead of draining the node.
            "SlurmdParameters=config_overrides",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=300",  # completed jobs stay visible to scontrol long enough to read their final state
            "KillWait=5",
            "InactiveLimit=0",
            "MailProg=/bin/true",  # the default /bin/mail is not installed; slurmctld logs an error without it
            "SlurmdTimeout=60",
        ]
        for i, (node, port) in enumerate(zip(self.nodes, node_ports)):
            lines.append(f"NodeName={node} NodeAddr=127.0.1.{i + 1} NodeHostname={host} Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=FORCE")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def munge_socket(self) -> Path | None:
        return self.munge_dir / "munge.socket" if self.munge_dir else None

    def _start_munge(self, deadline: float) -> None:
        """Start a private munged on a socket of our own. Sharing the system one (/run/munge) would let
        concurrent test sessions on this host stop it under each other, or race to start it."""
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(mode=0o700, exist_ok=True)
            shutil.chown(MUNGE_KEY.parent, "munge", "munge")
            subprocess.run([which("mungekey"), "--create", f"--keyfile={MUNGE_KEY}"], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        # munged wants a socket dir owned by munge, not writable by others, and searchable by all (0755).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="slurm-munge-"))
        self.munge_dir.chmod(0o755)
        shutil.chown(self.munge_dir, "munge", "munge")
        d = self.munge_dir
        cmd = [which("munged"), "-F", f"--socket={d / 'munge.socket'}", f"--pid-file={d / 'munged.pid'}",
               f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"]
        # Run as the munge user directly (no runuser in between) so the pid we hold is munged's own.
        self._spawn("munged", cmd, user="munge", group="munge", extra_groups=[])
        self._wait(lambda: munge_works(d / "munge.socket"), deadline, "munged to answer munge -n | unmunge")

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.log_dir / f"{name}.out", "ab")
        self._logs.append(log)
        self._procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=self.subprocess_env(), **kw)

    def _wait(self, cond, deadline: float, what: str) -> None:
        while not cond():
            dead = {n: p.returncode for n, p in self._procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"daemon(s) exited while waiting for {what}: {dead}\n{self._all_output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}\n{self._all_output()}")
            time.sleep(0.2)

    def _all_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
        states = dict(line.split() for line in out if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in self.nodes)

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=self.subprocess_env(), capture_output=True, text=True, timeout=30)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def _all_output(self) -> str:
        outs = []
        for f in sorted(self.log_dir.glob("*.out")):
            text = f.read_text(errors="replace").strip()
            if text:
                outs.append(f"===== {f.name} =====\n{text[-3000:]}")
        return "\n".join(outs + [self.log_tail(40)])

    def _strays(self) -> list[int]:
        """Live processes other than this one whose environment has this cluster's SLURM_CONF."""
        marker = f"\0SLURM_CONF={self.conf}\0".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in b"\0" + (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    @staticmethod
    def _terminate(proc: subprocess.Popen, grace: float = 10) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def _cleanup_files(self) -> None:
        if self._own_spool:
            shutil.rmtree(self.spool_dir, ignore_errors=True)
        if self.munge_dir is not None:  # munged -F logs to stderr, kept in log/munged.out
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A started two-node SLURM cluster; skipped where unavailable, except under CI where that is a failure."""
    reason = slurm_available()
    if reason:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"SLURM cluster unavailable under CI: {reason}")
        pytest.skip(f"SLURM cluster unavailable: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
