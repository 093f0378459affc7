"""A real single-node SLURM (slurmctld + slurmd, Debian's packages) for the tests.

`slurm_cluster` starts both daemons on free ports with a slurm.conf in a temp dir
(auth/none: no munge), exports SLURM_CONF so every client (sbatch, squeue, scontrol) of
this process and its children talks to it, waits until the node is idle and stops it at
the end of the session. It skips, saying why, when not root (slurmd runs jobs as root
here) or when the packages are missing (`make test` installs them when it can:
.ci/install-slurm.sh).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

_DAEMONS = ('slurmctld', 'slurmd', 'sbatch', 'squeue', 'scontrol', 'scancel', 'sinfo')
# The node's CPUs: two array tasks run at once, like `--parallel=2` locally.
NODE_CPUS = 2


@dataclasses.dataclass
class Cluster:
  root: str  # Holds slurm.conf, state, logs and the jobcomp file.
  conf: str
  partition: str = 'debug'

  def run(self, *argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          env=self.env()).stdout

  def env(self) -> dict[str, str]:
    return {**os.environ, 'SLURM_CONF': self.conf}

  def queue_empty(self) -> bool:
    return not self.run('squeue', '-h').strip()


def _free_ports(n: int) -> list[int]:
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _free_memory_mb() -> int:
  with open('/proc/meminfo') as f:
    info = dict(line.split(':', 1) for line in f)
  return max(1024, int(info['MemAvailable'].split()[0]) // 1024 // 2)


def skip_reason() -> str:
  """Why no SLURM can start here ('' if it can)."""
  if os.geteuid() != 0:
    return 'the SLURM tests start slurmd, which needs root; run them as root'
  missing = [d for d in _DAEMONS if not shutil.which(d)]
  if missing:
    return (f'SLURM is not installed ({", ".join(missing)} missing); `make test` installs '
            'it as root (.ci/install-slurm.sh), or: apt-get install -y '
            '--no-install-recommends slurmctld slurmd slurm-client')
  return ''


def _write_conf(root: str) -> str:
  ctld_port, d_port = _free_ports(2)
  conf = os.path.join(root, 'slurm.conf')
  lines = [
      'ClusterName=scone-test', 'SlurmctldHost=localhost',
      f'SlurmctldPort={ctld_port}', f'SlurmdPort={d_port}',
      'SlurmUser=root', 'SlurmdUser=root',
      'AuthType=auth/none', 'CredType=cred/none',
      # Below 5 is rejected; the default 120 makes a requeued job wait 121 s.
      'AuthInfo=cred_expire=5',
      f'StateSaveLocation={root}/state', f'SlurmdSpoolDir={root}/spool',
      f'SlurmctldPidFile={root}/slurmctld.pid', f'SlurmdPidFile={root}/slurmd.pid',
      f'SlurmctldLogFile={root}/slurmctld.log', f'SlurmdLogFile={root}/slurmd.log',
      'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none',
      'JobAcctGatherType=jobacct_gather/none',
      'AccountingStorageType=accounting_storage/none',
      'JobCompType=jobcomp/filetxt', f'JobCompLoc={root}/jobcomp.txt',
      'SelectType=select/cons_tres', 'SelectTypeParameters=CR_Core',
      'SchedulerParameters=sched_interval=1', 'MpiDefault=none', 'ReturnToService=2',
      'MinJobAge=600',
      f'NodeName=localhost CPUs={NODE_CPUS} RealMemory={_free_memory_mb()} State=UNKNOWN',
      'PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP',
  ]
  os.makedirs(os.path.join(root, 'state'))
  os.makedirs(os.path.join(root, 'spool'))
  with open(conf, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return conf


def _stop(cluster: Cluster, procs: list[subprocess.Popen]) -> None:
  # slurmd does not kill running jobs when it exits: cancel them first.
  try:
    cluster.run('scancel', '--user=root')
    deadline = time.time() + 30
    while time.time() < deadline and not cluster.queue_empty():
      time.sleep(0.2)
  except (subprocess.CalledProcessError, OSError):
    pass  # The controller is already gone: nothing left to cancel.
  for p in reversed(procs):
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  for p in reversed(procs):
    try:
      p.wait(timeout=10)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


@pytest.fixture(scope='session')
def slurm_cluster(tmp_path_factory):
  """A running single-node SLURM; SLURM_CONF points at it for the whole session."""
  reason = skip_reason()
  if reason:
    pytest.skip(reason)
  root = str(tmp_path_factory.mktemp('slurm'))
  cluster = Cluster(root, _write_conf(root))
  env = cluster.env()
  procs = []
  with open(os.path.join(root, 'daemons.out'), 'w') as out:
    for argv in (['slurmctld', '-D', '-i', '-f', cluster.conf],
                 ['slurmd', '-D', '-N', 'localhost', '-f', cluster.conf]):
      procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True))
  old_conf = os.environ.get('SLURM_CONF')
  os.environ['SLURM_CONF'] = cluster.conf
  try:
    deadline, state = time.time() + 60, ''
    while time.time() < deadline and state != 'idle':
      time.sleep(0.2)
      dead = [p.args[0] for p in procs if p.poll() is not None]
      if dead:
        pytest.fail(f'{", ".join(dead)} exited at start; see {root}/*.log')
      state = subprocess.run(['sinfo', '-h', '-n', 'localhost', '-o', '%T'], env=env,
                             capture_output=True, text=True).stdout.strip()
    if state != 'idle':
      pytest.fail(f'the test SLURM node is {state!r} after 60 s, not idle; see {root}')
    yield cluster
  finally:
    _stop(cluster, procs)
    if old_conf is None:
      os.environ.pop('SLURM_CONF', None)
    else:
      os.environ['SLURM_CONF'] = old_conf
