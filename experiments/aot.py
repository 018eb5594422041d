"""Will it fit: python -m experiments.aot --config=PRESET --devices=N [--config.mesh.*=...] [--device_memory_gib=80]
compiles the train step ahead of time for N devices simulated on this CPU and reports per-device memory and FLOPs.
"""
import json
import os
import re

from absl import flags

from experiments import cli

_CONFIG = cli.define_config_flag('experiments/configs/dense_tiny.py')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Devices to compile for, simulated on the CPU.')
_MEMORY = flags.DEFINE_float('device_memory_gib', 0.0, 'Memory of one device in GiB (H100 80, H200 141, TPU v5p 95); '
                             '0: report without a verdict.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON line instead of the summary.')


def main(argv):
  del argv
  if _DEVICES.value < 1:
    raise ValueError(f'--devices={_DEVICES.value}: give at least one device')
  # XLA reads the simulated device count when the backend starts, which nothing has done yet: flags only loaded
  # the config, which imports jax but touches no device.
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{xla_flags} --xla_force_host_platform_device_count={_DEVICES.value}'.strip()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  from lmlab.sweep import fit  # pylint: disable=g-import-not-at-top
  result = fit.report(_CONFIG.value, _MEMORY.value)
  print(json.dumps({'config': cli.config_name(), **result}) if _JSON.value else fit.describe(result), flush=True)


if __name__ == '__main__':
  cli.run(main)
