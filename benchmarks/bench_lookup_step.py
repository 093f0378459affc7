"""Per-step cost of each device-loop lookup alone (no model): `loop_step` run 256 times in
a jitted `fori_loop`, best of 5, wall and process CPU time per step.

  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    python benchmarks/bench_lookup_step.py

Lookups (serve/factory.make_lookup): 'native' (fused host match + gather, numba FFI, CPU
only), 'device' (match on the device + the C++ FFI gather, serve/ffi_gather.py),
'cache:all' (match on the device, every row resident there: no host call, i.e. the device
match alone), 'callback' (host match + gather through io_callback). Synthetic bf16 store
of 200,000 rows x d 128 and its f-gram table (bench_decode.synthetic_table), B = 1, 16, 64.
"""

import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import bench_decode
from scone_jax.export.writer import write_store
from scone_jax.serve import EmbeddingStore, factory

ROWS, D, STEPS = 200_000, 128, 256
MODES = ('native', 'device', 'cache:all', 'callback')


def per_step(lookup, toks_SxB: np.ndarray) -> tuple[float, float]:
  """(wall, CPU) seconds per step of lookup.loop_step, best of 5 runs of STEPS steps."""
  step = lookup.loop_step

  @jax.jit
  def run(operand, toks_SxB, state):
    def body(i, carry):
      acc, state = carry
      slab_BxE, state = step(operand, toks_SxB[i], state)
      return acc + slab_BxE[:, -1].astype(jnp.float32).sum(), state
    return jax.lax.fori_loop(0, STEPS, body, (jnp.float32(0), state))[0]

  state = lookup.loop_state(jnp.asarray(toks_SxB[0]))
  run(lookup.loop_operand, toks_SxB, state).block_until_ready()  # Compile.
  wall = cpu = float('inf')
  for _ in range(5):
    t, c = time.perf_counter(), time.process_time()
    run(lookup.loop_operand, toks_SxB, state).block_until_ready()
    wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
  return wall / STEPS, cpu / STEPS


def main():
  flags.FLAGS(sys.argv[:1])  # bench_decode defines absl flags; none is read here.
  table, stream = bench_decode.synthetic_table(ROWS, 512)
  rng = np.random.default_rng(1)
  with tempfile.TemporaryDirectory(prefix='bench_lookup_') as root:
    write_store(root, ROWS, D, 'bfloat16', 65536,
                lambda a, z: rng.standard_normal((z - a, D), np.float32), {}, progress=False)
    store = EmbeddingStore.open(root, 'ram')
    print(f'{jax.devices()[0].device_kind}: us per step (wall / CPU)')
    for b in (1, 16, 64):
      starts = [i * 97 % (len(stream) - STEPS) for i in range(b)]
      toks_SxB = np.stack([stream[s:s + STEPS] for s in starts], axis=1)
      cells = []
      for mode in MODES:
        lookup = factory.make_lookup(store, table, combine='replace', d_model=D,
                                     dtype=jnp.bfloat16, batch_size=b,
                                     mode=mode.split(':')[0],
                                     cache_rows=ROWS if mode == 'cache:all' else 0)
        lookup.prompt_slab(np.ascontiguousarray(toks_SxB[:1].T), np.ones(b, np.int32))
        wall, cpu = per_step(lookup, toks_SxB)
        cells.append(f'{mode} {1e6 * wall:6.1f} / {1e6 * cpu:6.1f}')
      print(f'B={b:>3}  ' + '  '.join(cells), flush=True)


if __name__ == '__main__':
  main()
