"""The library's own commands: generate text, convert Huginn-0125, list and export the tasks, train tokenizers.
Each is a typed function; `recurrent_lm.cli` hands them to jsonargparse (their docstrings are their --help)."""

import glob
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .generation import check_generation_args
from .huginn import convert_huginn_checkpoint
from .loading import load_model_and_tokenizer
from .options import DEPTH, PROBLEMS, ranges
from .recipes import checkpoint_names
from .outputs import claimed_output
from .special_tokens import SPECIAL_TOKENS
from .tasks import TASKS, IntList, get_task, parse_int_list, problem_set, save_jsonl, task_tokenizer
from .tokenization import train_bpe_tokenizer
from .traces import save_rows, trace_row


def convert_huginn(src: Path, dst: Path, dtype: str | None = None, overwrite: bool = False) -> None:
    """Convert a Huginn-0125 checkpoint directory (reference config.json + safetensors) into a RecurrentLM directory.

    Args:
        src: the Huginn checkpoint directory (e.g. a local copy of tomg-group-umd/huginn-0125).
        dst: where to write the converted model; `RecurrentLM.from_pretrained(dst)` loads it.
        dtype: cast the weights, e.g. float32 or bfloat16; by default they keep the checkpoint's dtype.
        overwrite: replace dst if it already exists.
    """
    out = convert_huginn_checkpoint(src, dst, dtype=dtype, overwrite=overwrite)
    print(f"wrote {out}")


@ranges(num_steps=DEPTH, max_new_tokens=">= 1", exit_threshold="> 0", min_steps=DEPTH, draft_steps=DEPTH,
        draft_length=">= 1", core_slots=">= 1", temperature="> 0", top_p="(0, 1]", init_scale=">= 0", seed=">= 0")
def generate(
    model: Path,
    prompt: str,
    num_steps: int | None = None,
    max_new_tokens: int = 64,
    exit_criterion: Literal["kl", "entropy-diff", "latent-diff", "cosine", "argmax-stability", "gate"] | None = None,
    exit_threshold: float | None = None,
    min_steps: int = 1,
    continuous_cot: bool = False,
    draft_steps: int | None = None,
    draft_length: int = 4,
    core_slots: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    init_scale: float | None = None,
    seed: int = 0,
    tokenizer: Path | None = None,
) -> None:
    """Generate text from a prompt and print it with the core steps each generated token used.

    Args:
        model: a RecurrentLM directory (trained here, exported, or converted from Huginn-0125).
        prompt: the text to continue.
        num_steps: core steps per token (the maximum with adaptive exit); default: the model's mean_recurrence.
        max_new_tokens: tokens to generate at most.
        exit_criterion: adaptive per-token exit; kl and entropy-diff compare successive next-token
            distributions, latent-diff and cosine successive latent states, argmax-stability the top token.
        exit_threshold: the criterion's threshold (defaults: kl 1e-3, entropy-diff 1e-3, latent-diff 0.03,
            cosine 1e-3, argmax-stability 5 steps).
        min_steps: no token exits before this many steps.
        continuous_cot: start each token's latent state from the previous token's final state.
        draft_steps: self-speculative decoding: draft at this depth, verify at num_steps (greedy only).
        draft_length: tokens drafted per verification.
        core_slots: bound the cache to this many slots per core layer (a ring); default: one per step.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        init_scale: scale of the random initial latent state (0: zero state); default: the model's.
        seed: seeds sampling and the random initial states.
        tokenizer: tokenizer directory, if the model directory has none.
    """
    check_generation_args(num_steps, max_new_tokens, exit_criterion, exit_threshold, min_steps, draft_steps,
                          draft_length)  # before the model loads: bad settings fail at once
    net, tok = load_model_and_tokenizer(model, tokenizer)
    torch.manual_seed(seed)
    try:
        encoded = tok(prompt, return_tensors="pt", return_token_type_ids=False)  # ids and mask: what the model reads
    except ValueError:
        raise
    except Exception as error:  # a damaged tokenizer fails only when it encodes (tokenizers' own Exception)
        raise ValueError(f"the tokenizer of {tokenizer or model} cannot encode the prompt: "
                         f"{(str(error).splitlines() or [type(error).__name__])[0]}") from None
    if encoded.input_ids.shape[1] + max_new_tokens > net.config.max_position_embeddings:
        raise ValueError(f"prompt ({encoded.input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_position_embeddings ({net.config.max_position_embeddings})")
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    out = net.generate(
        **encoded, num_steps=num_steps, max_new_tokens=max_new_tokens, exit_criterion=exit_criterion,
        exit_threshold=exit_threshold, min_steps=min_steps, continuous_cot=continuous_cot, draft_steps=draft_steps,
        draft_length=draft_length, core_slots=core_slots, init_scale=init_scale,
        generator=torch.Generator().manual_seed(seed), return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=TokenProgress(max_new_tokens),
        **sampling)
    new_ids = out.sequences[0, encoded.input_ids.shape[1]:]
    steps = out.steps_per_token[0].tolist()
    print(prompt + tok.decode(new_ids, skip_special_tokens=False))
    print("tokens: " + " ".join(repr(tok.decode([t])) for t in new_ids.tolist()))
    print("steps per token: " + " ".join(map(str, steps)))
    summary = f"{len(steps)} tokens, mean {sum(steps) / max(len(steps), 1):.2f} core steps per token"
    if out.acceptance_rate is not None:
        summary += f", draft acceptance rate {out.acceptance_rate:.2f} ({out.forward_passes} forward passes)"
    print(summary)


class TokenProgress:
    """A transformers streamer that shows a progress bar of generated tokens on stderr (on a terminal)."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, unit="tok", desc="generating", leave=False, disable=None)
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:  # generate's first put is the prompt
            self.bar.update(value.shape[-1] if value.ndim > 1 else 1)
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()


def models() -> None:
    """List every name that --model resolves besides a directory: shipped models, shipped results assembled with an
    installed source, and installed sources, with what each needs."""
    import importlib.util
    import json

    from .recipes import checkpoints_dir
    from .sources import EXTRA, INSTALLED, is_assembled

    rows = []
    for name in checkpoint_names():
        shipped = checkpoints_dir() / name
        if is_assembled(shipped):
            source = json.loads((shipped / "manifest.json").read_text())["assemble"]["source"]
            package, _, install = INSTALLED[source]
            ready = importlib.util.find_spec(package) is not None
            rows.append((name, "shipped: trained tensors, assembled with " + source,
                         "ready" if ready else f"needs {install}"))
        else:
            rows.append((name, "shipped checkpoint", "ready"))
    for name, (package, file, install) in INSTALLED.items():
        ready = importlib.util.find_spec(package) is not None and importlib.util.find_spec("gguf") is not None
        rows.append((name, f"installed source ({file}): a transformers causal LM",
                     "ready" if ready else f"needs {install} and {EXTRA}"))
    width = max(len(row[0]) for row in rows)
    for name, kind, status in rows:
        print(f"{name:<{width}}  {kind}  [{status}]")


def tasks_list() -> None:
    """List the reasoning tasks with their difficulty ranges."""
    width = max(len("reasoning-gym:NAME"), *(len(name) for name in TASKS))
    print(f"{'task':<{width}} {'difficulty':<11} description")
    for task in TASKS.values():
        print(f"{task.name:<{width}} {f'{task.min_difficulty}..{task.max_difficulty}':<11} {task.description}")
    print(f"{'reasoning-gym:NAME':<{width}} {'':<11} any reasoning-gym dataset, with the reasoning-gym extra installed")


@ranges(difficulty=">= 1", n=PROBLEMS, seed=">= 0")
def tasks_sample(name: str, difficulty: int = 1, n: int = 3, cot: bool = False, seed: int = 0) -> None:
    """Print problems as the model sees them: the prompt, then the completion it learns after "|".

    Args:
        name: the task (see `rlm tasks list`).
        difficulty: reasoning steps per problem.
        n: how many problems.
        cot: the chain-of-thought rendering instead of the direct-answer one.
        seed: problems are a pure function of (task, difficulty, seed).
    """
    task = get_task(name)
    for problem in task.problems(difficulty, n, seed=seed):
        print(f"{task.prompt(problem, cot)} | {task.completion(problem, cot)}")


@ranges(n=PROBLEMS, seed=">= 0")
def tasks_export(name: str, out: str, difficulties: IntList = "1-4", n: int = 100, seed: int = 0,
                 format: Literal["problems", "traces"] = "problems", shuffle: bool = False,
                 overwrite: bool = False) -> None:
    """Write a fixed problem set to JSONL, to share and reuse as a test set (`--problems FILE` elsewhere), or as
    reasoning traces with exact answers (a pool for `rlm select-traces`, data for `rlm finetune`).

    Args:
        name: the task, or several comma-separated (e.g. chain,permutation: one set over task families).
        out: the JSONL file to write.
        difficulties: difficulties, e.g. "1,2,4" or "1-8".
        n: problems per task and difficulty.
        seed: the set is a pure function of (tasks, difficulties, n, seed).
        format: "problems" (recurrent_lm.problem.Problem rows) or "traces" (s1K's shape: question,
            thinking_trajectories, attempt, plus domain (the task), difficulty and answer (the gold answer);
            rendered without a chat template, exactly the task's chain-of-thought text).
        shuffle: write the problems in a random order (seeded by --seed) instead of task by task and difficulty by
            difficulty: a mixed-difficulty set whose batches mix difficulties (`rlm sweep --mixed true`).
        overwrite: replace an existing `out`.
    """
    names = [part.strip() for part in name.split(",") if part.strip()]
    if not names:
        raise ValueError("give a task name (see `rlm tasks list`)")
    if len(set(names)) < len(names):
        raise ValueError(f"name: {name!r} names a task twice; name each once")
    tasks = [get_task(part) for part in names]
    difficulty_list = parse_int_list(difficulties, "--difficulties")
    unwritten = [t.name for t in tasks if t.answered_at_hints]
    if format == "traces" and unwritten:
        raise ValueError(f"--format traces: task {unwritten[0]!r} is answered at every position of its prompt, not "
                         "by a chain of thought; export its problems (--format problems)")
    with claimed_output(out, option="OUT", kind="file", overwrite=overwrite, command="rlm tasks export") as output:
        problems = problem_set(tasks, difficulty_list, n, seed, shuffle)
        if format == "traces":
            save_rows([trace_row(p) for p in problems], output.path)
        else:
            save_jsonl(problems, output.path)
    print(f"wrote {len(problems)} {format} to {out}")


@ranges(vocab_size=f"[{len(SPECIAL_TOKENS) + 256}, 1048576]", min_frequency=">= 1")  # specials + 256 bytes
def tokenizer_train(files: str, out: Path, vocab_size: int = 8192, min_frequency: int = 2,
                    overwrite: bool = False) -> None:
    """Train a byte-level BPE tokenizer on text files and save it as a transformers fast tokenizer.

    Args:
        files: plain-text training files: comma-separated paths or glob patterns, e.g. "data/*.txt".
        out: directory to save it in (AutoTokenizer.from_pretrained loads it).
        vocab_size: vocabulary size, special tokens included.
        min_frequency: merges seen fewer times are not learned.
        overwrite: replace an existing `out`.
    """
    paths = [match for pattern in files.split(",") for match in (sorted(glob.glob(pattern.strip())) or [pattern.strip()])]
    with claimed_output(out, option="--out", overwrite=overwrite, inputs=paths,
                        command="rlm tokenizer train") as output:
        tokenizer = train_bpe_tokenizer(paths, vocab_size, min_frequency)
        tokenizer.save_pretrained(output.path)
    print(f"wrote a {len(tokenizer)}-token BPE tokenizer to {out}")


def tokenizer_tasks(out: Path, tasks: list[str] | None = None, overwrite: bool = False) -> None:
    """Save the character tokenizer of the synthetic tasks (all of them by default).

    Args:
        out: directory to save it in.
        tasks: task names whose characters it covers.
        overwrite: replace an existing `out`.
    """
    tokenizer = task_tokenizer(tasks or list(TASKS))
    with claimed_output(out, option="--out", overwrite=overwrite, command="rlm tokenizer tasks") as output:
        tokenizer.save_pretrained(output.path)
    print(f"wrote a {len(tokenizer)}-token character tokenizer to {out}")
