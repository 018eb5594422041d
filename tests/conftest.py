"""Eight simulated CPU devices for every test (set before jax is imported anywhere); the longest modules first."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# The longest modules (seconds of trained bases, subprocess runs and Ray) start first, so that under
# `-n 2 --dist loadfile` no worker is left running one of them alone at the end.
LONGEST_FIRST = ('test_improve_loop.py', 'test_sweep.py', 'test_moe_train.py', 'test_multiprocess.py',
                 'test_finetune_multihost.py', 'test_checkpoint_resume.py', 'test_moe_parallel.py', 'test_model.py',
                 'test_finetune.py', 'test_grpo.py')


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
             else len(LONGEST_FIRST))
