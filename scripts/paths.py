"""Where things live on disk: the repository, the user cache (models, fetched data) and one run directory per
experiment.

Paths that mean "in the repository" (the notebook, ``results/``) are resolved from this package, never
from the working directory, so the command lines work from anywhere once the project is installed
(``pip install -e .``).

One object, :class:`RunConfig`, names every artifact of a run, so writing and resuming can never
disagree about a path (the convention of ``andyrdt/refusal_direction``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

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


REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout the package is imported from (the project is installed editable: ``pip install -e .``)."""

NOTEBOOK_PATH = REPO_ROOT / "refusal_tokens.ipynb"
"""The notebook of the whole pipeline (executed headless by ``python -m scripts.run_notebook``)."""


def results_dir() -> Path:
    """The repository's ``results/`` directory, where runs go unless a results root is given."""
    return REPO_ROOT / "results"


def notebook_parameter_names(notebook: str | os.PathLike[str] = NOTEBOOK_PATH) -> tuple[str, ...]:
    """The names assigned in the notebook's cell tagged ``parameters`` (papermill's), in order.

    Raises:
        ValueError: the notebook has no cell tagged ``parameters``.
    """
    import ast

    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            names = [target.id for node in ast.parse(source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
                     for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                     if isinstance(target, ast.Name)]
            return tuple(dict.fromkeys(names))
    raise ValueError(f"{notebook} has no cell tagged 'parameters'")


RUN_CONFIG_TOP_LEVEL: dict[str, str] = {
    "model_name": "model",
    "seed": "seed",
    "hook_kind": "hook_kind",
    "results_root": "results_root",
    "run_name": "name",
}
"""Notebook parameters stored as :class:`RunConfig` fields of another name; the rest go to ``parameters``."""

STRENGTH_PARAMETERS: tuple[str, ...] = ("positive_strength", "negative_strength")
"""Notebook parameters that the layer/strength sweep replaces when the notebook's ``layer`` is ``"auto"``."""


@dataclass
class RunConfig:
    """Configuration of one experiment run, and the path of every artifact it writes.

    ``config.json`` (:meth:`save`) records what the run did: the fields below hold the values the run
    used (the layer and strengths once chosen), ``parameters`` every other setting.

    Attributes:
        model: Model alias or Hub id / local directory.
        layer: Residual-stream layer used for vectors, probe and steering; ``None`` until chosen.
        seed: The one seed all randomness derives from.
        results_root: Directory holding one sub-directory per run; ``""``: the repository's ``results/``
            (:func:`results_dir`), whatever the working directory.
        name: Run name; when empty, derived once at construction from the model alias, the seed and a
            short hash of every other field (:meth:`parameters_hash`), so the same settings always name
            the same directory (and a rerun resumes it) while the layer is still to be chosen.
        hook_kind: Residual-stream hook point (``resid_pre``, ``resid_mid``, ``resid_post``).
        positive_strength: Steering strength toward refusal; ``None`` until chosen.
        negative_strength: Steering strength away from refusal; ``None`` until chosen.
        parameters: Every other setting, by the notebook's parameter names (routing, threshold method,
            candidate layers, sweep grids, category set, system prompt, batch size, sample sizes, judge,
            ``fast``, and ``layer``: ``"auto"`` when the sweep chose the layer and strengths).
    """

    model: str
    layer: int | None = None
    seed: int = 0
    results_root: str = ""
    name: str = ""
    hook_kind: str = "resid_post"
    positive_strength: float | None = None
    negative_strength: float | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            alias = self.model.rstrip("/").split("/")[-1]
            self.name = f"{alias}_s{self.seed}_{self.parameters_hash()}"

    def parameters_hash(self) -> str:
        """Eight hex digits of a hash of every field but ``name`` and ``results_root``, as they are now."""
        hashed = {key: value for key, value in asdict(self).items() if key not in ("name", "results_root")}
        text = json.dumps(hashed, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> "RunConfig":
        """The configuration of a notebook run from the values of its parameters.

        ``model_name``, ``seed``, ``hook_kind``, ``results_root`` and ``run_name`` become the fields of
        :data:`RUN_CONFIG_TOP_LEVEL`; an int ``layer`` fixes the layer and ``positive_strength`` /
        ``negative_strength``; with ``layer = "auto"`` all three stay ``None`` until the sweep chooses them
        (:meth:`record_choices`). Everything else is kept in ``parameters`` under its own name.

        Raises:
            ValueError: ``model_name`` is missing, or ``layer`` is neither ``"auto"`` nor an int.
        """
        if "model_name" not in parameters:
            raise ValueError(f"parameters must name the model (model_name); got {sorted(parameters)}")
        values: dict[str, Any] = {RUN_CONFIG_TOP_LEVEL[key]: value for key, value in parameters.items()
                                  if key in RUN_CONFIG_TOP_LEVEL}
        rest = {key: value for key, value in parameters.items()
                if key not in RUN_CONFIG_TOP_LEVEL and key not in STRENGTH_PARAMETERS}
        layer = parameters.get("layer", "auto")
        if layer != "auto":
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"layer must be an int or 'auto', got {layer!r}")
            values["layer"] = layer
            for key in STRENGTH_PARAMETERS:
                if parameters.get(key) is not None:
                    values[key] = float(parameters[key])
        return cls(**values, parameters=rest)

    def notebook_parameters(self, notebook: str | os.PathLike[str] = NOTEBOOK_PATH) -> dict[str, Any]:
        """The notebook parameters that run this configuration again (the inverse of :meth:`from_parameters`).

        Parameters are given as the run was asked: a layer the sweep chose (``layer = "auto"``) is chosen
        again by the same sweep; a fixed layer comes with its strengths. Stored entries that are not
        parameters of ``notebook`` (choices recorded during the run) are left out.
        """
        names = set(notebook_parameter_names(notebook))
        values: dict[str, Any] = {key: getattr(self, field) for key, field in RUN_CONFIG_TOP_LEVEL.items()}
        values.update({key: value for key, value in self.parameters.items() if key in names})
        if values.get("layer", "auto") != "auto":
            values.update(positive_strength=self.positive_strength, negative_strength=self.negative_strength)
        return values

    def record_choices(self, layer: int, positive_strength: float, negative_strength: float) -> Path:
        """Set the layer and strengths the run uses and write ``config.json``; returns its path.

        The run's name (and directory) does not change: it was fixed at construction.
        """
        self.layer = int(layer)
        self.positive_strength = float(positive_strength)
        self.negative_strength = float(negative_strength)
        return self.save()

    @property
    def run_dir(self) -> Path:
        """``results_root/name`` (the repository's ``results/name`` when ``results_root`` is empty), made on demand."""
        path = (Path(self.results_root) if self.results_root else results_dir()) / self.name
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

    def to_json(self) -> str:
        """Every field as indented JSON (what ``config.json`` holds)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: the JSON is not an object, or has fields :class:`RunConfig` does not know (the
                message lists the known ones).
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a run configuration is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run configuration field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self) -> Path:
        """Write ``config.json`` and return its path."""
        path = self.artifact_path("config")
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunConfig":
        """Read a ``config.json`` written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())
