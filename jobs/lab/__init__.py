"""One-node batch systems on localhost (Slurm, Grid Engine) for the tests and benchmarks."""
