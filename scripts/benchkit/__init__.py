"""The parts of ``scripts/bench.py``, the benchmark suite of docs/performance.md, one concern a module.

``bench.py`` is the command line and the only entry point: it puts this folder's parent on ``sys.path``
and runs the sections in order. Its children (worker hosts, a lone coordinator, Flower's server and
clients) run ``bench.py`` again with an internal command, so that every process imports the same code.

- ``plan``: what a run measures (``FULL``, ``QUICK``) and the recipe every run trains with
- ``figures``: per-round figures, the readings behind them, and the tables that print them
- ``processes``: child processes of ``bench.py``, started, read and stopped within limits
- ``fleet``: workers on 127.0.0.1, as processes or hosted several to a process
- ``runs``: the coordinator's run, the plain loop, the lone coordinator, profiled runs
- ``limits``: section 0, the machine's physical limits
- ``sections``: sections 1 to 4, overhead, transfer, scale and memory
- ``flower``: Flower's server and clients, and section 5
- ``walkthrough``: section 6, the README's walk-through
- ``accuracy``: section 7, time to accuracy, and its plot
- ``targets``: issues 9's and 20's targets, judged from a run's figures
"""
