"""Launchers: run a `tessera train` recipe here, across nodes with torchrun, or on SLURM.

Imports only `tessera.core.config`; every backend builds a command line and never imports
training code (`config` the launch TOML, `torchrun` the commands, `local`, `slurm`,
`submitit_backend` where they run, `jobs` the registry of launched jobs, `telemetry` NVML).
"""
