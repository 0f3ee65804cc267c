"""The trainer's side of rollouts: start or reach the servers, generate and score a step's responses,
evaluate avg@k / pass@k, and push new weights.

Rank 0 talks HTTP; the step's responses are then broadcast to every rank (``broadcast_responses``).
With ``rollout.backend=external`` and a router URL, generation goes through the router and
weight updates to the workers it lists (``discover_workers``). Weight sync is collective: every TP
rank of every pipeline stage drives ``iter_hf_tensors`` (it all-gathers over TP) and only each
stage's source rank writes or sends.

    rollouts = RolloutSession.start(cfg.rollout, cfg.reward, model_path, max_response_length, run_dir)
    responses, metrics = rollouts.generate(prompt_batches, step, seed)  # scored once, DAPO-filtered when enabled
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from sdpg_mcore.config import RewardConfig, RolloutConfig
from sdpg_mcore.train.batch import Response
from sdpg_mcore.train.metrics_log import PhaseTimer

logger = logging.getLogger(__name__)


class RolloutUnreachableError(RuntimeError):
    """A rollout server did not answer ``/health``; the message names the URL and the fix."""


def check_reachable(urls: Sequence[str], timeout_s: float = 10.0) -> None:
    """Raise :class:`RolloutUnreachableError` for the first URL whose ``/health`` does not answer 200."""
    from sdpg_mcore.rollout.http import http_json

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
    from sdpg_mcore.rollout.http import http_json

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

    def __init__(
        self,
        rollout: RolloutConfig,
        reward: RewardConfig,
        max_response_length: int,
        servers,
        urls: list[str],
        worker_urls: list[str],
        deadline_s: float | None = None,
    ):
        from sdpg_mcore.rewards import OverlongConfig, resolve_reward_fn
        from sdpg_mcore.rollout.client import ClientConfig, RolloutClient

        self.rollout = rollout
        self.max_response_length = max_response_length
        self.servers = servers
        self.worker_urls = worker_urls
        self.client = RolloutClient(
            ClientConfig(
                url=urls[0],
                worker_urls=worker_urls,
                max_concurrency=rollout.max_concurrency,
                request_timeout_s=rollout.request_timeout_s,
                deadline_s=deadline_s,
            )
        )
        self.supervisor = None  # set by start() for the servers it launches
        self.reward_fn = resolve_reward_fn(reward.scorer, reward.strict, reward.answer_format)
        self.overlong = OverlongConfig(
            enable=reward.overlong_penalty,
            buffer_len=reward.overlong_buffer,
            penalty_factor=reward.overlong_factor,
        )
        from sdpg_mcore.rollout.servers import MemoryOccupation

        self.memory = MemoryOccupation(worker_urls)

    @classmethod
    def start(
        cls,
        rollout: RolloutConfig,
        reward: RewardConfig,
        model_path: str,
        max_response_length: int,
        run_dir: Path,
        deadline_s: float | None = None,
        local_world_size: int = 1,
    ) -> RolloutSession:
        """Launch builtin/SGLang servers (behind the router when asked) or check external ones.

        ``local_world_size``: the trainer's ranks on this node, whose GPUs launched SGLang servers
        stay off unless colocated (:func:`server_placement`). ``deadline_s`` bounds each rollout
        batch, retries included. Launched servers are supervised
        (``rollout.supervisor``: a dead or stuck one is restarted with the current weights and the
        batch generated again) when the weights go through disk, which a restarted server can load.
        """
        from sdpg_mcore.rollout.servers import RolloutServers
        from sdpg_mcore.rollout.sglang_launch import check_servers

        if rollout.backend == "external":
            check_reachable(rollout.urls)
            workers = discover_workers(rollout.urls)
            check_servers(workers, weight_sync=rollout.weight_sync)
            logger.info("external rollout: generation via %s, weight updates to %s", rollout.urls[0], workers)
            return cls(rollout, reward, max_response_length, None, list(rollout.urls), workers, deadline_s)
        servers = RolloutServers(
            launched_server_config(rollout, model_path, run_dir / "rollout_logs", local_world_size)
        ).start()
        servers.install_signal_handlers()
        session = cls(
            rollout,
            reward,
            max_response_length,
            servers,
            [servers.url],
            list(servers.worker_urls),
            deadline_s,
        )
        if rollout.weight_sync == "disk":
            from sdpg_mcore.rollout.supervisor import ServerSupervisor

            session.supervisor = ServerSupervisor(servers, run_dir / "weights")
        return session

    def _rollout(self, rollout: Callable):
        """``rollout()``, generated again by the supervisor after a dead or stuck server (when supervised)."""
        return self.supervisor.run(rollout) if self.supervisor is not None else rollout()

    def close(self) -> None:
        self.client.shutdown()
        if self.servers is not None:
            self.servers.stop()

    def _sampling(self, temperature: float):
        from sdpg_mcore.rollout.protocol import SamplingParams

        r = self.rollout
        return SamplingParams(
            temperature=temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=self.max_response_length
        )

    def score(self, prompt, sample) -> tuple[float, float]:
        """(reward, acc) of one sample; a dict result may carry ``acc``, else acc = reward > 0."""
        out = self.reward_fn(prompt.data_source, sample.text or "", prompt.ground_truth, prompt.extra_info)
        reward = float(out["score"] if isinstance(out, dict) else out)
        acc = float(out.get("acc", reward > 0)) if isinstance(out, dict) else float(reward > 0)
        return reward, acc

    def _scored(self, prompts: Sequence, groups: list[list]) -> list[list[tuple]]:
        """``(prompt, sample, reward, acc)`` per sample, grouped; each sample scored once, overlong penalty added."""
        from sdpg_mcore.rewards import overlong_penalties

        samples = [s for group in groups for s in group]
        penalties = iter(
            overlong_penalties([len(s.output_ids) for s in samples], self.max_response_length, self.overlong)
        )
        out = []
        for prompt, group in zip(prompts, groups):
            scores = [self.score(prompt, sample) for sample in group]
            out.append(
                [(prompt, s, reward + next(penalties), acc) for s, (reward, acc) in zip(group, scores)]
            )
        return out

    def generate(
        self, prompt_batches: Iterator[Sequence], step: int, seed: int
    ) -> tuple[list[Response], dict[str, float]]:
        """``rollout.n`` scored responses for each prompt of the first batch of ``prompt_batches``.

        With dynamic sampling (DAPO), groups whose rewards are all equal are dropped
        (``algo.dapo_group_filter``) and further batches are drawn and generated, at most
        ``max_num_gen_batches`` in all, until as many groups are kept as the first batch has; a
        short batch is trained on if that budget runs out, the first batch if nothing was kept
        (advantages 0; the KL still teaches).
        """
        r, timer = self.rollout, PhaseTimer()
        sampling = self._sampling(r.temperature)
        self.client.reset_metrics()
        step_seed = seed * 100_003 + step
        batches: list[list[list[tuple]]] = []
        kept: list[list[tuple]] = []
        for batch_index, prompts in enumerate(prompt_batches):
            ids = [p.student_ids for p in prompts]
            groups = self._rollout(
                lambda ids=ids, batch_index=batch_index: self.client.run(
                    self.client.generate(ids, sampling, n=r.n, seed=step_seed, batch_index=batch_index)
                )
            )
            with timer.phase("score"):
                batches.append(self._scored(prompts, groups))
            if not r.dynamic_sampling:
                kept = batches[0]
                break
            kept += _varied_groups(batches[-1])
            if len(kept) >= len(batches[0]) or len(batches) >= r.max_num_gen_batches:
                break
        metrics = _dynamic_metrics(batches, kept) if r.dynamic_sampling else {}
        kept = kept[: len(batches[0])] or batches[0]
        kept, metrics["rollout/dropped_aborted"] = _without_aborted(kept, step)
        responses = [
            Response(
                group=g,
                prompt_ids=list(prompt.student_ids),
                teacher_prompt_ids=list(prompt.teacher_ids),
                response_ids=list(sample.output_ids),
                rollout_logprobs=list(sample.rollout_logprobs),
                reward=reward,
                acc=acc,
                truncated=sample.finish_reason == "length",
                weight_version=policy_version(sample.weight_version),
            )
            for g, group in enumerate(kept)
            for prompt, sample, reward, acc in group
        ]
        metrics.update({f"rollout/{k}": float(v) for k, v in self.client.metrics.as_dict().items()})
        metrics.update(_weight_version_metric(sample for group in kept for _, sample, _, _ in group))
        return responses, {**metrics, **timer.pop()}

    def evaluate(
        self, name: str, prompts: Sequence, k: int, temperature: float, seed: int
    ) -> dict[str, float]:
        """avg@k (mean accuracy over all samples) and pass@k (a problem counts if any sample is right)."""
        groups = self._rollout(
            lambda: self.client.run(
                self.client.generate(
                    [p.student_ids for p in prompts], self._sampling(temperature), n=k, seed=seed
                )
            )
        )
        accs = [[self.score(p, s)[1] for s in group] for p, group in zip(prompts, groups)]
        avg = sum(sum(a) for a in accs) / max(1, sum(len(a) for a in accs))
        passed = sum(max(a) > 0 for a in accs) / max(1, len(accs))
        return {f"eval/{name}/avg@{k}": avg, f"eval/{name}/pass@{k}": passed}


def launched_server_config(rollout: RolloutConfig, model_path: str, log_dir: Path, local_world_size: int):
    """The ``ServerConfig`` of the servers the trainer launches: the built-in server or SGLang, on
    GPUs of their own (:func:`server_placement`) unless colocated, with their own environment."""
    from sdpg_mcore.rollout.servers import ServerConfig

    placement = server_placement(rollout, local_world_size)
    return ServerConfig(
        model_path=model_path,
        backend="dev" if rollout.backend == "builtin" else "sglang",
        num_servers=rollout.num_servers,
        log_dir=str(log_dir),
        health_timeout_s=rollout.startup_timeout_s,
        router=rollout.router,
        env=builtin_server_env(rollout),
        tp_size=rollout.tp_size,
        base_gpu_id=placement.base_gpu_id if placement else 0,
        mem_fraction_static=placement.mem_fraction_static if placement else rollout.mem_fraction_static,
        weight_sync=rollout.weight_sync,
        enable_memory_saver=rollout.colocated,
    )


def builtin_server_env(rollout: RolloutConfig) -> dict[str, str]:
    """Extra environment of launched servers: the built-in server's torch threads
    (``rollout.server_threads``); nothing for SGLang, which binds its own CPU threads (and gets the
    trainer's environment without the trainer's launcher and thread settings,
    ``sglang_launch.server_environment``)."""
    return {"OMP_NUM_THREADS": str(rollout.server_threads)} if rollout.backend == "builtin" else {}


def server_placement(rollout: RolloutConfig, local_world_size: int, gpu_count: int | None = None):
    """Where launched SGLang servers go on this node's GPUs (``rollout/placement.py``); None without
    GPUs or for the built-in and external backends. Raises ``PlacementError`` naming the keys."""
    from sdpg_mcore.parallel.state import visible_gpu_count
    from sdpg_mcore.rollout.placement import place_servers

    gpu_count = visible_gpu_count() if gpu_count is None else gpu_count
    if rollout.backend != "sglang" or gpu_count == 0:
        return None
    return place_servers(
        num_servers=rollout.num_servers,
        tp_size=rollout.tp_size,
        base_gpu_id=rollout.base_gpu_id,
        colocated=rollout.colocated,
        local_world_size=local_world_size,
        gpu_count=gpu_count,
        mem_fraction_static=rollout.mem_fraction_static,
    )


def _weight_version_metric(samples) -> dict[str, float]:
    """Which weights sampled this step: step k must see version k-1 (0 = the initial weights)."""
    versions = {sample.weight_version for sample in samples}
    if len(versions) != 1:
        return {}
    version = versions.pop()
    if version == "default":
        return {"rollout/weight_version": 0.0}
    return {"rollout/weight_version": float(version)} if version.isdigit() else {}


def policy_version(weight_version: str) -> int:
    """The trainer step whose weights a server reports (``weight_version``): pushes are named by step;
    a server that never got a push reports its start-up name (SGLang's ``default``), the initial weights."""
    return int(weight_version) if weight_version.isdigit() else 0


def _varied_groups(groups: list[list[tuple]]) -> list[list[tuple]]:
    """The groups DAPO dynamic sampling keeps: rewards (after the overlong penalty) not all equal."""
    from sdpg_mcore.algo import dapo_group_filter

    rewards_B = torch.tensor([reward for group in groups for _, _, reward, _ in group], dtype=torch.float64)
    group_B = torch.tensor([g for g, group in enumerate(groups) for _ in group])
    kept = set(dapo_group_filter(rewards_B, group_B).kept_groups.tolist())
    return [group for g, group in enumerate(groups) if g in kept]


def _dynamic_metrics(batches: list, kept: list) -> dict[str, float]:
    if not kept:
        logger.warning("dynamic sampling kept no group in %d batches; using the first batch", len(batches))
    elif len(kept) < len(batches[0]):
        logger.warning(
            "over-sampling found %d/%d groups in %d batches", len(kept), len(batches[0]), len(batches)
        )
    return {
        "dynamic/num_gen_batches": len(batches),
        "dynamic/kept_groups": min(len(kept), len(batches[0])),
        "dynamic/generated_groups": sum(len(b) for b in batches),
    }


def _without_aborted(groups: list[list[tuple]], step: int) -> tuple[list[list[tuple]], int]:
    """The scored groups without their aborted samples (a server aborted them: stopped, restarted or
    out of memory; their tokens end anywhere and their log-probs may be partial), empty groups dropped."""
    from sdpg_mcore.rollout.client import RolloutError

    cleaned = [[item for item in group if item[1].finish_reason != "abort"] for group in groups]
    dropped = sum(map(len, groups)) - sum(map(len, cleaned))
    cleaned = [group for group in cleaned if group]
    if not cleaned:
        raise RolloutError(
            f"step {step}: every response was aborted by the rollout servers; see their logs under "
            "RUN_DIR/rollout_logs"
        )
    if dropped:
        logger.warning("step %d: %d aborted response(s) left out of training", step, dropped)
    return cleaned, dropped


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

    One :class:`~sdpg_mcore.rollout.weight_sync.WeightSync` per stage source (disk, distributed or
    tensor, ``rollout.weight_sync``); rank 0 opens the update, every stage's source sends its part,
    rank 0 commits the version. Other TP ranks only drive the TP all-gathers. Colocated engines get
    their weights' memory back before a push (``train/colocate.py`` runs it between the turns).
    """

    def __init__(
        self, mode: str, layout, hf_dir: str, run_dir: Path, server_urls: list[str] | None, bucket_mb: int
    ):
        from sdpg_mcore.rollout.weight_sync import make_weight_sync, server_tp_sizes

        self.layout, self.hf_dir = layout, hf_dir
        # Each pipeline stage's first TP/DP/CP rank sends; global rank 0 (stage 0's) also commits.
        self.is_source = layout.tp_rank == 0 and layout.dp_rank == 0 and layout.cp_rank == 0
        self.commit_rank = dist.get_rank() == 0 if dist.is_initialized() else True
        urls = list(server_urls or [])
        box = [(urls, server_tp_sizes(urls) if self.commit_rank and mode != "disk" else [])]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        urls, tp_sizes = box[0]
        self.flush_cache = True
        """Servers drop their KV/prefix cache after each push; off while requests sit paused in place
        during the push (asynchronous rollouts): SGLang cannot flush with requests in flight."""
        self.sync = None
        if self.is_source or mode == "disk":
            self.sync = make_weight_sync(
                mode,
                urls if (self.is_source or self.commit_rank) else [],
                server_tp_sizes=tp_sizes,
                stage=layout.pp_rank,
                shared_dir=run_dir / "weights",
                hf_dir=hf_dir,
                bucket_bytes=bucket_mb << 20,
                backend="nccl" if torch.cuda.is_available() else "gloo",
            )

    def __call__(self, step: int) -> None:
        """Rank 0 opens the update, every stage's source sends its part, rank 0 publishes ``step``.

        The version means "all weights are new", so no stage may set it before the others finished.
        """
        from checkpoints_convert.model_io import iter_hf_tensors

        version = str(step)
        tensors = iter_hf_tensors(self._chunks, self.hf_dir)
        if self.commit_rank:
            self.sync.begin()
        _barrier()
        try:
            if self.sync is not None:
                self.sync.send(tensors, version, stage=self.layout.pp_rank, is_source=self.is_source)
            else:
                for _ in tensors:  # keep the TP all-gathers in step with the source
                    pass
        except BaseException:
            if self.commit_rank:
                self.sync.abandon()
            raise
        _barrier()
        if self.commit_rank:
            self.sync.commit(version, flush_cache=self.flush_cache)
        _barrier()

    def bind(self, chunks) -> WeightPusher:
        self._chunks = chunks
        return self

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
