"""On-policy distillation of several domain experts into one student (the `distill` stage)."""
