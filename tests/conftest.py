"""Test setup: CPU with 8 fake devices, set before JAX initialises its backend."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

from absl import flags  # noqa: E402

# grain and absl-using modules read flags; tests never parse argv.
flags.FLAGS.mark_as_parsed()
