"""A screen in a process that has left large_blocks_on_heap (as after `train`), against one that never entered it.

    python experiments/results/attempts/allocator_steps/screen_after_heap.py none|restore|old

`none`: never entered; `restore`: entered and left (today's thresholds on the way out: 32 MiB / 64 MiB); `old`: left
with glibc's 128 KiB start values, as the first version of virtualcell/allocator.py did. The bundled model, 10
knockouts, 40 control cells, 4 samples; prints the screen's seconds.
"""
import sys, time
import virtualcell as vc
from virtualcell import allocator
m = vc.model.bundled()
a = vc.datasets.load("papalexi2021")
c = vc.DataContract.from_adata(a)
sim = vc.Simulator(m, a[c.is_control(a)][:40].copy())
perts = sorted(m.perturbations.labels)[:10]
sim.simulate(perts, samples=1, progress=False)
if sys.argv[1] != "none":
    if sys.argv[1] == "old":
        allocator._AFTER_MMAP_THRESHOLD = allocator._AFTER_TRIM_THRESHOLD = 128 * 1024
    with allocator.large_blocks_on_heap():
        pass
t = time.perf_counter(); sim.simulate(perts, samples=4, progress=False, seed=1); print(sys.argv[1], round(time.perf_counter() - t, 1))
