"""The run context every stage receives: the typed config, the run dir, metrics, tracker, the run's model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from deepalign.config import DeepAlignConfig, ModelConfig
from deepalign.fingerprint import config_fingerprint
from deepalign.plugins import STAGES
from deepalign.rundir import MetricsFile
from deepalign.tracking import NullTracker


@dataclass
class RunContext:
    """What a stage gets: the typed config, the run dir, the metrics file and tracker, a shared model."""

    config: DeepAlignConfig
    run_dir: Path
    metrics: MetricsFile
    tracker: NullTracker
    raw_config: DictConfig | None = None  # the composed config, for stages that derive sub-runs from it
    main_process: bool = True  # global rank 0: the one that writes the run's records (launcher=torchrun, ...)
    finished: dict[str, None] = field(default_factory=dict)  # stages done in this run dir, in the order done
    # the resolved config as fingerprints read it (secrets redacted, attack/judge typed: runner.fingerprinted)
    resolved: dict[str, Any] = field(default_factory=dict)
    _models: dict[str, Any] = field(default_factory=dict)

    def producers(self, before: str | None = None) -> list[str]:
        """The finished stages that saved a model (train, a defence, ...), in the order they ran; with
        `before`, only those that ran before that stage."""
        done = list(self.finished)
        if before in self.finished:
            done = done[: done.index(before)]
        return [name for name in done if name in STAGES and STAGES.get(name, "stages").model_dir]

    def model_config(self) -> ModelConfig:
        """The model config the stages load: the one the last model-saving stage saved, once one is done."""
        from deepalign.models import trained_model

        cfg = self.config.model
        producers = self.producers()
        if producers:
            cfg = trained_model(cfg, self.run_dir / STAGES.get(producers[-1], "stages").model_dir)
        return cfg

    def model(self):
        """The run's model, loaded once and shared by the stages: the trained one once `train` is done."""
        if "model" not in self._models:
            from deepalign.models import load_model

            self._models["config"] = self.model_config()
            self._models["model"] = load_model(self._models["config"])
        return self._models["model"]

    def model_path(self) -> str | None:
        """Where the run's model weights live (a folder or hub id), for engines that load their own copy."""
        source = self.model().source
        return None if source.startswith("random:") else source

    def model_id(self) -> str:
        """A hash naming the weights the stages use now, by content (`reference.model_fingerprint`: the
        files of the folder actually loaded, the adapter's, a random model's architecture and seed), and how
        generation runs on them. Stored generations of another id are stale."""
        if "id" not in self._models:
            from deepalign.reference import model_fingerprint

            loaded, c = self.model(), self.config
            weights = model_fingerprint(
                self._models["config"], loaded.source, loaded.model, c.paths.cache_dir
            )
            blob = json.dumps(
                {"weights": weights, "generation": [c.generation.backend, self.generation_dtype()]}
            )
            self._models["id"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._models["id"]

    def generation_dtype(self) -> str:
        """`generation.dtype` as this machine resolves it (`auto`: the precision decision, see
        deepalign/precision.py), so that answers generated in another precision are not reused."""
        c = self.config.generation
        if c.backend != "hf" or c.dtype != "auto":
            return c.dtype
        from deepalign.generation import _model_device
        from deepalign.precision import generation_autocast

        model = self.model().model
        cast = generation_autocast(c.dtype, model.dtype, _model_device(model), self.config.paths.cache_dir)
        return f"auto:{cast or model.dtype}".replace("torch.", "")

    def stage_fingerprint(self, name: str) -> str:
        """What stage `name`'s result depends on (its registered `sections` and the files these name, the
        values of its registered `fingerprint`), and the fingerprints of the model-saving stages that
        finished before it (the weights it works on)."""
        spec = STAGES.get(name, "stages")
        extra: dict[str, Any] = dict(spec.fingerprint(self)) if spec.fingerprint is not None else {}
        for producer in self.producers(before=name):
            if producer != name:
                extra[f"model:{producer}"] = self.stage_fingerprint(producer)
        return config_fingerprint(self.resolved, spec.sections, extra)

    def forget_model(self) -> None:
        """Drop the loaded model (the next `model()` call loads again, e.g. the freshly trained one) and hand
        the memory it held back to the system."""
        from deepalign.memory import release_memory

        for key in ("model", "config", "id"):
            self._models.pop(key, None)
        release_memory()
