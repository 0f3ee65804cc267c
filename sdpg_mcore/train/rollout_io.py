"""The trainer's side of rollouts: start or reach the servers, generate and score a step's responses,
evaluate avg@k / pass@k, and push new weights.

Rank 0 talks HTTP; the step's responses are then broadcast to every rank (``broadcast_responses``).
With ``rollout.backend=external`` and a router URL, generation goes through the router and
weight updates to the workers it lists (``discover_workers``). Weight sync is collective: every TP rank of every pipeline stage drives ``iter_hf_tensors`` (it
all-gathers over TP) and only each stage's source rank writes or sends.

    rollouts = RolloutSession.start(settings, run_dir)        # rank 0 only
    responses = rollouts.generate(prompts, step)              # scored, DAPO-filtered when enabled
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sdpg_mcore.train.batch import Response

logger = logging.getLogger(__name__)


class RolloutUnreachableError(RuntimeError):
    """A rollout server did not answer ``/health``; the message names the URL and the fix."""


@dataclass(frozen=True)
class RolloutSettings:
    """The rollout values of the run (from ``config.RolloutConfig`` and friends)."""

    backend: str
    urls: list[str]
    num_servers: int
    router: bool
    model_path: str
    n: int
    temperature: float
    top_p: float
    top_k: int
    max_response_length: int
    dynamic_sampling: bool
    max_num_gen_batches: int
    request_timeout_s: float
    startup_timeout_s: float
    max_concurrency: int
    scorer: str
    strict: bool
    answer_format: str
    overlong: bool
    overlong_buffer: int
    overlong_factor: float
    server_env: dict = field(default_factory=dict)


def check_reachable(urls: Sequence[str], timeout_s: float = 10.0) -> None:
    """Raise :class:`RolloutUnreachableError` for the first URL whose ``/health`` does not answer 200."""
    from sdpg_mcore.rollout.servers import http_json

    for url in urls:
        try:
            status, _ = http_json(f"{url}/health", timeout_s=timeout_s)
        except OSError as err:
            problem = str(getattr(err, "reason", err))
        else:
            if status == 200:
                continue
            problem = f"HTTP {status}"
        raise RolloutUnreachableError(
            f"rollout server {url} is unreachable ({problem}); start it, fix rollout.urls, "
            "or use rollout.backend=builtin to let the trainer start CPU servers"
        )


def discover_workers(urls: Sequence[str], timeout_s: float = 10.0) -> list[str]:
    """The worker URLs behind ``urls``: a router's ``GET /workers`` entries, or the URL itself.

    Weight updates, version checks and aborts must reach the SGLang workers: the sglang-router
    answers 404 to ``/update_weights_from_disk`` and the weight-group calls. sglang-router 0.3.2
    answers ``/workers`` with ``{"workers": [{"url": ..., "is_healthy": ...}, ...], "total": N}``;
    a worker (SGLang or the dev server) answers 404, so it is its own worker.
    """
    from sdpg_mcore.rollout.servers import http_json

    workers: list[str] = []
    for url in urls:
        try:
            status, body = http_json(f"{url}/workers", timeout_s=timeout_s)
        except OSError as err:
            raise RolloutUnreachableError(f"rollout server {url}: GET /workers failed ({err})") from err
        if status == 200 and isinstance(body, dict) and isinstance(body.get("workers"), list):
            found = [
                str(w["url"]).rstrip("/") for w in body["workers"] if isinstance(w, dict) and w.get("url")
            ]
            if not found:
                raise RolloutUnreachableError(
                    f"router {url} lists no workers (GET /workers: {body}); start its servers or "
                    "give the worker URLs in rollout.urls"
                )
            workers.extend(w for w in found if w not in workers)
        elif url not in workers:
            workers.append(url)
    return workers


class RolloutSession:
    """Servers (started here or external), the async client, the scorer; rank 0 only."""

    def __init__(self, settings: RolloutSettings, servers, urls: list[str], worker_urls: list[str]):
        from sdpg_mcore.rewards import OverlongConfig, resolve_reward_fn
        from sdpg_mcore.rollout.client import ClientConfig, RolloutClient

        self.settings = settings
        self.servers = servers
        self.worker_urls = worker_urls
        self.client = RolloutClient(
            ClientConfig(
                url=urls[0],
                worker_urls=worker_urls,
                max_concurrency=settings.max_concurrency,
                request_timeout_s=settings.request_timeout_s,
            )
        )
        self.reward_fn = resolve_reward_fn(settings.scorer, settings.strict, settings.answer_format)
        self.overlong = OverlongConfig(
            enable=settings.overlong,
            buffer_len=settings.overlong_buffer,
            penalty_factor=settings.overlong_factor,
        )

    @classmethod
    def start(cls, settings: RolloutSettings, run_dir: Path) -> RolloutSession:
        """Launch builtin/SGLang servers (behind the router when asked) or check external ones."""
        from sdpg_mcore.rollout.servers import RolloutServers, ServerConfig

        if settings.backend == "external":
            check_reachable(settings.urls)
            workers = discover_workers(settings.urls)
            logger.info(
                "external rollout: generation via %s, weight updates to %s", settings.urls[0], workers
            )
            return cls(settings, None, list(settings.urls), workers)
        servers = RolloutServers(
            ServerConfig(
                model_path=settings.model_path,
                backend="dev" if settings.backend == "builtin" else "sglang",
                num_servers=settings.num_servers,
                log_dir=str(run_dir / "rollout_logs"),
                health_timeout_s=settings.startup_timeout_s,
                router=settings.router,
                env=dict(settings.server_env),
            )
        ).start()
        servers.install_signal_handlers()
        return cls(settings, servers, [servers.url], list(servers.worker_urls))

    def close(self) -> None:
        if self.servers is not None:
            self.servers.stop()

    def _sampling(self, temperature: float):
        from sdpg_mcore.rollout.protocol import SamplingParams

        s = self.settings
        return SamplingParams(
            temperature=temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_response_length
        )

    def score(self, prompt, sample) -> tuple[float, float]:
        """(reward, acc) of one sample; a dict result may carry ``acc``, else acc = reward > 0."""
        out = self.reward_fn(prompt.data_source, sample.text or "", prompt.ground_truth, prompt.extra_info)
        reward = float(out["score"] if isinstance(out, dict) else out)
        acc = float(out.get("acc", reward > 0)) if isinstance(out, dict) else float(reward > 0)
        return reward, acc

    def generate(
        self, prompts: Sequence, step: int, seed: int, more_prompts: Callable[[], Sequence] | None = None
    ) -> tuple[list[Response], dict[str, float]]:
        """``n`` scored responses per prompt.

        With dynamic sampling (DAPO), groups whose rewards are all equal are dropped and further
        batches (from ``more_prompts``) are generated, at most ``max_num_gen_batches`` in all, until
        ``len(prompts)`` groups are kept; a short batch is trained on if that budget runs out.
        """
        s = self.settings
        sampling = self._sampling(s.temperature)
        self.client.reset_metrics()
        step_seed = seed * 100_003 + step
        metrics: dict[str, float] = {}
        kept: list = []
        if s.dynamic_sampling:
            batches: list[Sequence] = []

            def prompt_batches():
                while True:
                    batches.append(prompts if not batches else more_prompts())
                    yield [p.student_ids for p in batches[-1]]

            def score_fn(sample) -> float:
                prompt = batches[sample.batch_index][sample.prompt_index]
                reward, acc = self.score(prompt, sample)
                sample.acc = acc
                return reward

            result = self.client.run(
                self.client.generate_filtered(
                    prompt_batches(),
                    sampling,
                    score_fn,
                    n=s.n,
                    num_groups=len(prompts),
                    max_num_gen_batches=s.max_num_gen_batches,
                    seed=step_seed,
                )
            )
            kept = [(batches[g[0].batch_index][g[0].prompt_index], g) for g in result.groups]
            metrics.update(
                {
                    "dynamic/num_gen_batches": result.num_gen_batches,
                    "dynamic/kept_groups": len(kept),
                    "dynamic/generated_groups": result.num_groups_generated,
                }
            )
        if not kept:  # every group all-equal: train on the first batch (advantages 0; the KL still teaches)
            if s.dynamic_sampling:
                logger.warning(
                    "dynamic sampling kept no group in %d batches; using the first batch", len(batches)
                )
            groups = self.client.run(
                self.client.generate([p.student_ids for p in prompts], sampling, n=s.n, seed=step_seed)
            )
            kept = list(zip(prompts, groups))
            for prompt, group in kept:
                for sample in group:
                    sample.reward, sample.acc = self.score(prompt, sample)
        from sdpg_mcore.rewards import overlong_penalties

        responses = []
        for g, (prompt, group) in enumerate(kept):
            for sample in group:
                reward, acc = (
                    (sample.reward, sample.acc) if s.dynamic_sampling else self.score(prompt, sample)
                )
                responses.append(
                    Response(
                        group=g,
                        prompt_ids=list(prompt.student_ids),
                        teacher_prompt_ids=list(prompt.teacher_ids),
                        response_ids=list(sample.output_ids),
                        rollout_logprobs=list(sample.rollout_logprobs),
                        reward=reward,
                        acc=acc,
                        truncated=sample.finish_reason == "length",
                    )
                )
        penalties = overlong_penalties(
            [len(r.response_ids) for r in responses], s.max_response_length, self.overlong
        )
        for r, p in zip(responses, penalties):
            r.reward += p
        metrics.update({f"rollout/{k}": float(v) for k, v in self.client.metrics.as_dict().items()})
        return responses, metrics

    def evaluate(
        self, name: str, prompts: Sequence, k: int, temperature: float, seed: int
    ) -> dict[str, float]:
        """avg@k (mean accuracy over all samples) and pass@k (a problem counts if any sample is right)."""
        groups = self.client.run(
            self.client.generate(
                [p.student_ids for p in prompts], self._sampling(temperature), n=k, seed=seed
            )
        )
        accs = [[self.score(p, s)[1] for s in group] for p, group in zip(prompts, groups)]
        avg = sum(sum(a) for a in accs) / max(1, sum(len(a) for a in accs))
        passed = sum(max(a) > 0 for a in accs) / max(1, len(accs))
        return {f"eval/{name}/avg@{k}": avg, f"eval/{name}/pass@{k}": passed}


def broadcast_responses(responses: list[Response] | None, src: int = 0) -> list[Response]:
    """Rank ``src``'s responses on every rank (pickled once; the step's data is small next to weights)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        assert responses is not None
        return responses
    box = [responses]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class WeightPusher:
    """New policy weights to the rollout servers after each step; collective over all ranks.

    ``disk``: every stage's source rank writes its HF tensors, rank 0 publishes the directory and
    calls ``/update_weights_from_disk``. ``distributed``: every stage's source rank hosts a
    weight-update group that the servers join once (``/init_weights_update_group``), then streams
    buckets (``/update_weights_from_distributed``). Other TP ranks only drive the TP all-gathers.
    """

    def __init__(
        self, mode: str, layout, hf_dir: str, run_dir: Path, server_urls: list[str] | None, bucket_mb: int
    ):
        from sdpg_mcore.parallel.spawn import find_free_port
        from sdpg_mcore.rollout.weight_sync import DiskWeightSync, DistributedWeightSync

        self.layout, self.hf_dir = layout, hf_dir
        # Each pipeline stage's first TP/DP/CP rank sends; global rank 0 (stage 0's) also publishes.
        self.is_source = layout.tp_rank == 0 and layout.dp_rank == 0 and layout.cp_rank == 0
        first = dist.get_rank() == 0 if dist.is_initialized() else True
        box = [(list(server_urls or []), find_free_port() if first else 0)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        urls, port = box[0]
        self.commit_rank = first
        self.mode = mode
        if mode == "disk":
            self.sync = DiskWeightSync(
                urls if first else [], shared_dir=run_dir / "weights", hf_config_dir=hf_dir, keep_last=1
            )
        elif mode == "distributed":
            self.sync = None
            if self.is_source:
                self.sync = DistributedWeightSync(
                    urls,
                    master_port=port,
                    stage=layout.pp_rank,
                    bucket_bytes=bucket_mb << 20,
                    backend="nccl" if torch.cuda.is_available() else "gloo",
                )
                self.sync.connect()
        else:
            raise ValueError(f"rollout.weight_sync={mode!r}: choose disk or distributed")

    def __call__(self, step: int) -> None:
        """Every stage's source sends its part, then rank 0 publishes ``step`` as the version, once.

        The version means "all weights are new", so no stage may set it before the others finished.
        """
        from checkpoints_convert.model_io import iter_hf_tensors

        version = str(step)
        tensors = iter_hf_tensors(self._chunks, self.hf_dir)
        if self.mode == "disk":
            self.sync.write_stage(tensors, version, stage=self.layout.pp_rank, is_source=self.is_source)
        elif self.sync is not None:
            self.sync.push(tensors, None)
        else:
            for _ in tensors:  # keep the TP all-gathers in step with the source
                pass
        if dist.is_initialized():
            dist.barrier()
        if self.commit_rank:
            self.sync.commit(version)
        if dist.is_initialized():
            dist.barrier()

    def bind(self, chunks) -> WeightPusher:
        self._chunks = chunks
        return self

    def close(self) -> None:
        if self.mode == "distributed" and self.sync is not None:
            self.sync.close()
