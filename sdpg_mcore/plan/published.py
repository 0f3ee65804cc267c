"""The published runs of ``published_runs.json`` as model inputs, and the model's error on each.

    for check in validate():
        check.run_id, check.total_error, check.phase_errors     # relative errors, predicted / published - 1

Every run is predicted with the same :data:`~sdpg_mcore.plan.hardware.EFFICIENCY` and its own
published settings; nothing in this module adjusts the model to a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from sdpg_mcore.plan.compute_time import Machine
from sdpg_mcore.plan.hardware import EFFICIENCY, HARDWARE, Efficiency
from sdpg_mcore.plan.lengths import ResponseLengths
from sdpg_mcore.plan.memory import Layout
from sdpg_mcore.plan.shape import ModelShape
from sdpg_mcore.plan.step_time import StepTime, predict_step
from sdpg_mcore.plan.workload import Implementation, Rollout, TrainSettings, Workload

DATA = Path(__file__).with_name("published_runs.json")


def load(path: Path = DATA) -> dict:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class PublishedRun:
    """One run's inputs and published figures."""

    run_id: str
    title: str
    shape: ModelShape
    layout: Layout
    work: Workload
    settings: TrainSettings
    rollout: Rollout
    impl: Implementation
    machine: Machine
    published: dict
    check: bool = True

    def predict(self) -> StepTime:
        return predict_step(
            self.shape, self.layout, self.work, self.settings, self.rollout, self.impl, self.machine
        )


def _implementation(data: dict, name: str, overrides: dict) -> Implementation:
    known = {f.name for f in fields(Implementation)}
    spec = {k: v for k, v in data["implementations"][name].items() if k in known}
    return Implementation(name=name, **{**spec, **overrides})


def runs(data: dict | None = None, efficiency: Efficiency = EFFICIENCY) -> list[PublishedRun]:
    """Every run of the data file, ``same_as`` runs with their twin's inputs."""
    data = data or load()
    by_id = {r["id"]: r for r in data["runs"]}
    out = []
    for raw in data["runs"]:
        spec = {**by_id[raw["same_as"]], **raw} if "same_as" in raw else raw
        w = spec["workload"]
        cfg = {k: v for k, v in data["models"][spec["model"]].items() if k != "source"}
        out.append(
            PublishedRun(
                run_id=spec["id"],
                title=spec["title"],
                shape=ModelShape.from_hf_config(cfg),
                layout=Layout(**spec["layout"]),
                work=Workload(
                    prompts=w["prompts"],
                    n=w["n"],
                    prompt_len=w["prompt_len"],
                    lengths=ResponseLengths(w["mean_response"], w["cap"]),
                    reference_pass=w["reference_pass"],
                    mini_batches=w["mini_batches"],
                ),
                settings=TrainSettings(**spec["settings"]),
                rollout=Rollout(**spec["rollout"]),
                impl=_implementation(data, spec["implementation"], spec.get("implementation_overrides", {})),
                machine=Machine(HARDWARE[spec["hardware"]], efficiency, spec["gpus_per_node"]),
                published=spec["published"],
                check=spec.get("check", True),
            )
        )
    return out


@dataclass(frozen=True)
class Check:
    """Predicted vs published for one run: seconds and relative errors (predicted / published - 1)."""

    run_id: str
    title: str
    predicted: StepTime
    published: dict
    phases: dict[str, tuple[float, float]]
    """Published phase -> (predicted s, published s)."""
    checked: bool

    @property
    def total_error(self) -> float:
        return self.predicted.total / self.published["total_s"] - 1

    @property
    def phase_errors(self) -> dict[str, float]:
        return {name: p / q - 1 for name, (p, q) in self.phases.items()}

    @property
    def tokens_error(self) -> float | None:
        pub = self.published.get("tokens_per_s_per_gpu")
        return None if pub is None else self.predicted.tokens_per_s_per_gpu / pub - 1


def validate(data: dict | None = None, efficiency: Efficiency = EFFICIENCY) -> list[Check]:
    """Predict every published run and compare totals and phases."""
    data = data or load()
    out = []
    for run in runs(data, efficiency):
        step = run.predict()
        phases = {
            name: (sum(step.phases.get(p, 0.0) for p in data["phase_map"][name]), seconds)
            for name, seconds in run.published.get("phases", {}).items()
        }
        out.append(Check(run.run_id, run.title, step, run.published, phases, run.check))
    return out


def with_efficiency(**changes: float) -> Efficiency:
    """:data:`EFFICIENCY` with some factors changed (sensitivity studies)."""
    return replace(EFFICIENCY, **changes)
