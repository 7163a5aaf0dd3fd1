"""parallel.engine=deepspeed: DeepSpeed ZeRO (stages 1/2/3, CPU offload) as the engine of the data axis.

DeepSpeed owns only the sharding of the data axis; the model, the training loop, the Muon/AdamW split,
expert parallelism and moeforge's checkpoints stay as with the native engine:

    options.py     parallel.engine / zero_stage / offload_* validation, the DeepSpeed config
    runtime.py     importing DeepSpeed without compiled ops, its expert groups = our mesh axes, teardown
    flat.py        where parameters lie in ZeRO's flat partitions; whole-tensor gather / scatter
    partitions.py  the engine's partitions as layouts, checked against DeepSpeed's own records
    placement.py   the model onto the device: whole for ZeRO-1/2, partitioned from the host for ZeRO-3
    optimizer.py   `ZeroOptimizer`: Muon (whole matrices) + AdamW on the partitions, experts as MoE groups
    engine.py      `build_deepspeed` -> `DeepSpeedModel` (forward/backward through the engine, grad norm)
    verify.py      the first step's check that the applied update is moeforge's Muon update
    checkpoint.py  moeforge distributed checkpoints from / into the engine (any engine resumes any)
    convert.py     either engine's checkpoint as a one-process one (`moeforge export`, `init=`)
    trainer.py     `DeepSpeedTrainer` (train.parallel.trainer.make_trainer picks it)

Importing this package does not import deepspeed; building an engine does.
"""
