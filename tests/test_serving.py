"""`rlm serve`: a real server on a free loopback port, driven by the official openai client, against the same model
run in-process (greedy, zero initial state: the server's text must be generate's text at the same depth)."""

import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("litserve")

from recurrent_lm.answering import generated_flops  # noqa: E402
from recurrent_lm.loading import load_model_and_tokenizer  # noqa: E402
from recurrent_lm.serving import BadRequest, CompletionRequest, Runner, make_jobs, split_model_name  # noqa: E402
from recurrent_lm.tasks import get_task  # noqa: E402

MODEL = "demo-latent"  # permutation task, trained k <= 4: depth decides the hard problems
PROBLEMS = [p for k in (1, 2, 3, 4, 4, 4) for p in get_task("permutation").problems(k, 3, seed=31337)][:16]
PROMPTS = [get_task("permutation").prompt(p) for p in PROBLEMS]
ZERO = {"init_scale": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(*options: str):
    """`rlm serve --model MODEL` on a free loopback port, healthy; SIGTERM (a drain) when the block ends."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "recurrent_lm.cli", "serve", "--model", MODEL, "--port",
                                str(port), *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            pytest.fail(f"rlm serve exited: {process.stdout.read()[-2000:]}")
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("rlm serve did not become healthy in 120 s")
    try:
        yield base, process
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def server():
    with running_server("--max_batch_size", "16", "--batch_timeout", "0.05") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local():
    model, tokenizer = load_model_and_tokenizer(MODEL)
    return model, tokenizer


def generate_locally(local, prompt: str, num_steps: int, max_tokens: int = 8, **kwargs):
    """What `rlm generate` computes: batch 1, greedy, the same depth."""
    model, tok = local
    encoded = tok(prompt, return_tensors="pt", return_token_type_ids=False)
    out = model.generate(**encoded, num_steps=num_steps, max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, return_dict_in_generate=True,
                         generator=torch.Generator().manual_seed(0), **{**ZERO, **kwargs})
    new = out.sequences[0, encoded.input_ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    return tok.decode([t for t in new if t != tok.eos_token_id]), out.steps_per_token[0, : len(new)].tolist(), \
        encoded.input_ids.shape[1]


def test_completion_at_each_depth_is_generates_text_with_usage_from_the_counter(client, local):
    hard = PROMPTS[-1]
    texts = {}
    for steps in (1, 16):
        reply = client.completions.create(model=MODEL, prompt=hard, max_tokens=8, temperature=0,
                                          extra_body={"num_steps": steps, **ZERO})
        text, used, prompt_tokens = generate_locally(local, hard, steps)
        assert reply.choices[0].text == text
        texts[steps] = text
        usage = reply.usage.model_dump()
        assert usage["prompt_tokens"] == prompt_tokens and usage["completion_tokens"] == len(text)
        assert usage["core_steps_per_token"] == steps
        assert usage["flops"] == generated_flops(local[0].config, prompt_tokens, len(used), used, None, steps)
    assert texts[1] != texts[16]  # the depth is the request's: a hard problem needs the deeper one
    assert texts[16] == get_task("permutation").completion(PROBLEMS[-1]).replace("<eos>", "")


def test_model_name_sets_the_depth_where_the_body_does_not(client, local):
    reply = client.completions.create(model=f"{MODEL}@16", prompt=PROMPTS[-1], max_tokens=8, temperature=0,
                                      extra_body=ZERO)
    assert reply.usage.model_dump()["core_steps_per_token"] == 16
    assert reply.choices[0].text == generate_locally(local, PROMPTS[-1], 16)[0]


def test_sixteen_concurrent_clients_each_get_their_own_batch_one_answer(client, local):
    def ask(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                         extra_body={"num_steps": 8, **ZERO}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        served = list(pool.map(ask, PROMPTS))
    assert served == [generate_locally(local, p, 8)[0] for p in PROMPTS]


def test_chat_streaming_and_adaptive_exit(client, local):
    messages = [{"role": "user", "content": PROMPTS[-1]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"num_steps": 16, **ZERO})
    assert whole.choices[0].message.content == generate_locally(local, PROMPTS[-1], 16)[0]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"num_steps": 16, **ZERO})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # token by token, not one piece at the end
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    adaptive = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                         extra_body={"num_steps": 32, "exit_criterion": "kl", **ZERO})
    assert adaptive.usage.model_dump()["core_steps_per_token"] < 32  # easy tokens exit early
    assert adaptive.choices[0].text == generate_locally(local, PROMPTS[0], 32, exit_criterion="kl")[0]


def test_echo_and_logprobs_score_the_prompt_at_the_requested_depth(client, local):
    model, tok = local
    reply = client.completions.create(model=f"{MODEL}@4", prompt=PROMPTS[-1], max_tokens=1, temperature=0, echo=True,
                                      logprobs=1, extra_body=ZERO)
    logprobs = reply.choices[0].logprobs
    ids = tok(PROMPTS[-1]).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids]), num_steps=4, init_scale=0).logits[0].log_softmax(-1)
    assert logprobs.token_logprobs[0] is None and len(logprobs.tokens) == len(ids) + 1
    for position in range(1, len(ids)):
        assert logprobs.token_logprobs[position] == pytest.approx(float(expected[position - 1, ids[position]]),
                                                                  abs=1e-4)
    assert reply.choices[0].text.startswith(PROMPTS[-1])


@pytest.mark.parametrize("body, field", [
    ({"prompt": "0123?", "num_stepz": 4}, "num_stepz"),
    ({"prompt": "0123?", "num_steps": 0}, "num_steps"),
    ({"prompt": "0123?", "exit_criterion": "never"}, "exit_criterion"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "0123?", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "0123?", "max_thinking_tokens": 8, "min_thinking_tokens": 9}, "min_thinking_tokens"),
])
def test_bad_requests_get_a_400_naming_the_field(server, body, field):
    reply = httpx.post(f"{server[0]}/v1/completions", json={"model": MODEL, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert field in error["message"] and "\n" not in error["message"]


def test_a_body_that_is_not_utf8_json_and_an_unknown_model_get_a_400(server, client):
    reply = httpx.post(f"{server[0]}/v1/completions", content=b'{"model": "\xff\xfe", "prompt": "0?"}',
                       headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="0123?", max_tokens=2)


def test_a_client_gone_mid_stream_leaves_the_server_serving(server, client, local):
    with httpx.stream("POST", f"{server[0]}/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "stream": True, "num_steps": 4,
                            "init_scale": 0}) as response:
        next(response.iter_lines())
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                      extra_body={"num_steps": 4, **ZERO})
    assert reply.choices[0].text == generate_locally(local, PROMPTS[1], 4)[0]


def test_shutdown_finishes_the_requests_in_flight_and_refuses_new_ones(server):
    """Last of the server tests: SIGTERM stops this module's server."""
    base, process = server
    replies = {}

    def slow():
        replies["slow"] = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": PROMPTS[-1], "max_tokens": 8, "num_steps": 400, "init_scale": 0,
            "temperature": 0})

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(1.0)  # queued and running
    process.terminate()
    time.sleep(0.5)
    try:
        late = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0]}, timeout=30)
        assert late.status_code == 503
    except httpx.TransportError:
        pass  # or the listener is already closed
    thread.join()
    assert replies["slow"].status_code == 200 and replies["slow"].json()["usage"]["core_steps_per_token"] == 400
    process.wait(timeout=60)


# --- the pieces, in-process -------------------------------------------------------------------------------------------


def request(**fields):
    return CompletionRequest(model=MODEL, prompt="0?", **fields)


def test_model_names_and_request_checks():
    assert split_model_name(MODEL, MODEL) is None and split_model_name(f"{MODEL}@16", MODEL) == 16
    for bad in ("other", f"{MODEL}@x", f"{MODEL}@0"):
        with pytest.raises(BadRequest):
            split_model_name(bad, MODEL)
    settings = dict(served=MODEL, defaults={"num_steps": 4}, max_positions=64, recurrent=True, has_thinking=False,
                    chat=False)
    (job,) = make_jobs(request(max_tokens=3), [[1, 5]], ["0?"], **settings)
    assert job["knobs"] == {"num_steps": 4} and job["max_tokens"] == 3
    assert make_jobs(request(num_steps=9), [[1, 5]], ["0?"], **settings)[0]["knobs"]["num_steps"] == 9
    for fields, message in [({"min_steps": 9}, "min_steps"), ({"exit_threshold": 0.1}, "exit_threshold"),
                            ({"stream": True, "echo": True}, "echo"), ({"stop": [""]}, "stop")]:
        with pytest.raises(BadRequest, match=message):
            make_jobs(request(**fields), [[1, 5]], ["0?"], **settings)
    with pytest.raises(BadRequest, match="not recurrent"):
        make_jobs(request(num_steps=2), [[1, 5]], ["0?"], **{**settings, "recurrent": False, "defaults": {}})


def test_runner_stops_rows_at_their_own_limits_and_when_cancelled(local):
    model, tok = local
    settings = dict(served=MODEL, defaults={"num_steps": 2, "init_scale": 0}, max_positions=256, recurrent=True,
                    has_thinking=False, chat=False)
    ids = tok(PROMPTS[0]).input_ids
    short, long, gone = (make_jobs(request(max_tokens=n, temperature=0), [ids], [PROMPTS[0]], **settings)[0]
                         for n in (2, 40, 40))
    cancelled = {gone["id"]: True}
    events = list(Runner(model, tok, cancelled).run([short, long, gone]))
    final = events[-1]
    assert final[0]["completion_tokens"] == 2 and final[0]["finish_reason"] == "length"
    assert final[1]["finish_reason"] == "stop"  # eos: the answer is 5 digits
    assert final[2]["completion_tokens"] == 1  # cancelled: it stops after the token in flight


def test_budget_forcing_per_request_on_a_chain_of_thought_model():
    model, tok = load_model_and_tokenizer("demo-cot")
    problem = get_task("permutation").problems(4, 1, seed=7)[0]
    prompt = get_task("permutation").prompt(problem, cot=True)
    settings = dict(served="demo-cot", defaults={"init_scale": 0}, max_positions=256, recurrent=True,
                    has_thinking=True, chat=False)
    ids = tok(prompt).input_ids
    (job,) = make_jobs(CompletionRequest(model="demo-cot", prompt=prompt, max_tokens=8, temperature=0,
                                         max_thinking_tokens=6), [ids], [prompt], **settings)
    (event,) = list(Runner(model, tok).run([job]))[-1]
    assert event["thinking_tokens"] <= 6 and "</think>" in event["text"]
    assert event["flops"] > 0


@pytest.mark.slow
def test_lm_eval_local_completions_scores_the_served_model_as_rlm_lm_eval_does(tmp_path):
    """lm-eval's own API backend against the in-process `rlm lm-eval` on the same tasks at the same depth:
    loglikelihood (echo and logprobs; the depth in the model name) and generation (exact match)."""
    pytest.importorskip("lm_eval")
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    from recurrent_lm.eval.lm_eval import lm_eval_sweep
    from recurrent_lm.loading import model_dir
    from tests.test_lm_eval import permutation_choice_task

    permutation_choice_task(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "perm.jsonl").read_text().splitlines()]
    (tmp_path / "perm-gen.jsonl").write_text("".join(
        json.dumps({"question": r["question"], "answer": r["choices"][r["answer"]]}) + "\n" for r in rows))
    (tmp_path / "rlm_perm_gen.yaml").write_text(f"""task: rlm_perm_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "perm-gen.jsonl"}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<eos>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    local = lm_eval_sweep(MODEL, "rlm_perm,rlm_perm_gen", steps="4", out=tmp_path / "out", include_path=tmp_path)
    local_acc = next(r["value"] for r in local["rows"] if r["metric"] == "acc")
    local_match = next(r["value"] for r in local["rows"] if r["metric"] == "exact_match")
    with running_server("--init_scale", "0") as (base, _):
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=["rlm_perm", "rlm_perm_gen"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            model_args={"model": f"{MODEL}@4", "base_url": f"{base}/v1/completions",
                        "tokenizer": str(model_dir(MODEL)), "tokenizer_backend": "huggingface",
                        "add_bos_token": True, "num_concurrent": 4, "max_retries": 1})
    print(f"acc: served {served['results']['rlm_perm']['acc,none']}, in-process {local_acc}; exact match: served "
          f"{served['results']['rlm_perm_gen']['exact_match,none']}, in-process {local_match}")
    assert served["results"]["rlm_perm"]["acc,none"] == pytest.approx(local_acc, abs=1 / 24)  # one problem at most
    assert served["results"]["rlm_perm_gen"]["exact_match,none"] == pytest.approx(local_match, abs=1 / 24)
    assert local_match >= 0.8  # the generation task is one the model solves: a match of two zeros proves nothing




def test_streamed_pieces_add_up_to_the_text_cut_at_a_stop_string(local):
    model, tok = local
    answer = get_task("permutation").completion(PROBLEMS[-1]).replace("<eos>", "")
    settings = dict(served=MODEL, defaults={"num_steps": 16, "init_scale": 0}, max_positions=256, recurrent=True,
                    has_thinking=False, chat=False)
    ids = tok(PROMPTS[-1]).input_ids
    for stop, expected in [(["<eos>"], answer), ([answer[2:4]], answer[:2]), ([answer[1:3], "x"], answer[:1])]:
        (job,) = make_jobs(request(max_tokens=8, temperature=0, stop=stop), [ids], [PROMPTS[-1]], **settings)
        pieces = [events[0]["text"] for events in Runner(model, tok).run([job]) if events[0]]
        assert "".join(pieces) == expected, (stop, pieces)


def test_any_transformers_causal_lm_is_served_without_depth_fields():
    from transformers import LlamaConfig, LlamaForCausalLM

    from recurrent_lm.flops import causal_lm_generation_flops
    from recurrent_lm.tasks import task_tokenizer

    tok = task_tokenizer(["permutation"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)).eval()
    settings = dict(served="llama", defaults={}, max_positions=64, recurrent=False, has_thinking=False, chat=False)
    ids = tok(PROMPTS[0]).input_ids
    jobs = make_jobs(CompletionRequest(model="llama", prompt=PROMPTS[0], max_tokens=4, temperature=0, n=2), [ids],
                     [PROMPTS[0]], **settings)
    events = list(Runner(model, tok).run(jobs))
    final = events[-1]
    texts = ["".join(step[i]["text"] for step in events if step[i]) for i in range(len(jobs))]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    expected = expected[: expected.index(tok.eos_token_id)] if tok.eos_token_id in expected else expected
    for text, event in zip(texts, final):
        assert text == tok.decode(expected, skip_special_tokens=True)
        assert event["flops"] == causal_lm_generation_flops(model, len(ids), event["completion_tokens"])
        assert "core_steps_per_token" not in event


@pytest.mark.parametrize("options, message", [
    ({"num_steps": 0}, "num_steps"), ({"port": 80}, "port"), ({"exit_threshold": 0.1}, "exit_criterion"),
    ({"model": "no-such-model-dir"}, "not a model directory"),
])
def test_serve_refuses_bad_options_before_starting(options, message):
    from recurrent_lm.serving import serve

    with pytest.raises((ValueError, FileNotFoundError, NotADirectoryError), match=message):
        serve(**{"model": MODEL, **options})
