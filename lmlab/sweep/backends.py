"""Where a sweep's runs execute, behind one interface `run(jobs) -> {run_id: exit status}`: a local process pool,
Ray tasks, or a Slurm job array through submitit. Each run's output goes to RUN_WORKDIR/log.txt.
"""
import dataclasses
import os
import queue
import re
import shutil
import subprocess
import sys
from concurrent import futures

INSTALL_HINT = "pip install 'lmlab[sweep]'"


@dataclasses.dataclass(frozen=True)
class Job:
  run_id: str
  command: tuple   # argv of the run
  workdir: str     # absolute; the log goes here
  cwd: str         # the directory the sweep was launched from (relative config paths resolve there)


def log_path(workdir: str) -> str:
  # Several tasks of a multi-node Slurm run share a workdir: task 0 writes log.txt, the others their own file.
  task = os.environ.get('SLURM_PROCID', '0')
  return os.path.join(workdir, 'log.txt' if task == '0' else f'log.task{task}.txt')


def execute(job: Job, env: dict | None = None) -> int:
  """Runs one job in this process's environment (plus `env`), appending its output to its log; its exit status."""
  os.makedirs(job.workdir, exist_ok=True)
  with open(log_path(job.workdir), 'a') as log:
    return subprocess.call(list(job.command), cwd=job.cwd, env={**os.environ, **(env or {})}, stdout=log,
                           stderr=subprocess.STDOUT)


def cpu_devices_env(count: int) -> dict:
  """XLA_FLAGS simulating `count` CPU devices (any device count already in the flags is replaced)."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
  return {'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={count}'.strip()}


def visible_gpus() -> list[str]:
  """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists, else none."""
  if os.environ.get('CUDA_VISIBLE_DEVICES') is not None:
    return [g for g in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if g.strip()]
  if not shutil.which('nvidia-smi'):
    return []
  listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=False).stdout
  return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith('GPU ')]


def device_slots(parallel: int, devices_per_run: int, gpus: list[str]) -> list[dict]:
  """One environment per concurrent run: disjoint CUDA_VISIBLE_DEVICES slices on GPUs, simulated devices on CPU."""
  if not gpus:
    return [cpu_devices_env(devices_per_run or 1)] * parallel
  per_run = devices_per_run or max(1, len(gpus) // parallel)
  if per_run * parallel > len(gpus):
    raise ValueError(f'--parallel={parallel} runs of {per_run} GPUs need {per_run * parallel}, but {len(gpus)} are '
                     'visible; lower --parallel or --devices_per_run')
  return [{'CUDA_VISIBLE_DEVICES': ','.join(gpus[i * per_run:(i + 1) * per_run])} for i in range(parallel)]


class LocalBackend:
  """A pool of `parallel` processes on this machine; each concurrent run holds its own slice of the devices."""

  def __init__(self, parallel: int = 1, devices_per_run: int = 0):
    self.slots = device_slots(parallel, devices_per_run, visible_gpus())

  def run(self, jobs: list[Job]) -> dict:
    free = queue.Queue()
    for slot in self.slots:
      free.put(slot)

    def run_one(job):
      slot = free.get()
      try:
        return execute(job, slot)
      finally:
        free.put(slot)

    with futures.ThreadPoolExecutor(len(self.slots)) as pool:
      return dict(zip((job.run_id for job in jobs), pool.map(run_one, jobs)))


def _import(name: str):
  try:
    return __import__(name)
  except ImportError:
    raise ValueError(f'the {name} backend needs {name}, which is not installed; {INSTALL_HINT}') from None


class RayBackend:
  """One Ray task per run with its resource request; joins `address`, or starts a local cluster of `parallel` CPUs."""

  def __init__(self, address: str = '', parallel: int = 1, gpus_per_run: int = 0, devices_per_run: int = 1):
    self.ray = _import('ray')
    if not self.ray.is_initialized():
      if address:
        self.ray.init(address=address)
      else:
        self.ray.init(num_cpus=parallel, include_dashboard=False)
    # Ray sets CUDA_VISIBLE_DEVICES for a task that asks for GPUs; on CPU each run simulates its own devices.
    self.env = {} if gpus_per_run else cpu_devices_env(devices_per_run)
    self.task = self.ray.remote(num_cpus=1, num_gpus=gpus_per_run)(execute)

  def run(self, jobs: list[Job]) -> dict:
    refs = [self.task.remote(job, self.env) for job in jobs]
    return dict(zip((job.run_id for job in jobs), self.ray.get(refs)))


class SlurmBackend:
  """A Slurm job array through submitit, one array task per run; a multi-node run is one process per node
  (submitit starts them with srun) that experiments.train joins with jax.distributed from the Slurm environment."""

  def __init__(self, folder: str, partition: str = '', gpus_per_run: int = 0, nodes: int = 1, timeout_min: int = 60,
               parallel: int = 256, cluster: str = 'slurm'):
    self.submitit = _import('submitit')
    if gpus_per_run % nodes:
      raise ValueError(f'--gpus_per_run={gpus_per_run} does not split over --nodes={nodes}; use a multiple of it')
    self.folder, self.cluster = folder, cluster
    self.parameters = {'nodes': nodes, 'tasks_per_node': 1, 'gpus_per_node': gpus_per_run // nodes,
                       'timeout_min': timeout_min, 'slurm_array_parallelism': parallel}
    if partition:
      self.parameters['slurm_partition'] = partition

  def run(self, jobs: list[Job]) -> dict:
    executor = self.submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
    executor.update_parameters(**self.parameters)
    array = executor.map_array(execute, jobs)
    return {job.run_id: submitted.result() for job, submitted in zip(jobs, array)}

  def sbatch_script(self, num_jobs: int) -> str:
    """The sbatch script submitit would submit for an array of `num_jobs` runs (for --dry_run and tests)."""
    from submitit.slurm import slurm  # pylint: disable=g-import-not-at-top
    renamed = {'nodes': 'nodes', 'tasks_per_node': 'ntasks_per_node', 'gpus_per_node': 'gpus_per_node',
               'timeout_min': 'time', 'slurm_array_parallelism': 'array_parallelism', 'slurm_partition': 'partition'}
    parameters = {renamed[key]: value for key, value in self.parameters.items()}
    # submitit's own renderer (private, but the only way to see the script without a Slurm installation).
    render = slurm._make_sbatch_string  # pylint: disable=protected-access
    return render(command=f'{sys.executable} -u -m submitit.core._submit {self.folder}', folder=self.folder,
                  map_count=num_jobs, **parameters)


def make_backend(name: str, root: str, parallel: int, devices_per_run: int = 0, gpus_per_run: int = 0,
                 ray_address: str = '', slurm_partition: str = '', nodes: int = 1, timeout_min: int = 60):
  """The backend called `name` (local | ray | slurm) with its settings."""
  if name == 'local':
    return LocalBackend(parallel, devices_per_run)
  if name == 'ray':
    return RayBackend(ray_address, parallel, gpus_per_run, devices_per_run or 1)
  if name == 'slurm':
    return SlurmBackend(os.path.join(os.path.abspath(root), 'slurm'), slurm_partition, gpus_per_run, nodes,
                        timeout_min, parallel)
  raise ValueError(f'--backend={name!r} is not one of local, ray, slurm')
