"""Parallelism applied to built models from outside: the (dp, pp, cp, tp) mesh (`mesh`), tensor parallel
(`tensor_parallel`), LASP sequence parallel (`lasp`), pipeline stages (`pipeline`), FSDP2 / DeepSpeed data
parallel (`data_parallel`), the one entry `parallelize.parallelize` with the shared `TrainStep`, and the gloo
test harness (`harness`). Import the submodules; this package imports nothing heavy on its own.
"""
