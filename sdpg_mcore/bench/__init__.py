"""What the benchmark and diagnostic tools measure and how they summarise it.

The tools (``tools/bench_*.py``, ``tools/offpolicy_grad.py``, ``tools/plot.py``) parse arguments, start
processes and print; the arithmetic of their results lives here, where tests check it:

- ``stats``: standard errors over seeds, paired differences, trailing means;
- ``tuning``: the algorithm benchmark's equal-budget grid and its choice on training reward;
- ``memory``: the peak of live tensor bytes during one call (GPU allocator or CPU profiler);
- ``async_runs``: synchronous vs asynchronous rollout runs, paired by seed (``tools/bench_async.py``);
- ``offpolicy``: the bias of a loss gradient on stale samples (``tools/offpolicy_grad.py``).
"""
