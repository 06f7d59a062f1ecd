"""Where things live on disk: the user cache (models, fetched data) and one run directory per experiment.

One object, :class:`RunConfig`, names every artifact of a run, so writing and resuming can never
disagree about a path (the convention of ``andyrdt/refusal_direction``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECT_NAME = "refusal-control"
CACHE_ENV_VAR = "REFUSAL_CONTROL_CACHE"


def cache_dir() -> Path:
    """Root of the user cache (``$REFUSAL_CONTROL_CACHE`` or ``~/.cache/refusal-control``), created on demand."""
    root = Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / PROJECT_NAME)
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """Directory of cached models (one sub-directory per model alias)."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Directory of fetched datasets (with ``manifest.json`` recording sources and licences)."""
    path = cache_dir() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class RunConfig:
    """Configuration of one experiment run, and the path of every artifact it writes.

    Attributes:
        model: Model alias or Hub id / local directory.
        layer: Residual-stream layer used for vectors, probe and steering.
        seed: The one seed all randomness derives from.
        results_root: Directory holding one sub-directory per run.
        name: Run name; derived from model alias, layer and seed when empty.
        extra: Free-form hyper-parameters recorded in ``config.json``.
    """

    model: str
    layer: int
    seed: int = 0
    results_root: str = "results"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            alias = self.model.rstrip("/").split("/")[-1]
            self.name = f"{alias}_L{self.layer}_s{self.seed}"

    @property
    def run_dir(self) -> Path:
        """``results_root/name``, created on demand."""
        path = Path(self.results_root) / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def artifact_path(self, kind: str, name: str = "") -> Path:
        """The path of one artifact of this run; parents are created.

        Args:
            kind: One of ``config``, ``activations``, ``vectors``, ``probe``, ``router`` (the probe+token
                ensemble, when the run routes with it), ``low_rank``,
                ``generations``, ``judge``, ``report``, ``summary``, ``figure``, ``notebook``, ``generalization``
                (the directory of the leave-one-source-out generations), ``data_curve`` (the directory of
                the look-alike data curve's generations).
            name: Sub-name where a kind has several (activation set, condition, judge, figure).

        Raises:
            ValueError: ``kind`` is unknown (the message lists the known kinds), or ``name`` is
                missing where the kind needs one.
        """
        layouts = {
            "config": ("config.json", False),
            "activations": ("activations/{name}.safetensors", True),
            "vectors": ("vectors.safetensors", False),
            "probe": ("probe.safetensors", False),
            "router": ("router.safetensors", False),
            "low_rank": ("low_rank/{name}", True),
            "generations": ("generations/{name}.jsonl", True),
            "judge": ("judge/{name}", True),
            "report": ("report.json", False),
            "summary": ("summary.json", False),
            "figure": ("figures/{name}.png", True),
            "notebook": ("refusal_tokens.executed.ipynb", False),
            "generalization": ("generalization", False),
            "data_curve": ("data_curve", False),
        }
        if kind not in layouts:
            raise ValueError(f"unknown artifact kind {kind!r}; known kinds: {sorted(layouts)}")
        template, needs_name = layouts[kind]
        if needs_name and not name:
            raise ValueError(f"artifact kind {kind!r} needs a name")
        path = self.run_dir / template.format(name=name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save(self) -> Path:
        """Write ``config.json`` and return its path."""
        path = self.artifact_path("config")
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunConfig":
        """Read a ``config.json`` written by :meth:`save`."""
        return cls(**json.loads(Path(path).read_text()))
