"""SLURM for NEO training: ``python -m slurm.submit`` (config -> sbatch script -> job, requeue on
preemption, stage pipeline), ``python -m slurm.status RUN_DIR``, and ``local_cluster/`` (a
single-node SLURM cluster for tests and demos)."""
