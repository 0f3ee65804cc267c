"""The API-key table shared by the contract suite (one server) and the trainer's launch tests (the
servers and the router a run started): every route the trainer calls, with a body it would send,
and what each answers a request without the right key."""

from sdpg_mcore.rollout.http import http_json

GENERATE = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}

#: A rollout server's routes the trainer calls. All but the probes (``/health*``) want the key.
SERVER_ROUTES = [
    ("POST", "/generate", GENERATE),
    ("GET", "/model_info", None),
    ("GET", "/server_info", None),
    ("GET", "/v1/loads", None),
    ("POST", "/update_weights_from_disk", {"model_path": "/nonexistent"}),
    ("POST", "/init_weights_update_group", {}),
    ("POST", "/destroy_weights_update_group", {"group_name": "none"}),
    ("POST", "/update_weights_from_distributed", {}),
    ("POST", "/update_weights_from_tensor", {}),
    ("POST", "/begin_weight_update", {}),
    ("POST", "/end_weight_update", {}),
    ("POST", "/update_weight_version", {"new_version": "stolen"}),
    ("POST", "/pause_generation", {"mode": "in_place"}),
    ("POST", "/continue_generation", {}),
    ("POST", "/flush_cache", {}),
    ("POST", "/abort_request", {"rid": "none"}),
    ("POST", "/release_memory_occupation", {}),
    ("POST", "/resume_memory_occupation", {}),
    ("GET", "/no_such_route", None),
]

#: sglang-router's routes that reach the workers or change which workers it routes to (a worker
#: added by a stranger would read every rollout): it refuses them itself (401, empty body). Its
#: probes and ``/get_server_info`` (worker counts) stay open; ``/get_model_info`` it passes on to a
#: worker without a key, which refuses it (the router answers 401 or, from SGLang workers, 503).
ROUTER_ROUTES = [
    ("POST", "/generate", GENERATE),
    ("POST", "/v1/completions", {"model": "m", "prompt": "a", "max_tokens": 1}),
    ("GET", "/get_loads", None),
    ("POST", "/flush_cache", {}),
    ("GET", "/workers", None),
    ("POST", "/workers", {"url": "http://127.0.0.1:9"}),
    ("DELETE", "/workers/none", None),
]


def answers_without_the_key(
    url: str, routes, key: str
) -> dict[tuple[str, str, str | None], tuple[int, object]]:
    """``(method, path, key sent) -> (status, body)`` for each route with no key, a wrong one and the
    key less its last character."""
    answers = {}
    for method, path, body in routes:
        for wrong in (None, "not-the-key", key[:-1]):
            answers[method, path, wrong] = http_json(
                f"{url}{path}", body, method=method, api_key=wrong, timeout_s=60
            )
    return answers
