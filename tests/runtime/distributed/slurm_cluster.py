"""A throwaway one-node Slurm cluster on localhost, for launch tests.

    with slurm_cluster(tmp_dir) as env:   # os.environ + SLURM_CONF, inherited job vars removed
        subprocess.run(["sbatch", ...], env=env)

Debian 12's ``slurm-wlm`` (22.05) and ``munge``, run as root without systemd: munged,
slurmctld and slurmd are started in the foreground as our own child processes, with every
config, state, log, pid file and the munge socket under ``tmp_dir``, so nothing in /etc or /run
is read or changed and two clusters (two test sessions) do not meet. Start to an idle node takes
about a second. What it took to get there:

- munged gets its own key (``mungekey --create``) and socket; ``AuthInfo=socket=...`` points
  Slurm at it. ``--force`` lets it use a socket below a private (0700) directory.
- ``slurmctld -i`` ignores stale state; ``slurmd -N localhost`` because the machine's hostname
  is not ``localhost``.
- No cgroups in a container: ``proctrack/linuxproc`` and ``task/none``.
- ``SlurmdParameters=config_overrides``: the node has the CPUs the config says whatever the
  machine has, so a 1-core CI runner does not drain the node ("Low socket*core*thread count").
- Free ports are picked for slurmctld and slurmd, so a second cluster on the machine is no clash.
- ``AuthInfo=...,cred_expire=10``: a requeued job may start again after the credential lifetime
  (default 120 s); requeue is on by default (``JobRequeue=1``), ``sbatch --requeue`` says so.

Stopping cancels the cluster's jobs, runs ``scontrol shutdown`` and ends the three daemons by
the PIDs they were started with. Nothing else is killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

# Every program the cluster and the tests run; apt: slurm-wlm (client, slurmctld, slurmd), munge.
BINARIES = (
    "sbatch",
    "srun",
    "squeue",
    "scontrol",
    "scancel",
    "sinfo",
    "slurmctld",
    "slurmd",
    "munged",
    "mungekey",
)
_SBIN = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the NUL
CRED_EXPIRE_S = 5
"""Job-step credential lifetime, which is also how long a requeued job waits before it may
start again (Slurm's default, 120 s, would make every requeue test wait two minutes)."""

CONFIG_TEMPLATE = """\
ClusterName=septtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire={cred_expire}
StateSaveLocation={root}/state/ctld
SlurmdSpoolDir={root}/state/d
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmClusterError(RuntimeError):
    """The cluster did not start; the message carries the tail of every daemon's log."""


def find_binary(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (daemons live there)."""
    path = os.environ.get("PATH", "") + os.pathsep + _SBIN
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if find_binary(name) is None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_env(conf: Path) -> dict[str, str]:
    """The caller's environment pointed at ``conf``. Slurm variables inherited from an outer
    job (pytest itself run under a real Slurm) are dropped: srun would take them for an
    allocation in our cluster."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))
    }
    env["SLURM_CONF"] = str(conf)
    return env


class _Cluster:
    def __init__(self, root: Path, cpus: int):
        self.root = root.resolve()
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.logs = {
            "munged": self.root / "munge" / "munged.log",
            "slurmctld": self.root / "log" / "slurmctld.log",
            "slurmd": self.root / "log" / "slurmd.log",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = client_env(self.conf)

    # --- start ---------------------------------------------------------------------------
    def start(self, timeout: float) -> None:
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(f"Slurm/munge programs not found: {', '.join(missing)}")
        socket_path = self.root / "munge" / "munge.socket.2"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            raise SlurmClusterError(f"munge socket path too long for a Unix socket: {socket_path}")
        for sub in ("munge", "state/ctld", "state/d", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        ctld_port = free_port()
        slurmd_port = free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        self.conf.write_text(
            CONFIG_TEMPLATE.format(
                root=self.root,
                cpus=self.cpus,
                ctld_port=ctld_port,
                slurmd_port=slurmd_port,
                cred_expire=CRED_EXPIRE_S,
            )
        )

        key = self.root / "munge" / "munge.key"
        self._check_call([find_binary("mungekey"), "--create", f"--keyfile={key}"])
        # --force: munged refuses a socket whose every parent directory is not world-searchable
        # (pytest's /tmp/pytest-of-root is 0700); only root's jobs talk to this one.
        self._spawn(
            "munged",
            [
                find_binary("munged"),
                "-F",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.logs['munged']}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait("munged socket", socket_path.exists, timeout)
        self._spawn("slurmctld", [find_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [find_binary("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait("node idle", lambda: self._node_state() == "idle", timeout)

    def _spawn(self, name: str, argv: list[str]) -> None:
        # The daemon's own stdout/stderr (start-up errors before its log file opens) go next to it.
        with open(self.root / "log" / f"{name}.stdout", "wb") as out:
            self.procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [
                f"{name} (exit {proc.returncode})"
                for name, proc in self.procs.items()
                if proc.poll() is not None
            ]
            if dead:
                raise SlurmClusterError(f"waiting for {what}: {', '.join(dead)} exited\n" + self.log_tails())
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"no {what} after {timeout:.0f} s\n" + self.log_tails())
            time.sleep(0.1)

    def _node_state(self) -> str:
        proc = subprocess.run(
            [find_binary("sinfo"), "-h", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=10
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def _check_call(self, argv: list[str]) -> None:
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=30)
        if proc.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(argv)} failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for name, log in self.logs.items():
            for path in (self.root / "log" / f"{name}.stdout", log):
                if path.exists() and path.stat().st_size:
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts) or "(no daemon logs written)"

    # --- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        try:
            ctld = self.procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None:
                self._cancel_jobs()
                # Stops slurmctld and the slurmd it knows of.
                subprocess.run(
                    [find_binary("scontrol"), "shutdown"], env=self.env, capture_output=True, timeout=30
                )
        finally:
            for name, grace in (("slurmd", 10.0), ("slurmctld", 10.0), ("munged", 0.0)):
                if name in self.procs:
                    _end(self.procs[name], grace)

    def _cancel_jobs(self) -> None:
        # Every job in this private cluster is the test's own.
        squeue = [find_binary("squeue"), "-h", "-o", "%i"]
        jobs = subprocess.run(squeue, env=self.env, capture_output=True, text=True, timeout=10).stdout.split()
        if not jobs:
            return
        subprocess.run([find_binary("scancel"), *jobs], env=self.env, capture_output=True, timeout=10)
        deadline = time.monotonic() + 20
        while (
            time.monotonic() < deadline
            and subprocess.run(
                squeue, env=self.env, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        ):
            time.sleep(0.2)


def _end(proc: subprocess.Popen, grace: float) -> None:
    """Wait ``grace`` seconds for a clean exit, then SIGTERM, then SIGKILL: our own child only."""
    for signal_it in (None, proc.terminate, proc.kill):
        if proc.poll() is not None:
            return
        if signal_it is not None:
            signal_it()
        try:
            proc.wait(timeout=grace if signal_it is None else 10)
            return
        except subprocess.TimeoutExpired:
            pass


@contextlib.contextmanager
def slurm_cluster(
    root: Path | str, *, cpus: int = 2, start_timeout: float = 30.0
) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under ``root``; yield the clients' environment.

    Raises :class:`SlurmClusterError` (with the daemons' log tails) if the node is not idle
    within ``start_timeout`` seconds; whatever did start is stopped first.
    """
    cluster = _Cluster(Path(root), cpus)
    try:
        cluster.start(start_timeout)
        yield cluster.env
    finally:
        cluster.stop()
