"""`rlm serve`: an OpenAI-compatible server for a RecurrentLM (or any transformers causal LM), on LitServe, with the
test-time compute knobs per request.

    rlm serve --model demo-latent --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
        -d '{"model": "demo-latent", "prompt": "20413.12340?", "num_steps": 16, "init_scale": 0}'

The engine is LitServe (Lightning's server): its HTTP processes validate and queue requests, an inference worker
collects up to `max_batch_size` of them (waiting `batch_timeout` seconds) and runs them as left-padded batches. What
is ours (docs/serving.md says why): the request schemas, whose extra fields are this field's knobs (the openai
client sends them through `extra_body`) and whose unknown fields are refused; one spec that serves
/v1/completions (echo and logprobs included, which lm-eval's local-completions scores with) and
/v1/chat/completions on one queue, so the model loads once; the batch runner below; SSE framing; and `usage` with the
core steps per generated token and the FLOPs of the project's one counter.

Per request (top-level body fields): num_steps (core steps per token; the maximum under adaptive exit), init_scale
(the initial latent state's scale, 0: a zero state; with a random one, OpenAI's `seed` seeds it), exit_criterion,
exit_threshold, min_steps, prompt_num_steps (the prompt's fixed depth under adaptive exit), and for a
chain-of-thought model s1 budget forcing: max_thinking_tokens, min_thinking_tokens, num_waits. A model name
`NAME@16` sets num_steps where the body does not (lm-eval sends no depth field).

A batch runs as groups of rows that share their settings (depth, sampling, seed, budget): each group is one
generate call whose rows stop at their own max_tokens, stop strings or disconnection (under adaptive exit each
position computes only the steps it runs; a finished row rides along as padding until its group ends, and its
usage charges only its own tokens).
"""

import asyncio
import json
import multiprocessing
import queue
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .adaptive import CRITERIA
from .options import DEPTH, ranges

try:  # the engine: pip install -e ".[serve]"
    from fastapi import BackgroundTasks
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse
    from litserve import LitAPI, LitServer
    from litserve.specs.base import LitSpec
    from litserve.utils import LitAPIStatus, ResponseBufferItem
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise ImportError(f"rlm serve needs LitServe ({missing.name} is missing): pip install -e \".[serve]\"") from None

# --- requests: validated in the HTTP process, before they are queued (a bad row must not fail a whole batch) ------


class Knobs(BaseModel):
    """The test-time compute fields this field adds to OpenAI's requests (the openai client's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")
    num_steps: int | None = Field(None, ge=1, description="core steps per token (the maximum under adaptive exit)")
    init_scale: float | None = Field(None, ge=0, description="initial latent state scale; 0: zero state")
    exit_criterion: Literal[CRITERIA] | None = None  # type: ignore[valid-type]
    exit_threshold: float | None = Field(None, gt=0)
    min_steps: int | None = Field(None, ge=1)
    prompt_num_steps: int | None = Field(None, ge=1, description="the prompt's fixed depth under adaptive exit")
    max_thinking_tokens: int | None = Field(None, ge=0, description="s1 budget forcing: end thinking here")
    min_thinking_tokens: int | None = Field(None, ge=0, description="s1: suppress the end of thinking until here")
    num_waits: int | None = Field(None, ge=0, description="s1: times to append 'Wait' when thinking ends")


class Sampling(Knobs):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict]


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


DEFAULT_MAX_TOKENS = 16  # OpenAI's for completions; chat's default is "until the context ends", capped here


class BadRequest(ValueError):
    """A request the server refuses with 400 and this one-line message (naming the field where one is at fault)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def split_model_name(name: str, served: str) -> int | None:
    """The depth a model name asks for: `served` -> None, `served@16` -> 16; any other name is refused."""
    base, _, depth = name.partition("@")
    if base != served:
        raise BadRequest(f"model {name!r} is not served here; this server serves {served!r} (or {served}@STEPS)",
                         "model")
    if not depth:
        return None
    if not depth.isdigit() or int(depth) < 1:
        raise BadRequest(f"model {name!r}: the depth after '@' must be a whole number >= 1", "model")
    return int(depth)


# --- jobs: one per choice, plain data that crosses to the inference worker -------------------------------------------


def make_jobs(request: Sampling, prompts: list[list[int]], texts: list[str], served: str, defaults: dict,
              max_positions: int, recurrent: bool, has_thinking: bool, chat: bool) -> list[dict]:
    """The request's jobs (prompts x n), each with every setting resolved; a bad setting is a BadRequest here."""
    knobs = {k: v for k, v in request.model_dump(include=set(Knobs.model_fields)).items() if v is not None}
    name_depth = split_model_name(request.model, served)
    if name_depth is not None:
        knobs.setdefault("num_steps", name_depth)
    knobs = {**defaults, **knobs}
    depth_fields = [k for k in knobs if k in ("num_steps", "init_scale", "exit_criterion", "exit_threshold",
                                              "min_steps", "prompt_num_steps")]
    if depth_fields and not recurrent:
        raise BadRequest(f"{depth_fields[0]} sets a recurrent model's depth; this model is not recurrent",
                         depth_fields[0])
    budget = {k: knobs.pop(k) for k in ("max_thinking_tokens", "min_thinking_tokens", "num_waits") if k in knobs}
    if budget and not has_thinking:
        raise BadRequest(f"{next(iter(budget))} needs a chain-of-thought model (its tokenizer has no <think> "
                         "token)", next(iter(budget)))
    if budget.get("min_thinking_tokens", 0) > budget.get("max_thinking_tokens", float("inf")):
        raise BadRequest(f"min_thinking_tokens ({budget['min_thinking_tokens']}) > max_thinking_tokens "
                         f"({budget['max_thinking_tokens']})", "min_thinking_tokens")
    if recurrent:
        from .generation import check_generation_args
        try:
            check_generation_args(knobs.get("num_steps"), None, knobs.get("exit_criterion"),
                                  knobs.get("exit_threshold"), knobs.get("min_steps", 1), None, 4,
                                  prompt_num_steps=knobs.get("prompt_num_steps"))
        except (ValueError, TypeError) as error:
            raise BadRequest(str(error).splitlines()[0]) from None
    echo = bool(getattr(request, "echo", False))
    logprobs = getattr(request, "logprobs", None)
    if request.stream and (echo or logprobs is not None):
        raise BadRequest("echo and logprobs are not streamed: send them with stream false", "stream")
    if budget and (echo or logprobs is not None):
        raise BadRequest("logprobs are not given under budget forcing", "logprobs")
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if any(not s for s in stops):
        raise BadRequest("stop: an empty stop string would end every completion at once", "stop")
    jobs = []
    for index, (ids, text) in enumerate(zip(prompts, texts)):
        if not ids:
            raise BadRequest("the prompt is empty", "messages" if chat else "prompt")
        room = max_positions - len(ids)
        wanted = max_tokens if max_tokens is not None else (min(room, 4096) if chat else DEFAULT_MAX_TOKENS)
        if room <= 0 or wanted > room:
            raise BadRequest(f"the prompt ({len(ids)} tokens) + max_tokens ({wanted}) exceeds the model's context "
                             f"length ({max_positions} tokens)", "max_tokens" if room > 0 else "prompt")
        for choice in range(request.n):
            seed = None if request.seed is None else request.seed + choice
            jobs.append({"id": uuid.uuid4().hex, "index": index * request.n + choice, "prompt_index": index,
                         "prompt_ids": ids,
                         "prompt_text": text, "max_tokens": wanted, "stop": stops, "temperature": request.temperature,
                         "top_p": request.top_p, "seed": seed, "knobs": knobs, "budget": budget, "echo": echo,
                         "logprobs": logprobs})
    return jobs


# --- the batch runner (inference worker) ------------------------------------------------------------------------------


def finish_reason(job: dict, generated: list[int], tokenizer, cancelled) -> str | None:
    """Why a row ends after these generated tokens (eos aside): a stop string, its max_tokens, or its client gone."""
    if job["stop"] and cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), job["stop"])[1]:
        return "stop"
    if len(generated) >= job["max_tokens"]:
        return "length"
    if job["id"] in cancelled:
        return "cancelled"
    return None


class RowStops:
    """transformers stopping criterion, per row: `finish_reason`, applied inside generate."""

    def __init__(self, jobs: list[dict], prompt_length: int, tokenizer, cancelled):
        self.jobs, self.prompt_length, self.tokenizer, self.cancelled = jobs, prompt_length, tokenizer, cancelled
        self.done = [False] * len(jobs)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        for i, job in enumerate(self.jobs):
            if not self.done[i]:
                generated = input_ids[i, self.prompt_length:].tolist()
                self.done[i] = finish_reason(job, generated, self.tokenizer, self.cancelled) is not None
        return torch.tensor(self.done, device=input_ids.device)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to its first stop string (excluded, as OpenAI does), and whether one was found."""
    found = [text.index(s) for s in stops if s in text]
    return (text[: min(found)], True) if found else (text, False)


def held_back(text: str, stops: list[str]) -> int:
    """The length of the longest ending of `text` that begins some stop string (it may yet become one)."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if stop.startswith(text[-n:])), default=0)


class QueueStreamer:
    """A transformers streamer that hands each step's new tokens to the thread reading them."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:  # generate's first put is the prompt
            self.queue.put(value.reshape(value.shape[0], -1).tolist())
        self.prompt_seen = True

    def end(self) -> None:
        self.queue.put(None)


def group_key(job: dict) -> str:
    """Rows that can share one generate call: the same depth, sampling, seed and budget settings."""
    sampling = (job["temperature"] > 0, job["temperature"], job["top_p"])
    seeded = job["seed"] if job["temperature"] > 0 or job["knobs"].get("init_scale", 1) != 0 else None
    return json.dumps([job["knobs"], job["budget"], sampling, seeded, bool(job["logprobs"] is not None or job["echo"])],
                      sort_keys=True)


class Runner:
    """Runs a batch of jobs on the model and yields, per generated step, one event (or None) per job."""

    def __init__(self, model, tokenizer, cancelled=None):
        from .model import RecurrentLM
        self.model, self.tokenizer = model, tokenizer
        self.cancelled = cancelled if cancelled is not None else {}
        self.recurrent = isinstance(model, RecurrentLM)

    def run(self, jobs: list[dict]) -> Iterator[list[dict | None]]:
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(group_key(job), []).append(i)
        for rows in groups.values():
            for events in self.run_group([jobs[i] for i in rows]):
                out: list[dict | None] = [None] * len(jobs)
                for i, event in zip(rows, events):
                    out[i] = event
                yield out

    def generate_kwargs(self, job: dict) -> dict:
        knobs, kwargs = job["knobs"], {}
        if self.recurrent:
            kwargs = {k: knobs[k] for k in ("num_steps", "init_scale", "exit_criterion", "exit_threshold",
                                            "min_steps", "prompt_num_steps") if k in knobs}
        if job["temperature"] > 0:
            kwargs.update(do_sample=True, temperature=job["temperature"], top_p=job["top_p"])
        else:
            kwargs.update(do_sample=False)
        seed = job["seed"] if job["seed"] is not None else torch.seed() % 2**63
        if self.recurrent:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # sampling draws from torch's global generator
        return kwargs

    def run_group(self, jobs: list[dict]) -> Iterator[list[dict | None]]:
        if jobs[0]["budget"]:
            yield self.budget_forced(jobs)
            return
        from .data import collate
        tok, model = self.tokenizer, self.model
        batch = collate([{"input_ids": j["prompt_ids"]} for j in jobs], tok.pad_token_id, padding_side="left")
        width = batch["input_ids"].shape[1]
        stops = RowStops(jobs, width, tok, self.cancelled)
        streamer = QueueStreamer()
        result: dict = {}
        kwargs = self.generate_kwargs(jobs[0])

        def work():
            try:
                with torch.no_grad():
                    result["out"] = model.generate(
                        batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device),
                        max_new_tokens=max(j["max_tokens"] for j in jobs), pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, stopping_criteria=[stops], streamer=streamer,
                        return_dict_in_generate=True, **kwargs)
            except BaseException as error:  # re-raised in the serving thread
                result["error"] = error
                streamer.end()

        generated: list[list[int]] = [[] for _ in jobs]
        sent, reasons, out = [""] * len(jobs), [None] * len(jobs), None
        if max(j["max_tokens"] for j in jobs) > 0:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            while (tokens := streamer.queue.get()) is not None:
                events = []
                for i, job in enumerate(jobs):
                    if reasons[i] is None:
                        for token in tokens[i]:
                            reasons[i] = self.take(job, generated[i], token)
                            if reasons[i] is not None:
                                break
                    text = self.visible_text(generated[i], job["stop"], final=reasons[i] is not None)
                    delta, sent[i] = text[len(sent[i]):], text
                    events.append({"text": delta} if delta else None)
                yield events
            thread.join()
            if "error" in result:
                raise result["error"]
            out = result["out"]
        yield [self.final_event(i, job, generated[i], sent[i], reasons[i] or "length", out, batch)
               for i, job in enumerate(jobs)]

    def take(self, job: dict, generated: list[int], token: int) -> str | None:
        """Add a generated token to a row (eos stays out of its text); the row's finish reason if it ends here
        (`finish_reason`, the rule RowStops makes generate apply)."""
        if token == self.tokenizer.eos_token_id:
            return "eos"
        generated.append(token)
        return finish_reason(job, generated, self.tokenizer, self.cancelled)

    def visible_text(self, ids: list[int], stops: list[str], final: bool) -> str:
        """What may be sent so far: up to a stop string; while going on, never a half-decoded character or an ending
        that may be the start of a stop string."""
        text, found = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), stops)
        if final or found:
            return text
        text = text.rstrip("\ufffd")
        return text[: len(text) - held_back(text, stops)]

    def final_event(self, i: int, job: dict, ids: list[int], sent: str, reason: str, out, batch) -> dict:
        text = self.visible_text(ids, job["stop"], final=True)
        event = {"text": text[len(sent):], "finish_reason": "length" if reason == "length" else "stop",
                 "completion_tokens": len(ids), "prompt_tokens": len(job["prompt_ids"])}
        steps = prompt_steps = None
        if out is not None and getattr(out, "steps_per_token", None) is not None:
            ran = len(ids) + (reason == "eos")  # the eos token was computed too
            steps = out.steps_per_token[i, :ran].tolist()
            real = batch["attention_mask"][i].bool()
            prompt_steps = out.prompt_steps[i][real].tolist() if out.prompt_steps is not None else None
        event.update(self.cost(job, steps if steps is not None else [], prompt_steps, len(ids)))
        if job["echo"] or job["logprobs"] is not None:
            event.update(self.scored(job, ids))
        return event

    def cost(self, job: dict, steps: list[int], prompt_steps: list[int] | None, new_tokens: int) -> dict:
        """usage's extra fields: core steps per generated token (mean) and FLOPs, from the project's counter."""
        from .flops import causal_lm_generation_flops
        prompt = len(job["prompt_ids"])
        if not self.recurrent:
            return {"flops": causal_lm_generation_flops(self.model, prompt, new_tokens)}
        from .answering import generated_flops
        from .depth import resolve_num_steps
        knobs = job["knobs"]
        max_steps = resolve_num_steps(knobs.get("num_steps"), self.model.config).total
        flops = generated_flops(self.model.config, prompt, len(steps), steps, prompt_steps, max_steps,
                                knobs.get("exit_criterion"), prompt_exit=knobs.get("prompt_num_steps") is None)
        return {"core_steps_per_token": sum(steps) / len(steps) if steps else 0.0, "flops": flops}

    @torch.no_grad()
    def scored(self, job: dict, generated: list[int]) -> dict:
        """Echo and logprobs (OpenAI's completions format): every token's log-probability given what precedes it,
        and the top `logprobs` alternatives, from one forward pass at the request's depth."""
        tok, ids = self.tokenizer, job["prompt_ids"] + generated
        kwargs = {}
        if self.recurrent:
            knobs = job["knobs"]
            kwargs = {k: knobs[k] for k in ("num_steps", "init_scale") if k in knobs}
            kwargs["generator"] = torch.Generator().manual_seed(job["seed"] or 0)
        logits = self.model(torch.tensor([ids], device=self.model.device), **kwargs).logits[0].float()
        logp = logits.log_softmax(-1)
        shown = ids if job["echo"] else generated
        start = 0 if job["echo"] else len(job["prompt_ids"])
        tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
        k = max(job["logprobs"] or 0, 1)
        for position, token in enumerate(shown, start=start):
            piece = tok.decode([token])
            tokens.append(piece)
            offsets.append(offset)
            offset += len(piece)
            if position == 0:
                token_logprobs.append(None)
                top.append(None)
                continue
            row = logp[position - 1]
            token_logprobs.append(float(row[token]))
            values, indices = row.topk(k)
            top.append({tok.decode([int(t)]): float(v) for v, t in zip(values, indices)})
        result = {"logprobs": {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                               "text_offset": offsets} if job["logprobs"] is not None else None}
        if job["echo"]:
            result["echo_text"] = job["prompt_text"]
        return result

    def budget_forced(self, jobs: list[dict]) -> list[dict]:
        """s1 budget forcing for a group (think within the budget, "Wait" until the minimum, then answer): one
        final event per job, the thinking, its end delimiter and the answer as the completion's text."""
        from .eval.budget_forcing import budget_forced_generate
        from .flops import causal_lm_generation_flops
        from .special_tokens import THINK_END
        budget, knobs = jobs[0]["budget"], jobs[0]["knobs"]
        kwargs = self.generate_kwargs(jobs[0])
        prompts = [self.tokenizer.decode(j["prompt_ids"], skip_special_tokens=True) for j in jobs]
        results = budget_forced_generate(
            self.model, self.tokenizer, prompts, max_thinking=budget.get("max_thinking_tokens"),
            min_thinking=budget.get("min_thinking_tokens", 0), num_waits=budget.get("num_waits", 0),
            max_answer_tokens=max(j["max_tokens"] for j in jobs), **kwargs)
        end = self.tokenizer(THINK_END, add_special_tokens=False).input_ids
        events = []
        for job, result in zip(jobs, results):
            answer = [t for t in result.answer_ids if t != self.tokenizer.eos_token_id]
            text = cut_at_stop(self.tokenizer.decode(result.thinking_ids + end + answer, skip_special_tokens=False)
                               .replace(self.tokenizer.eos_token or "\0", ""), job["stop"])[0]
            event = {"text": text, "finish_reason": "stop", "prompt_tokens": result.prompt_tokens,
                     "completion_tokens": result.new_tokens, "thinking_tokens": len(result.thinking_ids),
                     "flops": causal_lm_generation_flops(self.model, result.prompt_tokens, result.new_tokens,
                                                         knobs.get("num_steps"))}
            if self.recurrent:
                event["core_steps_per_token"] = float(
                    knobs.get("num_steps") or self.model.config.mean_recurrence)
            events.append(event)
        return events


# --- the HTTP side: one LitServe spec for completions and chat, on one queue ------------------------------------------


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def validation_message(error) -> tuple[str, str | None]:
    """pydantic's first complaint about a request body as one line naming the field."""
    first = error.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = where[0] if where else None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON (in UTF-8)", None
    if first.get("type") == "extra_forbidden":
        return f"{field}: unknown field (the fields this server takes: docs/serving.md)", field
    return f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}", field


class ServeSpec(LitSpec):
    """/v1/completions, /v1/chat/completions and /v1/models on one queue (LitServe's OpenAISpec serves chat only,
    without logprobs, and drops unknown fields)."""

    def __init__(self, model_path: str, served: str, defaults: dict, shared: "Shared"):
        super().__init__()
        self.api_path = "/v1/completions"
        self.model_path, self.served, self.defaults, self.shared = model_path, served, defaults, shared
        self.tokenizer = self.config = None

    @property
    def stream(self):
        return True

    def __getstate__(self):  # the workers load their own tokenizer
        state = super().__getstate__()
        state["tokenizer"] = None
        return state

    def pre_setup(self, lit_api):
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    def setup(self, server):
        super().setup(server)
        from .loading import load_tokenizer, model_dir
        from transformers import AutoConfig
        self.tokenizer = load_tokenizer(self.model_path)
        self.config = AutoConfig.from_pretrained(model_dir(self.model_path))
        self.recurrent = self.config.model_type == "recurrent_lm"
        vocabulary = self.tokenizer.get_vocab()
        self.has_thinking = "<think>" in vocabulary and "</think>" in vocabulary
        self.max_positions = getattr(self.config, "max_position_embeddings", None) or 10**9

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        yield from output

    async def models(self):
        return {"object": "list", "data": [{"id": self.served, "object": "model", "created": 0,
                                            "owned_by": "recurrent-lm"}]}

    def jobs(self, request, chat: bool) -> list[dict]:
        if chat:
            text = self.render_chat(request.messages)
            prompts, texts = [self.tokenizer(text, add_special_tokens=not self.tokenizer.chat_template).input_ids], [text]
        else:
            prompts, texts = self.encode_prompts(request.prompt)
        return make_jobs(request, prompts, texts, self.served, self.defaults, self.max_positions, self.recurrent,
                         self.has_thinking, chat)

    def render_chat(self, messages) -> str:
        plain = []
        for message in messages:
            content = message.content
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            plain.append({"role": message.role, "content": content})
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        return "\n".join(m["content"] for m in plain)  # no template: the contents, as the model's prompt

    def encode_prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        vocabulary = len(self.tokenizer)
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise BadRequest("the prompt is empty", "prompt")
        ids, texts = [], []
        for item in prompt:
            if isinstance(item, str):
                ids.append(self.tokenizer(item).input_ids if item else [])
                texts.append(item)
            else:
                if any(t < 0 or t >= vocabulary for t in item):
                    raise BadRequest(f"prompt: token ids must be in 0..{vocabulary - 1}", "prompt")
                ids.append(list(item))
                texts.append(self.tokenizer.decode(item))
        return ids, texts

    def submit(self, jobs: list[dict]) -> list:
        streams = []
        for job in jobs:
            self.shared.inflight[job["id"]] = True  # a shutdown waits for it
            q, event = deque(), asyncio.Event()
            self.response_buffer[job["id"]] = ResponseBufferItem(response_queue=q, event=event)
            self.request_queue.put((self.response_queue_id, job["id"], time.monotonic(), job))
            streams.append(self.data_streamer(q, event, send_status=True))
        return streams

    async def events(self, job, stream):
        try:
            async for data, status in stream:
                if status == LitAPIStatus.ERROR:
                    raise RuntimeError(f"the model failed on this request: {data}")
                if data:
                    yield json.loads(data)
        finally:
            self.shared.inflight.pop(job["id"], None)

    async def respond(self, request, chat: bool, background_tasks: BackgroundTasks):
        if self.shared.draining.is_set():
            return JSONResponse(error_body("the server is shutting down", kind="server_error"), status_code=503)
        try:
            jobs = self.jobs(request, chat)
        except ValueError as error:  # BadRequest, or the tokenizer refusing the text (outside its alphabet)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            return JSONResponse(error_body(message, getattr(error, "param", None)), status_code=400)
        streams = self.submit(jobs)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": request.model}
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.stream_chunks(jobs, streams, head, chat, include_usage),
                                     media_type="text/event-stream", background=background_tasks)
        try:
            finals = await asyncio.gather(*(self.collect(job, s) for job, s in zip(jobs, streams)))
        except RuntimeError as error:
            return JSONResponse(error_body(str(error), kind="server_error"), status_code=500)
        choices = []
        for job, (text, final) in zip(jobs, finals):
            if chat:
                choices.append({"index": job["index"], "message": {"role": "assistant", "content": text},
                                "finish_reason": final["finish_reason"], "logprobs": None})
            else:
                shown = final.get("echo_text", "") + text
                choices.append({"index": job["index"], "text": shown, "logprobs": final.get("logprobs"),
                                "finish_reason": final["finish_reason"]})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage(jobs, [f for _, f in finals])}

    async def collect(self, job, stream) -> tuple[str, dict]:
        text, final = "", {}
        async for event in self.events(job, stream):
            text += event.get("text", "")
            if "finish_reason" in event:
                final = event
        return text, final

    async def stream_chunks(self, jobs, streams, head, chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(job, stream):
            try:
                async for event in self.events(job, stream):
                    await merged.put((job, event))
            except RuntimeError as error:
                await merged.put((job, {"error": str(error)}))
            await merged.put((job, None))

        tasks = [asyncio.create_task(pump(job, s)) for job, s in zip(jobs, streams)]
        finals, open_streams = {}, len(jobs)
        try:
            if chat:
                for job in jobs:
                    choice = {"index": job["index"], "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None}
                    yield f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"
            while open_streams:
                job, event = await merged.get()
                if event is None:
                    open_streams -= 1
                    continue
                if "error" in event:
                    yield f"data: {json.dumps(error_body(event['error'], kind='server_error'))}\n\n"
                    continue
                finish = event.get("finish_reason")
                if finish:
                    finals[job["id"]] = event
                text = event.get("text", "")
                if chat:
                    choice = {"index": job["index"], "delta": {"content": text} if text else {},
                              "finish_reason": finish}
                else:
                    choice = {"index": job["index"], "text": text, "logprobs": None, "finish_reason": finish}
                yield f"data: {json.dumps({**head, 'object': kind, 'choices': [choice]})}\n\n"
            if include_usage:
                chunk = {**head, "object": kind, "choices": [], "usage": usage(jobs, [finals.get(j["id"], {})
                                                                                    for j in jobs])}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a client gone mid-stream: its rows stop at their next token
            for job in jobs:
                if job["id"] not in finals:
                    self.shared.cancelled[job["id"]] = True
            for task in tasks:
                task.cancel()

    async def completions(self, request: CompletionRequest, background_tasks: BackgroundTasks):
        return await self.respond(request, False, background_tasks)

    async def chat_completions(self, request: ChatCompletionRequest, background_tasks: BackgroundTasks):
        return await self.respond(request, True, background_tasks)



def usage(jobs: list[dict], finals: list[dict]) -> dict:
    """OpenAI's token counts (each prompt counted once) and this field's: the mean core steps per generated token
    over the request's completions, and the FLOPs they cost (the project's counter)."""
    prompts = {job["prompt_index"]: len(job["prompt_ids"]) for job in jobs}
    completion = sum(f.get("completion_tokens", 0) for f in finals)
    prompt = sum(prompts.values())
    result = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
              "flops": sum(f.get("flops", 0) for f in finals)}
    if any("core_steps_per_token" in f for f in finals):
        weighted = sum(f.get("core_steps_per_token", 0) * f.get("completion_tokens", 0) for f in finals)
        result["core_steps_per_token"] = weighted / completion if completion else 0.0
    if any("thinking_tokens" in f for f in finals):
        result["thinking_tokens"] = sum(f.get("thinking_tokens", 0) for f in finals)
    return result


@dataclass
class Shared:
    """State the HTTP processes, the inference worker and the main process share (multiprocessing proxies)."""

    cancelled: dict  # job ids whose client went away: their rows stop at the next token
    inflight: dict  # job ids submitted and not yet answered: a shutdown waits for them
    draining: object  # an Event: set on shutdown, new requests then get a 503

    @classmethod
    def create(cls) -> "Shared":
        manager = multiprocessing.get_context("spawn").Manager()
        return cls(manager.dict(), manager.dict(), manager.Event())


class ServedModel(LitAPI):
    """The inference worker: loads the model once and runs each batch of jobs through a Runner."""

    def __init__(self, model_path: str, shared: "Shared", **kwargs):
        super().__init__(**kwargs)
        self.model_path, self.shared = model_path, shared

    def setup(self, device):
        from .loading import load_any_causal_lm, load_tokenizer
        tokenizer = load_tokenizer(self.model_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.runner = Runner(load_any_causal_lm(self.model_path).eval(), tokenizer, self.shared.cancelled)

    def decode_request(self, request):
        return request

    def batch(self, jobs):
        return list(jobs)

    def predict(self, jobs):
        try:
            yield from self.runner.run(jobs)
        finally:
            for job in jobs:
                self.shared.cancelled.pop(job["id"], None)

    def unbatch(self, output):
        yield from output

    def encode_response(self, output):
        yield from output


@ranges(port="[1024, 65535]", num_steps=DEPTH, init_scale=">= 0", exit_threshold="> 0", max_batch_size=">= 1",
        batch_timeout=">= 0", timeout="> 0", drain_timeout=">= 0")
def serve(model: str, host: Literal["127.0.0.1", "0.0.0.0", "::"] = "127.0.0.1", port: int = 8000,
          name: str | None = None, num_steps: int | None = None, init_scale: float | None = None,
          exit_criterion: Literal[CRITERIA] | None = None, exit_threshold: float | None = None,  # type: ignore[valid-type]
          max_batch_size: int = 16, batch_timeout: float = 0.01, timeout: float = 120.0,
          drain_timeout: float = 60.0, log_level: str = "warning") -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming) with per-request depth.

    Args:
        model: a RecurrentLM directory or any name --model resolves (`rlm models`), or any transformers causal LM
            directory (served without depth fields: the token-level methods, budget forcing).
        host: the address to listen on (127.0.0.1: this machine only).
        port: the port to listen on (1024-65535).
        name: the model name clients send (default: the model's directory or short name); NAME@STEPS asks for a
            depth.
        num_steps: the default core steps per token of a request that sets none.
        init_scale: the default initial latent state scale (0: a zero state: greedy output is deterministic).
        exit_criterion: the default adaptive exit criterion (none: a fixed depth).
        exit_threshold: its default threshold.
        max_batch_size: requests run together in one batch at most.
        batch_timeout: seconds the worker waits to fill a batch.
        timeout: seconds a request may wait in the queue before a 504.
        drain_timeout: on SIGTERM or Ctrl-C, seconds to finish the requests in flight (new ones get a 503).
        log_level: uvicorn's and LitServe's log level.
    """
    from .loading import load_tokenizer, model_dir, model_type
    kind = model_type(model)  # a bad --model fails now, in one line, before any process starts
    load_tokenizer(model)
    directory = model_dir(model)
    defaults = {k: v for k, v in dict(num_steps=num_steps, init_scale=init_scale, exit_criterion=exit_criterion,
                                      exit_threshold=exit_threshold).items() if v is not None}
    if defaults and kind != "recurrent_lm":
        raise ValueError(f"--{next(iter(defaults))} sets a recurrent model's depth; {model} is not a RecurrentLM")
    from .generation import check_generation_args
    check_generation_args(num_steps, None, exit_criterion, exit_threshold, 1, None, 4)
    served = name or (model if not Path(model).exists() else Path(model).resolve().name)
    shared = Shared.create()
    spec = ServeSpec(str(directory), served, defaults, shared)
    api = ServedModel(str(directory), shared, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                      api_path="/v1/completions", spec=spec)
    server = LitServer(api, accelerator="cpu" if not torch.cuda.is_available() else "auto", timeout=timeout)

    async def refuse(request, error):
        message, field = validation_message(error)
        return JSONResponse(error_body(message, field), status_code=400)

    async def http_error(request, error):  # FastAPI's own refusals (a body it cannot parse) in OpenAI's shape
        detail = str(error.detail)
        if "parsing the body" in detail:
            detail = "the request body is not valid JSON (in UTF-8)"
        return JSONResponse(error_body(detail), status_code=error.status_code)

    server.app.add_exception_handler(RequestValidationError, refuse)
    server.app.add_exception_handler(HTTPException, http_error)
    print(f"serving {served} ({directory}) on http://{host}:{port}/v1 (completions, chat/completions, models)",
          flush=True)

    def drain(signum, frame):
        """SIGTERM (or Ctrl-C): refuse new requests, finish the ones in flight (up to `drain_timeout` seconds), then
        LitServe's own graceful shutdown."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        shared.draining.set()
        deadline = time.monotonic() + drain_timeout
        while len(shared.inflight) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"shut down ({len(shared.inflight)} requests unfinished)", flush=True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    server.run(host=host, port=port, num_api_servers=1, log_level=log_level, generate_client_file=False)
