"""The Ray Serve application: an OpenAI-style completions endpoint for a model export.

    POST /v1/completions   prompt(s) -> completions; "stream": true -> server-sent events
    POST /v1/chat/completions  messages -> the assistant's reply, through the export's chat
                           template (chat.py); streaming too; 400 if the export has none
    GET  /v1/models        the served model (and a warning if it is not causal)
    GET  /healthz          liveness, no API key needed

Requests are batched per decoding step by default (serve.scheduler=continuous:
scheduler.py admits a request into a free slot at the next step and frees the slot
the moment it ends), or statically (serve.scheduler=static, batcher.py: a batch
forms when the model is free and runs to its longest request). Either way each step
runs in a worker thread, so the event loop keeps taking requests, and every request
gets its Deltas, which the handler either streams or collects. Entry points: `build_app(args)` for
`serve run` / `serve deploy` / a RayService, `deploy(config)` for jobs and tests.
"""
# No `from __future__ import annotations` here: FastAPI must see real types (Request) on the
# route methods, and Serve's ingress rewrites their signatures, losing string annotations' scope.
import asyncio
import hmac
import logging
import os
from dataclasses import asdict
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_platform.serve.batcher import FINISHED, ContinuousBatcher, StepBatcher
from moe_platform.serve.chat import (
    ChatRequest,
    chat_chunk,
    chat_response,
    new_chat_id,
    parse_chat_request,
)
from moe_platform.serve.config import ServeConfig
from moe_platform.serve.engine import Engine, GenerationJob, next_step
from moe_platform.serve.protocol import (
    DONE_EVENT,
    APIError,
    Choice,
    CompletionRequest,
    RequestLimits,
    check_context,
    completion_response,
    error_body,
    model_list,
    new_completion_id,
    parse_completion_request,
    parse_json_object,
    sse_event,
    usage,
)
from moe_platform.serve.text import Delta

log = logging.getLogger(__name__)

# Consecutive failed batches after which the health check asks Serve to replace the replica.
UNHEALTHY_AFTER_FAILED_BATCHES = 3

api = FastAPI(title="moe-platform completions", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths (404) and wrong methods (405) get the same error shape as everything else.
    body = error_body(str(exc.detail), type="invalid_request_error", code=_http_code(exc.status_code))
    return JSONResponse(body, status_code=exc.status_code)


@api.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    # Only the server's own failures land here (client mistakes are APIErrors): say so in the
    # usual shape, keep the details in the replica log.
    log.error("request failed: %r", exc)
    return JSONResponse(error_body("The server failed to process the request", type="server_error"), status_code=500)


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")


async def _merge(streams: List[AsyncIterator[Delta]]) -> AsyncIterator[Tuple[int, Delta]]:
    """Interleave several prompts' deltas as they arrive, tagged with the prompt index."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
            await queue.put((index, done))
        except Exception as exc:  # re-raised in the consumer
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _slot_item(delta: Optional[Delta], slot: int, finished: List[bool]) -> Any:
    if finished[slot]:
        return FINISHED
    if delta is None:
        return Delta("")  # nothing new this step (cannot happen for a running sequence)
    finished[slot] = delta.finish_reason is not None
    return delta


# Module-level helpers the deployment uses are defined above it: Serve serialises the
# class when it is decorated, and later definitions would be missing on the replicas.
@serve.deployment(name="CompletionServer")
@serve.ingress(api)
class CompletionServer:
    def __init__(self, export_dir: str, config: Dict[str, Any], api_key: Optional[str]) -> None:
        import torch

        self.config = ServeConfig(**config)
        # One thread per replica: replicas scale out across cores instead of fighting over them.
        torch.set_num_threads(self.config.torch_threads)
        self.engine = Engine.load(export_dir, device=self.config.device, quantize=self.config.quantize)
        self.model_name = self.config.served_model_name(export_dir)
        self._api_key = api_key
        self._limits = RequestLimits(
            default_max_tokens=self.config.default_max_tokens,
            max_tokens_limit=min(self.config.max_tokens_limit, self.engine.context_length - 1),
            max_prompts=self.config.max_prompts_per_request,
            vocab_size=self.engine.vocab_size,
        )
        self._failed_batches = 0
        if self.config.scheduler == "continuous":
            scheduler = self.engine.scheduler(num_slots=self.config.max_batch_size)
            self._batcher: Any = ContinuousBatcher(scheduler, on_step_error=self._count_failure)
        else:
            self._batcher = StepBatcher(self._run_batch, self.config.max_batch_size, self.config.batch_wait_timeout_s)
        log.info("serving %s from %s (auth %s)", self.model_name, export_dir, "on" if api_key else "OFF")

    # ---- HTTP routes ------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> Dict[str, Any]:
        # Open without a key (load balancers, probes): it reveals nothing beyond the model name.
        stats = self._batcher.stats
        return {"status": "ok", "model": self.model_name, "scheduler": self.config.scheduler,
                "batches": stats.batches, "largest_batch": stats.largest, "requests": stats.jobs,
                "running": self._batcher.running, "queued": self._batcher.queued}  # fmt: skip

    @api.get("/v1/models")
    async def models(self, request: Request) -> Dict[str, Any]:
        self._authorize(request)
        return model_list(self.model_name, owned_by="moe-platform", metadata=self.engine.metadata())

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        self._authorize(request)
        parsed = parse_completion_request(await self._read_body(request), self._limits)
        self._check_model(parsed.model)
        jobs = self._jobs(parsed)
        completion_id = new_completion_id()
        prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
        if parsed.stream:
            events = self._stream_events(completion_id, jobs, prompt_tokens, parsed.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*(self._complete(job) for job in jobs))
        choices = [Choice(i, text, reason) for i, (text, reason, _) in enumerate(results)]
        counts = usage(prompt_tokens, sum(tokens for _, _, tokens in results))
        return completion_response(completion_id, self.model_name, choices, counts)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        self._authorize(request)
        parsed = parse_chat_request(parse_json_object(await self._read_body(request)), self._limits)
        self._check_model(parsed.model)
        job = self._chat_job(parsed)
        chat_id = new_chat_id()
        if parsed.stream:
            events = self._chat_events(chat_id, job, parsed.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, reason, tokens = await self._complete(job)
        return chat_response(chat_id, self.model_name, text, reason, usage(len(job.prompt_ids), tokens))

    # ---- Serve hooks ------------------------------------------------------------------------

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising gets the replica replaced."""
        if self._failed_batches >= UNHEALTHY_AFTER_FAILED_BATCHES:
            raise RuntimeError(f"the last {self._failed_batches} generation batches failed")

    # ---- request handling -------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key.encode()):
            raise APIError(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                type="invalid_request_error",
                code="invalid_api_key",
            )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"Request body is larger than {limit} bytes", code="request_too_large")
        body = await request.body()
        if len(body) > limit:
            raise APIError(413, f"Request body is larger than {limit} bytes", code="request_too_large")
        return body

    def _check_model(self, model: Optional[str]) -> None:
        # "model" may be omitted (one model per endpoint); a wrong name is a 404, as at OpenAI.
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist; this endpoint serves {self.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    def _jobs(self, parsed: CompletionRequest) -> List[GenerationJob]:
        jobs = []
        for index, prompt in enumerate(parsed.prompts):
            ids = self.engine.encode(prompt)
            check_context(len(ids), parsed.params.max_tokens, self.engine.context_length, index)
            params = parsed.params
            if params.seed is not None and index:
                # Each prompt of a seeded request gets its own reproducible stream.
                params = type(params)(**{**asdict(params), "seed": params.seed + index})
            jobs.append(GenerationJob(tuple(ids), params))
        return jobs

    def _chat_job(self, parsed: ChatRequest) -> GenerationJob:
        if self.engine.chat_template is None:
            raise APIError(400, "This model's export has no chat template (chat_template in tokenizer_config.json); "
                           "use /v1/completions", param="messages", code="no_chat_template")  # fmt: skip
        ids = self.engine.encode_messages(parsed.messages)
        check_context(len(ids), parsed.params.max_tokens, self.engine.context_length, 0)
        return GenerationJob(tuple(ids), parsed.params)

    async def _chat_events(self, chat_id: str, job: GenerationJob, include_usage: bool) -> AsyncIterator[str]:
        completion_tokens = 0
        yield sse_event(chat_chunk(chat_id, self.model_name, {"role": "assistant", "content": ""}))
        try:
            async for delta in self._generate(job):
                completion_tokens = delta.completion_tokens or completion_tokens
                if delta.text or delta.finish_reason:
                    content = {"content": delta.text} if delta.text else {}
                    yield sse_event(chat_chunk(chat_id, self.model_name, content, delta.finish_reason))
        except Exception:  # headers are sent: report in-band, then end the stream properly
            log.exception("generation failed mid-stream")
            yield sse_event(error_body("generation failed; see the replica log", type="server_error"))
        if include_usage:
            counts = usage(len(job.prompt_ids), completion_tokens)
            yield sse_event(chat_chunk(chat_id, self.model_name, None, usage_counts=counts))
        yield DONE_EVENT

    async def _complete(self, job: GenerationJob) -> Tuple[str, Optional[str], int]:
        parts: List[str] = []
        last = Delta("")
        async for delta in self._generate(job):
            parts.append(delta.text)
            last = delta
        return "".join(parts), last.finish_reason, last.completion_tokens

    async def _stream_events(
        self, completion_id: str, jobs: List[GenerationJob], prompt_tokens: int, include_usage: bool
    ) -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            async for index, delta in _merge([self._generate(job) for job in jobs]):
                completion_tokens += delta.completion_tokens
                if delta.text or delta.finish_reason:
                    choice = Choice(index, delta.text, delta.finish_reason)
                    yield sse_event(completion_response(completion_id, self.model_name, [choice], None))
        except Exception:  # headers are sent: report in-band, then end the stream properly
            log.exception("generation failed mid-stream")
            yield sse_event(error_body("generation failed; see the replica log", type="server_error"))
        if include_usage:
            counts = usage(prompt_tokens, completion_tokens)
            yield sse_event(completion_response(completion_id, self.model_name, [], counts))
        yield DONE_EVENT

    # ---- batching ---------------------------------------------------------------------------

    def _count_failure(self, failed: bool) -> None:
        self._failed_batches = self._failed_batches + 1 if failed else 0

    def _generate(self, job: GenerationJob) -> AsyncIterator[Delta]:
        """The job's Deltas, decoded in whatever batch the batcher puts it in."""
        return self._batcher.submit(job)

    async def _run_batch(self, jobs: List[GenerationJob]) -> AsyncIterator[List[Any]]:
        """One batch: yields per step one item per job (its Delta, or FINISHED once over)."""
        steps = self.engine.stream_batch(jobs)
        finished = [False] * len(jobs)
        try:
            while (step := await asyncio.to_thread(next_step, steps)) is not None:
                yield [_slot_item(delta, i, finished) for i, delta in enumerate(step)]
        except Exception:
            self._failed_batches += 1
            raise
        self._failed_batches = 0


# ---- building and deploying ---------------------------------------------------------------


def make_app(config: ServeConfig) -> Application:
    """The bound application: the deployment with resources, autoscaling and batching from config."""
    if not config.export_dir:
        raise ValueError("serve.export_dir is required: pass serve.export_dir=<export directory>")
    export_dir = os.path.abspath(config.export_dir)
    deployment = CompletionServer.options(
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=config.max_ongoing_requests,
        # Overload is not a crash: past the proxy's queue, 429 + Retry-After at once.
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=config.retry_after_s),
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        graceful_shutdown_wait_loop_s=config.graceful_shutdown_wait_loop_s,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        **_replicas(config),
    )
    api_key = config.resolved_api_key()
    if api_key is None:
        log.warning("no API key (serve.api_key / MOE_SERVE_API_KEY): the endpoint is open to anyone who reaches it")
    plain = asdict(config)
    plain["api_key"] = None  # the key travels once, as its own argument, not inside the config
    return deployment.bind(export_dir, plain, api_key)


def _replicas(config: ServeConfig) -> Dict[str, Any]:
    scaling = config.autoscaling
    if scaling.min_replicas == scaling.max_replicas:
        return {"num_replicas": scaling.min_replicas}
    return {"autoscaling_config": scaling.to_ray()}


def build_app(args: Dict[str, Any]) -> Application:
    """Serve app builder: `serve run moe_platform.serve.app:build_app export_dir=DIR` or
    `import_path: moe_platform.serve.app:build_app` with `args:` in a Serve config YAML."""
    return make_app(ServeConfig.from_dict(dict(args)))


def deploy(config: ServeConfig) -> str:
    """Start Serve (if needed) and run the app without blocking; returns the app's base URL.
    Ray must be initialised (jobs.common.init_ray)."""
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(make_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    return app_url(config)


def app_url(config: ServeConfig) -> str:
    """Base URL of the app. The proxy's host/port are fixed when Serve first starts on a
    cluster, so a running Serve instance's own settings win over the config's."""
    host, port = config.host, config.port
    try:
        http = serve.context._get_global_client().http_config
        host, port = http.host, http.port
    except Exception:  # no client yet: fall back to the config
        pass
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{port}{config.route_prefix.rstrip('/')}"


def undeploy(config: ServeConfig) -> None:
    """Delete this app only: other apps on the same Serve instance keep running."""
    serve.delete(config.app_name)
