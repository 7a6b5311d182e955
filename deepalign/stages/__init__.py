"""Stages of a run; each takes the run context, writes its artifacts and returns its metrics.

Every module of this package is imported by `deepalign.plugins.load_builtins` and registers its stage
(`register_stage`): a new built-in stage is one new module here. The import below only fixes the order
in which `deepalign --help` and error messages list the built-ins (the order of a run)."""

from deepalign.stages import train, probe, attack, analyze, utility, quickstart  # noqa: F401, I001
