"""Distributed training on one device mesh: pipeline (pp) x data (dp), experts carved out of dp (ep).

    layout = resolve_layout(cfg.parallel, world, model_cfg, batch_size)   # validated before any process group
    init_distributed("cpu" | "cuda")                                      # torchrun or srun env, timeouts
    pmesh = build_mesh(layout)                                            # dims pp, edp, ep; dp = edp x ep
    pm = parallelize(model, pmesh)                                        # pipeline split, EP, FSDP2
    opt = optim.distributed.build_distributed_optimizer(pm.modules, cfg.optim)
    res = pm.forward_backward(batches, mtp_weight); pm.clip_grad_norm_(1.0); opt.step()
    pm.update_biases(res["expert_loads"])
    train.parallel.checkpoint.save(path, pm, opt, state) / .load(path, pm, opt)   # DCP, any layout

`train.parallel.trainer.ParallelTrainer` runs the training loop this way (`make_trainer` picks it);
`train.parallel.deepspeed` is parallel.engine=deepspeed: DeepSpeed ZeRO owning the data axis instead of FSDP2.
"""

from train.parallel.env import detect_env, init_distributed
from train.parallel.layout import Layout, resolve_layout
from train.parallel.mesh import ParallelMesh, build_mesh
from train.parallel.parallelize import parallelize
from train.parallel.step import ParallelModel

__all__ = ["Layout", "ParallelMesh", "ParallelModel", "build_mesh", "detect_env", "init_distributed",
           "parallelize", "resolve_layout"]
