"""Built-in SGLang-compatible server for CPU: the endpoints of ``protocol.py`` over a ``transformers`` model.

Where SGLang cannot run (CPU, CI) this server stands in for it, so the rollout client, the real
``sglang-router`` and weight sync are exercised over real HTTP. Responses have SGLang's shapes;
malformed requests get HTTP 400 ``{"error": {"message": ...}}`` and the server stays up. With a key
(``--api-key-file``, or SGLang's ``--api-key``, which every user can read in ``/proc``) every route
but ``/health*`` answers 401 ``{"error": "Unauthorized"}`` without ``Authorization: Bearer KEY``, as
SGLang does.

    python -m sdpg_mcore.rollout.dev_server --model-path DIR --host 127.0.0.1 --port 30000 \
        --api-key-file RUN_DIR/secrets/rollout_api_key
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import pickle
import time
import uuid
from typing import Any

import torch
from aiohttp import web

from sdpg_mcore.rollout import auth
from sdpg_mcore.rollout.dist_group import WeightUpdateGroup
from sdpg_mcore.rollout.engine import GenRequest, HFEngine
from sdpg_mcore.rollout.flat_weights import FlatBucketReceiver
from sdpg_mcore.rollout.protocol import FLATTENED_BUCKET, MEMORY_TAGS, SamplingParams, parse_dtype_name
from sdpg_mcore.rollout.scheduler import Scheduler

logger = logging.getLogger(__name__)
#: The SGLang release whose HTTP contract this server follows (tests/rollout/test_contract.py runs
#: the same tests against both); read by ``sglang_launch.check_servers`` like a real server's.
VERSION = "0.5.23-sdpg-dev"


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def _failure(message: str) -> web.Response:
    """SGLang's answer to a refused control call: 400 ``{"success": false, "message": ...}``."""
    return web.json_response({"success": False, "message": message}, status=400)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (send finite numbers)")


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The JSON object of the body; strict JSON: ``NaN``/``Infinity`` are refused, as SGLang does."""
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.text(), parse_constant=_no_constants)
    except ValueError as err:
        raise ValueError(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


def _as_list(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} inputs")
        return value
    return [value] * count


class DevServer:
    """HTTP handlers over one :class:`Scheduler`."""

    def __init__(
        self,
        engine: HFEngine,
        *,
        host: str,
        port: int,
        max_batch_size: int = 64,
        max_request_bytes: int = 32 << 20,
        api_key: str | None = None,
    ):
        self.engine = engine
        self.api_key = api_key
        self.host, self.port = host, port
        self.max_batch_size = max_batch_size
        self.max_request_bytes = max_request_bytes
        self.scheduler: Scheduler | None = None
        self.weight_version = "default"
        self.groups: dict[str, WeightUpdateGroup] = {}
        self.num_generate_requests = 0
        self.live_rids: set[str] = set()
        """rids of requests in flight: a second request with one of them is refused, as SGLang does."""
        self.update_session = False
        """Inside ``/begin_weight_update`` … ``/end_weight_update`` (SGLang 0.5.21+)."""
        self._flat_receiver = FlatBucketReceiver()

    # ---------------------------------------------------------------- app
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_request_bytes, middlewares=[self._auth, self._errors])
        routes = [
            ("POST", "/generate", self.generate),
            ("GET", "/health", self.health),
            ("GET", "/health_generate", self.health_generate),
            ("GET", "/get_server_info", self.server_info),
            ("GET", "/server_info", self.server_info),
            ("GET", "/get_model_info", self.model_info),
            ("GET", "/model_info", self.model_info),
            ("POST", "/update_weight_version", self.update_weight_version),
            ("POST", "/begin_weight_update", self.begin_weight_update),
            ("POST", "/end_weight_update", self.end_weight_update),
            ("POST", "/update_weights_from_tensor", self.update_weights_from_tensor),
            ("GET", "/get_loads", self.get_loads),
            ("GET", "/v1/loads", self.v1_loads),
            ("POST", "/flush_cache", self.flush_cache),
            ("GET", "/flush_cache", self.flush_cache),
            ("POST", "/abort_request", self.abort_request),
            ("POST", "/pause_generation", self.pause_generation),
            ("POST", "/continue_generation", self.continue_generation),
            ("POST", "/release_memory_occupation", self.release_memory),
            ("POST", "/resume_memory_occupation", self.resume_memory),
            ("POST", "/update_weights_from_disk", self.update_weights_from_disk),
            ("POST", "/init_weights_update_group", self.init_weights_update_group),
            ("POST", "/destroy_weights_update_group", self.destroy_weights_update_group),
            ("POST", "/update_weights_from_distributed", self.update_weights_from_distributed),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.scheduler = Scheduler(self.engine, max_batch_size=self.max_batch_size)
        self.scheduler.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        """SGLang's check (``sglang/srt/utils/auth.py``): with a key, 401 before any route, unknown ones
        included, unless the path is a probe's (``/health*``)."""
        if self.api_key is None or auth.open_path(request.path):
            return await handler(request)
        if not auth.authorized(request.headers.get("Authorization"), self.api_key):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ValueError as err:
            return _error(str(err), 400)
        except web.HTTPException:
            raise
        except Exception as err:  # never let one bad request take the server down
            logger.exception("handler %s failed", request.path)
            return _error(f"{type(err).__name__}: {err}", 500)

    # ---------------------------------------------------------------- generate
    async def _parse_generate(self, body: dict[str, Any]) -> tuple[list[GenRequest], bool]:
        if body.get("stream"):
            raise ValueError("stream=true is not supported by the dev server")
        if body.get("input_ids") is not None:
            inputs = body["input_ids"]
            single = bool(inputs) and all(isinstance(t, int) and not isinstance(t, bool) for t in inputs)
            batch = [inputs] if single else inputs
            if (
                not isinstance(batch, list)
                or not batch
                or not all(
                    isinstance(seq, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in seq)
                    for seq in batch
                )
            ):
                raise ValueError("input_ids must be a non-empty list of ints or a list of such lists")
        elif body.get("text") is not None:
            text = body["text"]
            single = isinstance(text, str)
            texts = [text] if single else text
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            # Off the event loop: a long text must not stall health checks and other clients.
            batch = await asyncio.to_thread(lambda: [self.engine.encode(t) for t in texts])
        else:
            raise ValueError("/generate needs input_ids or text")
        count = len(batch)
        sampling = [
            SamplingParams.from_json(p)
            for p in _as_list(body.get("sampling_params"), count, "sampling_params")
        ]
        rids = _as_list(body.get("rid"), count, "rid")
        return_logprob = _as_list(body.get("return_logprob", False), count, "return_logprob")
        start_len = _as_list(body.get("logprob_start_len", -1), count, "logprob_start_len")
        text_in_lp = bool(body.get("return_text_in_logprobs", False))
        requests = []
        for i, ids in enumerate(batch):
            base = rids[i] if isinstance(rids[i], str) else uuid.uuid4().hex
            for j in range(sampling[i].n):
                req = GenRequest(
                    rid=base if sampling[i].n == 1 else f"{base}_{j}",
                    base_rid=base,
                    input_ids=list(ids),
                    params=sampling[i],
                    return_logprob=bool(return_logprob[i]),
                    logprob_start_len=int(start_len[i] if start_len[i] is not None else -1),
                    return_text_in_logprobs=text_in_lp,
                )
                self.engine.validate(req)
                requests.append(req)
        rids = [r.rid for r in requests]
        duplicate = next((r for r in rids if r in self.live_rids or rids.count(r) > 1), None)
        if duplicate is not None:
            raise ValueError(f"Duplicate request ID detected: {duplicate}")
        return requests, single and sampling[0].n == 1

    def _response(self, req: GenRequest, latency_s: float) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": req.rid,
            "finish_reason": req.finish_reason,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": latency_s,
        }
        if req.return_logprob:
            with_text = req.return_text_in_logprobs and self.engine.tokenizer is not None
            meta["output_token_logprobs"] = [
                [lp, tok, self.engine.decode([tok], False) if with_text else None]
                for lp, tok in zip(req.output_logprobs, req.output_ids)
            ]
            if req.input_logprobs is not None:
                tail = req.input_ids[len(req.input_ids) - len(req.input_logprobs) :]
                meta["input_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(req.input_logprobs, tail)]
        return {"text": req.text, "output_ids": req.output_ids, "meta_info": meta}

    async def generate(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        body = await _json_body(request)
        requests, single = await self._parse_generate(body)
        if self.scheduler.released_tags & {"weights", "kv_cache"}:
            raise ValueError(
                f"memory is released ({sorted(self.scheduler.released_tags)}); call /resume_memory_occupation"
            )
        self.num_generate_requests += 1
        start = time.perf_counter()
        rids = {r.rid for r in requests}
        self.live_rids |= rids
        try:
            done = await self.scheduler.submit(requests)
        finally:
            self.live_rids -= rids
        outputs = [self._response(req, time.perf_counter() - start) for req in done]
        return web.json_response(outputs[0] if single else outputs)

    # ---------------------------------------------------------------- info
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def health_generate(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        if self.scheduler.released_tags:
            return web.Response(text="")
        req = GenRequest(
            rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", input_ids=[0], params=SamplingParams(max_new_tokens=1)
        )
        try:
            await asyncio.wait_for(self.scheduler.submit([req]), timeout=20)
        except asyncio.TimeoutError:
            return _error("health generation timed out", 503)
        return web.Response(text="")

    def _info(self) -> dict[str, Any]:
        return {
            "model_path": self.engine.model_path,
            "tokenizer_path": self.engine.model_path if self.engine.tokenizer is not None else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(self.engine.model.config, "model_type", None),
            "architectures": getattr(self.engine.model.config, "architectures", None),
        }

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(self._info())

    async def server_info(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        info = {
            **self._info(),
            "host": self.host,
            "port": self.port,
            "tp_size": 1,
            "dp_size": 1,
            "context_length": self.engine.max_context,
            "max_running_requests": self.max_batch_size,
            "version": VERSION,
            "internal_states": [
                {
                    "num_in_flight": self.scheduler.num_in_flight,
                    "paused": self.scheduler.paused,
                    "num_generate_requests": self.num_generate_requests,
                }
            ],
            "released_tags": sorted(self.scheduler.released_tags),
        }
        return web.json_response(info)

    async def update_weight_version(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        body = await _json_body(request)
        if not isinstance(body.get("new_version"), str):
            raise ValueError("/update_weight_version needs new_version (a string)")
        if body.get("abort_all_requests", True):  # SGLang's default: a new version aborts what runs
            self.scheduler.abort(lambda r: True, "Aborted by /update_weight_version")
        self.weight_version = body["new_version"]
        return web.json_response(
            {
                "success": True,
                "message": f"Weight version updated to {self.weight_version}",
                "new_version": self.weight_version,
            }
        )

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        await _json_body(request)
        if self.update_session:
            return _failure("a weight-update session is already open; call end_weight_update() first")
        self.update_session = True
        return web.json_response({"success": True, "message": "Success"})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await _json_body(request)
        if not self.update_session:
            return _failure("no weight-update session is open; call begin_weight_update() first")
        self.update_session = False
        return web.json_response({"success": True, "message": "Success"})

    async def get_loads(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        return web.json_response(
            {"num_reqs": self.scheduler.num_in_flight, "num_waiting_reqs": len(self.scheduler.pending)}
        )

    async def v1_loads(self, request: web.Request) -> web.Response:
        """SGLang's ``/v1/loads`` (its core fields): requests decoding vs waiting for admission."""
        assert self.scheduler is not None
        waiting = len(self.scheduler.pending)
        running = self.scheduler.num_in_flight - waiting
        load = {"dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting}
        return web.json_response({"version": VERSION, "loads": [load]})

    # ---------------------------------------------------------------- control
    async def flush_cache(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        if self.scheduler.num_in_flight:
            return web.Response(
                status=400,
                text=f"Cache not flushed: {self.scheduler.num_in_flight} requests in flight. Retry when idle.",
            )
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting requests, the operation will not be performed.)\n"
        )

    async def abort_request(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        body = await _json_body(request)
        rid, abort_all = body.get("rid"), bool(body.get("abort_all", False))
        if rid is None and not abort_all:
            raise ValueError("/abort_request needs rid or abort_all=true")
        count = self.scheduler.abort(
            lambda r: abort_all or r.rid == rid or r.base_rid == rid, "Aborted by /abort_request"
        )
        return web.json_response({"success": True, "num_aborted": count})

    async def pause_generation(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        body = await _json_body(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"mode={mode!r}: choose one of ['abort', 'retract', 'in_place']")
        self.scheduler.set_paused(True)
        if mode == "abort":
            self.scheduler.abort(lambda r: True, "Aborted by /pause_generation")
        return web.json_response({"success": True, "message": f"paused ({mode})"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        self.scheduler.set_paused(False)
        return web.json_response({"success": True, "message": "continued"})

    def _tags(self, body: dict[str, Any]) -> set[str]:
        tags = body.get("tags") or list(MEMORY_TAGS)
        if not isinstance(tags, list) or any(t not in MEMORY_TAGS for t in tags):
            raise ValueError(f"tags={tags!r}: choose from {list(MEMORY_TAGS)}")
        return set(tags)

    async def release_memory(self, request: web.Request) -> web.Response:
        # On CPU there is no device memory to hand back; the state is tracked so that a client
        # generating while released gets a clear error instead of silently working.
        assert self.scheduler is not None
        tags = self._tags(await _json_body(request))
        if self.scheduler.num_in_flight:
            return _error("cannot release memory with requests in flight; pause or wait first", 400)
        self.scheduler.released_tags |= tags
        return web.json_response({"success": True, "message": f"released {sorted(tags)}"})

    async def resume_memory(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        tags = self._tags(await _json_body(request))
        self.scheduler.released_tags -= tags
        self.scheduler.set_paused(self.scheduler.paused)
        return web.json_response({"success": True, "message": f"resumed {sorted(tags)}"})

    # ---------------------------------------------------------------- weights
    def _set_version(self, body: dict[str, Any]) -> None:
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        body = await _json_body(request)
        if not isinstance(body.get("model_path"), str):
            raise ValueError("/update_weights_from_disk needs model_path (a directory of HF safetensors)")
        if body.get("abort_all_requests"):
            self.scheduler.abort(lambda r: True, "Aborted by weight update")
        async with self.scheduler.exclusive():
            try:
                count = await self.scheduler.run_on_model(self.engine.load_from_disk, body["model_path"])
            except (ValueError, OSError) as err:
                return web.json_response(
                    {"success": False, "message": str(err), "num_paused_requests": 0}, status=400
                )
            self._set_version(body)
        return web.json_response(
            {
                "success": True,
                "message": f"loaded {count} tensors",
                "num_paused_requests": 0,
                "weight_version": self.weight_version,
            }
        )

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        for key in ("master_address", "master_port", "rank_offset", "world_size"):
            if body.get(key) is None:
                raise ValueError(f"/init_weights_update_group needs {key}")
        name = str(body.get("group_name", "weight_update_group"))
        backend = body.get("backend") or "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            backend = "gloo"  # the trainer uses gloo when it has no GPU either
        try:
            group = await asyncio.to_thread(
                WeightUpdateGroup.create,
                backend,
                body["master_address"],
                int(body["master_port"]),
                rank=int(body["rank_offset"]),
                world_size=int(body["world_size"]),
                group_name=name,
                timeout_s=float(body.get("timeout_s", 300)),
            )
        except (RuntimeError, ValueError) as err:
            return web.json_response({"success": False, "message": f"init group {name}: {err}"}, status=400)
        self.groups[name] = group
        return web.json_response({"success": True, "message": f"joined {name} as rank {group.rank}"})

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        name = str((await _json_body(request)).get("group_name", "weight_update_group"))
        group = self.groups.pop(name, None)
        if group is None:
            return web.json_response({"success": False, "message": f"no group {name!r}"}, status=400)
        group.destroy()
        return web.json_response({"success": True, "message": f"destroyed {name}"})

    @torch.no_grad()
    def _receive_into_model(self, group: WeightUpdateGroup, names, dtypes, flattened: bool) -> None:
        """Receive one request's broadcasts: one flat bucket, or one broadcast per tensor."""
        torch_dtypes = [getattr(torch, d) for d in dtypes]
        params = [self.engine.params_by_name[n] for n in names]
        if flattened and names:
            # the sender broadcasts the bucket's bytes (SGLang's FlattenedTensorBucket is uint8)
            self._flat_receiver.receive(
                names, params, torch_dtypes[0], lambda buffer: group.broadcast(buffer.view(torch.uint8), 0)
            )
            return
        # One tensor per broadcast, all in flight at once; straight into the weights when layouts match.
        targets = [
            p.data if p.dtype == d and p.is_contiguous() else torch.empty(p.shape, dtype=d)
            for p, d in zip(params, torch_dtypes)
        ]
        group.broadcast_many(targets, 0)
        for param, target in zip(params, targets):
            if target.data_ptr() != param.data_ptr():
                param.copy_(target)

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        assert self.scheduler is not None
        body = await _json_body(request)
        if not self.update_session:
            return _failure(
                "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
            )
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            raise ValueError("/update_weights_from_distributed needs lists names, dtypes, shapes")
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"names/dtypes/shapes lengths differ: {len(names)}/{len(dtypes)}/{len(shapes)}")
        group = self.groups.get(str(body.get("group_name", "weight_update_group")))
        if group is None:
            raise ValueError(
                f"group {body.get('group_name')!r} not joined; call /init_weights_update_group first"
            )
        dtypes = [parse_dtype_name(d) for d in dtypes]
        for name, dtype, shape in zip(names, dtypes, shapes):
            self.engine.check_tensor_meta(name, dtype, shape)
        flattened = body.get("load_format") == FLATTENED_BUCKET
        if flattened and len(set(dtypes)) > 1:
            raise ValueError(
                f"load_format={FLATTENED_BUCKET!r} needs one dtype per request, got {sorted(set(dtypes))}"
            )
        async with self.scheduler.exclusive():
            # Nothing decodes now: receive straight into the weights, off the model thread so that
            # several groups (one per trainer pipeline stage) can broadcast at the same time.
            await asyncio.to_thread(self._receive_into_model, group, names, dtypes, flattened)
            self._set_version(body)
        return web.json_response(
            {
                "success": True,
                "message": f"loaded {len(names)} tensors",
                "weight_version": self.weight_version,
            }
        )

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        """Colocated weights: torch shared-memory handles, pickled by SGLang's serializer (base64)."""
        assert self.scheduler is not None
        body = await _json_body(request)
        if not self.update_session:
            return _failure(
                "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
            )
        payloads = body.get("serialized_named_tensors")
        if not (isinstance(payloads, list) and payloads and isinstance(payloads[0], str)):
            raise ValueError(
                "/update_weights_from_tensor needs serialized_named_tensors: [base64 string per TP rank]"
            )
        named = await asyncio.to_thread(_unpickle_named_tensors, payloads[0])
        for name, tensor in named:
            self.engine.check_tensor_meta(name, str(tensor.dtype), list(tensor.shape))
        async with self.scheduler.exclusive():
            count = await self.scheduler.run_on_model(self.engine.load_tensors, named)
            self._set_version(body)
        return web.json_response({"success": True, "message": f"loaded {count} tensors"})


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles ``[(name, tensor), ...]`` shared through torch's file_system strategy, nothing else.

    The payload comes over HTTP: arbitrary pickle would run arbitrary code, so only the rebuild
    functions torch's CPU reductions emit (and plain containers) may be named in it.
    """

    ALLOWED = {
        ("torch.multiprocessing.reductions", "rebuild_tensor"),
        ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
        ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "UntypedStorage"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name in _TORCH_DTYPE_NAMES:
            return getattr(torch, name)
        raise ValueError(f"serialized_named_tensors may not reference {module}.{name}")


_TORCH_DTYPE_NAMES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"}


def _unpickle_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    import torch.multiprocessing  # noqa: F401  (torch's reductions; file_system handles need it)

    try:
        named = _TensorUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
    except (ValueError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(f"serialized_named_tensors: {err}") from None
    if not isinstance(named, list) or not all(
        isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)
        for x in named
    ):
        raise ValueError("serialized_named_tensors must hold a list of (name, tensor) pairs")
    return named


WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-path", required=True, help="Hugging Face model directory (config.json + safetensors)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument(
        "--max-running-requests", type=int, default=64, help="largest batch one prefill takes"
    )
    parser.add_argument("--random-seed", type=int, default=0, help="seed for requests without sampling_seed")
    parser.add_argument(
        "--num-threads", type=int, default=0, help="torch intra-op threads (0: torch default)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(WEIGHT_DTYPES),
        help="weight dtype (SGLang's --dtype); float32 by default so rollout log-probs match an fp32 trainer",
    )
    parser.add_argument(
        "--max-request-mb", type=int, default=32, help="largest request body accepted (HTTP 413 above)"
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--api-key-file", help="file (mode 0600) holding the key every request but /health* must carry"
    )
    parser.add_argument("--api-key", help="the key itself (SGLang's option; /proc shows it to every user)")
    args, unknown = parser.parse_known_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if unknown:
        logger.warning("ignoring SGLang options the dev server does not implement: %s", unknown)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    try:
        api_key = auth.read_key_file(args.api_key_file) if args.api_key_file else args.api_key
    except auth.ApiKeyError as err:
        parser.exit(2, f"dev_server: {err}\n")
    engine = HFEngine(args.model_path, dtype=WEIGHT_DTYPES[args.dtype], seed=args.random_seed)
    server = DevServer(
        engine,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_running_requests,
        max_request_bytes=args.max_request_mb << 20,
        api_key=api_key,
    )
    logger.info("serving %s on http://%s:%d", args.model_path, args.host, args.port)
    web.run_app(
        server.make_app(), host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=2.0
    )


if __name__ == "__main__":
    main()
