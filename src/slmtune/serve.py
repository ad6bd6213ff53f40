"""`slmtune serve`: the fine-tuned model behind an OpenAI-compatible HTTP API (`GET /v1/models`,
`POST /v1/chat/completions`, streamed or not), so that any OpenAI client can call it. Prompts are formatted
with the template the adapter was trained with (its provenance), as `chat` and `generate` do.

transformers' own `serve` was read first (5.23): it loads models by hub id or a folder with a config.json
(a peft adapter folder fails there), lists only models of the hub cache in `/v1/models`, formats with the
tokenizer's chat template rather than the training template, has no API key and leaves `/reset` and
`/load_model` open to any client; so this is a small FastAPI app on the same parts (`generate` with a
`TextIteratorStreamer`), one generation at a time."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from transformers import TextIteratorStreamer, set_seed

from .config import Config, DataConfig
from .errors import ConfigError
from .inference import generation_kwargs, load, prompt_ids
from .network import is_loopback

ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the API refuses, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        return JSONResponse({"error": error}, status_code=self.status)


def conversation(body: dict[str, Any]) -> list[dict[str, str]]:
    """The request's messages as the templates take them: roles system/user/assistant, text content (a string
    or a list of text parts), ending with a user turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", param="messages")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(400, f"{where}: role must be one of {', '.join(ROLES)}", param=where)
        content = message.get("content")
        if isinstance(content, list):
            if any(not isinstance(part, dict) or part.get("type") != "text" for part in content):
                raise RequestError(400, f"{where}: only text content parts are supported", param=where)
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise RequestError(400, f"{where}: content must be a string or a list of text parts", param=where)
        turns.append({"role": message["role"], "content": content})
    if turns[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's", param="messages")
    return turns


def sampling(body: dict[str, Any], max_new_tokens: int) -> tuple[int, float, float]:
    """max_tokens (or max_completion_tokens), temperature and top_p of a request, checked."""
    limit = body.get("max_completion_tokens", body.get("max_tokens")) or max_new_tokens
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    if not isinstance(limit, int) or limit < 1:
        raise RequestError(400, "max_tokens must be a positive integer", param="max_tokens")
    if body.get("n", 1) != 1:
        raise RequestError(400, "n: one choice per request", param="n")
    temperature = 0.0 if temperature is None else temperature  # greedy unless asked: same answer as `chat`
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(400, "temperature must be between 0 and 2", param="temperature")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(400, "top_p must be in (0, 1]", param="top_p")
    return limit, float(temperature), float(top_p)


def build_app(
    model: Any, tokenizer: Any, data: DataConfig, model_id: str, api_key: str | None, max_new_tokens: int, seed: int
) -> FastAPI:
    """The API for one loaded model; with `api_key`, every request needs `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="slmtune", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    busy = threading.Lock()  # one generation at a time: the model is not shared between threads

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        if api_key:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return RequestError(401, "invalid or missing API key", "authentication_error").response()
        return await call_next(request)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "slmtune"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            try:
                body = await request.json()
            except ValueError:
                raise RequestError(400, "the body must be JSON") from None
            if not isinstance(body, dict):
                raise RequestError(400, "the body must be a JSON object")
            if body.get("model") not in (None, model_id):
                raise RequestError(404, f"model {body['model']!r} is not served here: {model_id!r} is", param="model")
            turns = conversation(body)
            limit, temperature, top_p = sampling(body, max_new_tokens)
        except RequestError as error:
            return error.response()
        ids = torch.tensor([prompt_ids(turns, data, tokenizer)])
        kwargs = generation_kwargs(tokenizer, limit, temperature, top_p)
        seed_value = body.get("seed", seed)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            return StreamingResponse(
                stream(
                    completion_id,
                    ids,
                    kwargs,
                    seed_value,
                    bool((body.get("stream_options") or {}).get("include_usage")),
                ),
                media_type="text/event-stream",
            )
        # in the thread pool, so that the server keeps answering (and refusing) while this generates
        text, tokens, finish = await run_in_threadpool(answer, ids, kwargs, seed_value)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage(ids, tokens),
        }

    def usage(ids: torch.Tensor, tokens: int) -> dict[str, int]:
        return {"prompt_tokens": ids.shape[1], "completion_tokens": tokens, "total_tokens": ids.shape[1] + tokens}

    def finish_reason(new: torch.Tensor, limit: int) -> str:
        ended = len(new) > 0 and int(new[-1]) == tokenizer.eos_token_id
        return "length" if len(new) >= limit and not ended else "stop"

    @torch.no_grad()
    def answer(ids: torch.Tensor, kwargs: dict[str, Any], seed_value: int) -> tuple[str, int, str]:
        with busy:
            set_seed(seed_value)
            output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = output[0, ids.shape[1] :]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        return text, len(new), finish_reason(new, kwargs["max_new_tokens"])

    def stream(
        completion_id: str, ids: torch.Tensor, kwargs: dict[str, Any], seed_value: int, include_usage: bool
    ) -> Iterator[str]:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        @torch.no_grad()
        def work() -> None:
            try:
                with busy:
                    set_seed(seed_value)
                    output = model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs
                    )
                result["new"] = output[0, ids.shape[1] :]
            except Exception as error:  # surfaced to the client below, not lost in a thread
                result["error"] = error
                streamer.end()

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            event = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(event)}\n\n"

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield chunk({"role": "assistant", "content": ""})
        started = False
        for piece in streamer:
            if not started:  # the first words, as `chat` prints them: without the leading space
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield chunk({"content": piece})
        thread.join()
        if "error" in result:
            yield f"data: {json.dumps({'error': {'message': str(result['error']), 'type': 'server_error'}})}\n\n"
            return
        new = result["new"]
        yield chunk({}, finish_reason(new, kwargs["max_new_tokens"]))
        if include_usage:
            totals = {"id": completion_id, "object": "chat.completion.chunk", "choices": []}
            yield f"data: {json.dumps(totals | {'usage': usage(ids, len(new))})}\n\n"
        yield "data: [DONE]\n\n"

    return app


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use is said at once; port 0 takes a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror}): choose another --port.") from None
    sock.listen(128)
    return sock


def serve(
    config: Config,
    adapter_spec: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_id: str = "slmtune",
    max_new_tokens: int = 256,
) -> int:
    """Load the tuned model (adapter folder, merged model folder or MLflow run id) and serve it until Ctrl-C.
    Listening beyond this machine (a host other than loopback) needs an API key."""
    import uvicorn

    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"--host {host} exposes the model beyond this machine: give --api-key (or SLMTUNE_API_KEY), or serve "
            "on 127.0.0.1."
        )
    sock = listen(host, port)
    model, tokenizer, data = load(config, adapter_spec)
    app = build_app(model, tokenizer, data, model_id, api_key, max_new_tokens, config.train.seed)
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {model_id!r} at http://{url_host}:{bound}/v1 (OpenAI-compatible; Ctrl-C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])  # connections made since the bind wait in the socket's backlog
    return 0
