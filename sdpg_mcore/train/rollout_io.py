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
from typing import TypeVar

import torch
import torch.distributed as dist

from sdpg_mcore.config import RewardConfig, RolloutConfig
from sdpg_mcore.train.batch import Response
from sdpg_mcore.train.health import all_ranks_true
from sdpg_mcore.train.metrics_log import PhaseTimer

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


def discover_workers(
    urls: Sequence[str], timeout_s: float = 10.0, *, api_key: str | None = None
) -> list[str]:
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
            status, body = http_json(f"{url}/workers", timeout_s=timeout_s, api_key=api_key)
        except OSError as err:
            raise RolloutUnreachableError(f"rollout server {url}: GET /workers failed ({err})") from err
        if status == 401:
            raise RolloutUnreachableError(
                f"rollout server {url} refused the API key (HTTP 401): give its key file in rollout.api_key_file"
            )
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
        *,
        api_key: str | None = None,
        supervisor=None,
    ):
        from sdpg_mcore.rewards import OverlongConfig, resolve_reward_fn
        from sdpg_mcore.rollout.client import ClientConfig, RolloutClient

        self.rollout = rollout
        self.max_response_length = max_response_length
        self.servers = servers
        self.worker_urls = worker_urls
        self.api_key = api_key
        self.supervisor = supervisor
        """``rollout.supervisor.ServerSupervisor`` of the servers launched here (None: external ones)."""
        self.client = RolloutClient(
            ClientConfig(
                url=urls[0],
                worker_urls=worker_urls,
                max_concurrency=rollout.max_concurrency,
                request_timeout_s=rollout.request_timeout_s,
                deadline_s=deadline_s,
                api_key=api_key,
            ),
            on_failure=supervisor.on_failure if supervisor is not None else None,
        )
        self.reward_fn = resolve_reward_fn(reward.scorer, reward.strict, reward.answer_format)
        self.overlong = OverlongConfig(
            enable=reward.overlong_penalty,
            buffer_len=reward.overlong_buffer,
            penalty_factor=reward.overlong_factor,
        )
        from sdpg_mcore.rollout.servers import MemoryOccupation

        self.memory = MemoryOccupation(worker_urls, api_key=api_key)

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
        batch, retries included. Launched servers get a fresh key (RUN_DIR/secrets/) and are
        supervised (``rollout.supervisor``: a dead or stuck one is restarted, gets the current
        weights, and the requests it lost are sent again).
        """
        from sdpg_mcore.rollout.servers import RolloutServers
        from sdpg_mcore.rollout.supervisor import ServerSupervisor

        if rollout.backend == "external":
            return cls._external(rollout, reward, max_response_length, deadline_s)
        servers = RolloutServers(
            launched_server_config(rollout, model_path, run_dir, local_world_size)
        ).start()
        servers.install_signal_handlers()
        # Disk sync: a restarted server loads the newest published weights itself; else a push brings them.
        weights_dir = run_dir / "weights" if rollout.weight_sync == "disk" else None
        return cls(
            rollout,
            reward,
            max_response_length,
            servers,
            [servers.url],
            list(servers.worker_urls),
            deadline_s,
            api_key=servers.api_key,
            supervisor=ServerSupervisor(servers, weights_dir, watchdog_s=rollout.watchdog_s),
        )

    @classmethod
    def _external(cls, rollout: RolloutConfig, reward: RewardConfig, max_response_length: int, deadline_s):
        """Servers someone else runs: reachable, what they are, and the key they want."""
        from sdpg_mcore.rollout.auth import read_key_file
        from sdpg_mcore.rollout.sglang_launch import check_servers

        api_key = (
            read_key_file(rollout.api_key_file, what="rollout.api_key_file") if rollout.api_key_file else None
        )
        if api_key is None:
            logger.warning(
                "rollout.api_key_file is empty: if the external servers run without a key, anyone who "
                "reaches them can replace the weights or read rollouts"
            )
        check_reachable(rollout.urls)
        workers = discover_workers(rollout.urls, api_key=api_key)
        check_servers(workers, weight_sync=rollout.weight_sync, api_key=api_key)
        logger.info("external rollout: generation via %s, weight updates to %s", rollout.urls[0], workers)
        return cls(
            rollout,
            reward,
            max_response_length,
            None,
            list(rollout.urls),
            workers,
            deadline_s,
            api_key=api_key,
        )

    def _rollout(self, rollout: Callable):
        """``rollout()`` under the supervisor's watchdog (launched servers)."""
        return self.supervisor.run(rollout) if self.supervisor is not None else rollout()

    def sample_groups(self, ids: Sequence[Sequence[int]], k: int, temperature: float, seed: int) -> list:
        """``k`` samples per prompt of token ids at ``temperature``, under the watchdog (evaluations)."""
        sampling = self._sampling(temperature)
        return self._rollout(
            lambda: self.client.run(self.client.generate(list(ids), sampling, n=k, seed=seed))
        )

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
        """avg@k and pass@k of ``k`` student samples per prompt (:func:`accuracy_at_k`)."""
        groups = self.sample_groups([p.student_ids for p in prompts], k, temperature, seed)
        accs = [[self.score(p, s)[1] for s in group] for p, group in zip(prompts, groups)]
        return accuracy_at_k(name, k, accs)


def accuracy_at_k(name: str, k: int, accs: Sequence[Sequence[float]]) -> dict[str, float]:
    """``eval/NAME/avg@k`` (mean accuracy over all samples) and ``pass@k`` (a problem counts if any of
    its samples is right) from each problem's ``k`` accuracies; the evaluation and the probe share it."""
    avg = sum(sum(a) for a in accs) / max(1, sum(len(a) for a in accs))
    passed = sum(max(a) > 0 for a in accs) / max(1, len(accs))
    return {f"eval/{name}/avg@{k}": avg, f"eval/{name}/pass@{k}": passed}


def launched_server_config(rollout: RolloutConfig, model_path: str, run_dir: Path, local_world_size: int):
    """The ``ServerConfig`` of the servers the trainer launches: the built-in server or SGLang, on
    GPUs of their own (:func:`server_placement`) unless colocated, with their own environment, logs
    in ``run_dir/rollout_logs`` and the run's key in ``run_dir/secrets``."""
    from sdpg_mcore.rollout.auth import KEY_FILE_NAME
    from sdpg_mcore.rollout.servers import ServerConfig

    placement = server_placement(rollout, local_world_size)
    return ServerConfig(
        model_path=model_path,
        backend="dev" if rollout.backend == "builtin" else "sglang",
        num_servers=rollout.num_servers,
        log_dir=str(run_dir / "rollout_logs"),
        health_timeout_s=rollout.startup_timeout_s,
        router=rollout.router,
        env=builtin_server_env(rollout),
        tp_size=rollout.tp_size,
        base_gpu_id=placement.base_gpu_id if placement else 0,
        mem_fraction_static=placement.mem_fraction_static if placement else rollout.mem_fraction_static,
        weight_sync=rollout.weight_sync,
        enable_memory_saver=rollout.colocated,
        api_key_file=str(run_dir / "secrets" / KEY_FILE_NAME),
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

    A server that dies during a push does not end the run. Each attempt starts with rank 0 restarting
    the servers that died (``ServerSupervisor.recover``); every rank learns whether the servers changed
    and each stage source then re-forms its update group with all of them (distributed). A failure
    anywhere (a server refused, died mid-broadcast, or failed the commit) is agreed on by all ranks,
    and the whole push is made again, up to ``ATTEMPTS`` times. With disk sync a server that dies
    during the commit is restarted and loads the just-published weights: the push completes without
    being made again. :meth:`restore` pushes the current weights once more, for servers that were
    restarted between pushes (``ServersNeedWeights``).
    """

    ATTEMPTS = 3

    def __init__(
        self,
        mode: str,
        layout,
        hf_dir: str,
        run_dir: Path,
        server_urls: list[str] | None,
        bucket_mb: int,
        api_key: str | None = None,
    ):
        from sdpg_mcore.rollout.weight_sync import make_weight_sync, server_tp_sizes

        self.layout, self.hf_dir = layout, hf_dir
        # Each pipeline stage's first TP/DP/CP rank sends; global rank 0 (stage 0's) also commits.
        self.is_source = layout.tp_rank == 0 and layout.dp_rank == 0 and layout.cp_rank == 0
        self.commit_rank = dist.get_rank() == 0 if dist.is_initialized() else True
        urls = list(server_urls or [])
        tp_sizes = server_tp_sizes(urls, api_key=api_key) if self.commit_rank and mode != "disk" else []
        urls, tp_sizes, api_key = _from_rank0((urls, tp_sizes, api_key))  # every stage source talks HTTP
        self.supervisor = None
        """Rank 0's ``ServerSupervisor`` of launched servers (:meth:`supervise`); None elsewhere."""
        self.version: int | None = None
        """The step whose weights the last push carried (None: none yet: the servers' start-up ones)."""
        self.flush_cache = True
        """Servers drop their KV/prefix cache after each push; off while requests sit paused in place
        during the push (asynchronous rollouts): SGLang cannot flush with requests in flight."""
        self._restarts_seen = 0
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
                api_key=api_key,
            )

    def supervise(self, session) -> WeightPusher:
        """Rank 0 of a run with launched servers: restart dead ones before each attempt."""
        if session is not None:
            self.supervisor = session.supervisor
        return self

    def __call__(self, step: int) -> None:
        """Push the weights after ``step`` as version ``step`` (collective); see the class docstring."""
        self._push(str(step))
        self.version = step

    def restore(self) -> None:
        """Push the current weights again, as the last pushed version (collective): for servers
        restarted since, which wait for them. Call it only where the weights are those of the last
        push (before a step trains, or after its push)."""
        if self.version is None:
            raise RuntimeError("restore before any push: restarted servers already hold the start-up weights")
        self._push(str(self.version))

    def _push(self, version: str) -> None:
        error = ""
        for attempt in range(1, self.ATTEMPTS + 1):
            if self._servers_changed(attempt) and self.sync is not None:
                self.sync.reset()  # a new group with every server (distributed); nothing to do otherwise
            error = self._attempt(version)
            if not error:
                if self.supervisor is not None:
                    self.supervisor.weights_pushed(version)
                return
            if self.commit_rank:
                logger.warning(
                    "weight push %s, attempt %d/%d failed: %s", version, attempt, self.ATTEMPTS, error
                )
        from sdpg_mcore.rollout.weight_sync import WeightSyncError

        raise WeightSyncError(
            f"weights version {version} did not reach every server in {self.ATTEMPTS} attempts: {error}"
        )

    def _servers_changed(self, attempt: int) -> bool:
        """Rank 0 restarts dead servers; every rank learns whether the servers changed since the last
        successful push (a restart here or by the client, or a failed attempt)."""
        changed = attempt > 1
        if self.supervisor is not None:
            self.supervisor.recover()
            changed = changed or self.supervisor.num_restarts != self._restarts_seen
            self._restarts_seen = self.supervisor.num_restarts
        return bool(_from_rank0(changed))

    def _attempt(self, version: str) -> str:
        """One push; ``""`` when every rank and server did its part, else (on every rank) what failed."""
        error = ""
        if self.commit_rank:
            error = _failure(self.sync.begin)
            if error:
                self.sync.abandon()  # the servers where it began, else their next begin is refused
        error = _from_rank0(error)
        if error:
            return error
        tensors = iter(self._named_tensors())
        if self.sync is not None:
            error = _failure(
                self.sync.send, tensors, version, stage=self.layout.pp_rank, is_source=self.is_source
            )
        for _ in tensors:  # the rest after a failed send, all of it on a rank without a sync: the
            pass  # TP all-gathers of the iterator must stay in step on every rank
        if not all_ranks_true(not error):
            if self.commit_rank:
                self.sync.abandon()
            return error or "a weight send failed on another rank"
        if self.commit_rank:
            if self.supervisor is not None:
                self.supervisor.weights_published(version)
            error = _failure(self.sync.commit, version, flush_cache=self.flush_cache)
            if error and self._completed_by_restart(version):
                error = ""
        return _from_rank0(error)

    def _completed_by_restart(self, version: str) -> bool:
        """Disk sync, rank 0: servers that died during the commit are restarted and load the weights
        just published, which completes the push; False when something else failed."""
        from sdpg_mcore.rollout.weight_sync import DiskWeightSync, WeightSyncError, check_weight_versions

        if self.supervisor is None or not isinstance(self.sync, DiskWeightSync):
            return False
        if not self.supervisor.recover():
            return False
        try:
            check_weight_versions(self.sync.server_urls, version, api_key=self.sync.api_key)
        except WeightSyncError:
            return False
        self._restarts_seen = self.supervisor.num_restarts
        return True

    def bind(self, chunks) -> WeightPusher:
        """Push the HF-named tensors of the model ``chunks`` (all-gathered over TP by every TP rank)."""
        from checkpoints_convert.model_io import iter_hf_tensors

        return self.bind_named_tensors(lambda: iter_hf_tensors(chunks, self.hf_dir))

    def bind_named_tensors(self, named_tensors: Callable[[], Iterator]) -> WeightPusher:
        """Push what ``named_tensors()`` yields, ``(hf_name, full tensor)`` pairs, anew on each attempt."""
        self._named_tensors = named_tensors
        return self

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()


#: Weight restores one rollout or evaluation may need before it is given up on.
RESTORES = 3


def served(weights: WeightPusher, rank0: bool, produce: Callable[[], T]) -> T | None:
    """Collective: ``produce()`` on rank 0 (it talks to the servers), its result there, None elsewhere.

    When it stops because every server that could serve was restarted and waits for weights only a
    push from every rank can give (``ServersNeedWeights``: distributed or tensor sync), every rank
    pushes them (``weights.restore``) and rank 0 produces again, up to ``RESTORES`` times."""
    from sdpg_mcore.rollout.supervisor import ServersNeedWeights

    for _ in range(RESTORES + 1):
        result, waiting = None, ""
        if rank0:
            try:
                result = produce()
            except ServersNeedWeights as err:
                waiting = str(err)
        waiting = _from_rank0(waiting)
        if not waiting:
            return result
        if rank0:
            logger.warning("%s: pushing the current weights again, then generating again", waiting)
        weights.restore()
    raise ServersNeedWeights(f"servers still wait for weights after {RESTORES} pushes: {waiting}")


def _failure(fn, *args, **kwargs) -> str:
    """``fn(*args, **kwargs)``; what went wrong, or ``""``. A server's failure is the caller's to act on."""
    from sdpg_mcore.rollout.weight_sync import WeightSyncError

    try:
        fn(*args, **kwargs)
    except WeightSyncError as err:
        return str(err)
    return ""


def _from_rank0(value):
    """Rank 0's ``value`` on every rank (the value itself without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
