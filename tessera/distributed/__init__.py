"""Parallelism applied from outside the model: env, mesh, parallelize, engine."""
