"""Launching: the ``moeforge`` CLI, pipelines of steps, executors (local, torchrun, SLURM) and sweeps.

    moeforge <stage> [overrides]            one stage: in-process, or torchrun for launcher.nproc_per_node > 1
    moeforge pipeline=<name> [overrides]    the steps of configs/pipeline/<name>.yaml, in <run dir>/<step>
    moeforge ... launcher=slurm             every step an sbatch job, chained with --dependency=afterok
    moeforge --multirun <stage> a=1,2       one run (or job) per sweep point, in <sweep dir>/<n>

Flow: ``planner`` composes and validates every step's config (``compose``, ``validate``) into a ``plan``
saved as ``<run dir>/.moeforge/plan.json``; ``local`` or ``slurm`` executes it; each job or process runs
``python -m launch.step <plan> <step>``, which resolves the step's input from the markers (``markers``) of
the steps it needs, skips it if its marker is current, runs the stage and writes ``<step dir>/DONE.json``.
"""
