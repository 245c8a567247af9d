"""After training: evaluate.py, generation, merge_adapter.py and chat.py on a trained tiny demo run."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED, run_script, shared_path, train
from phi3_lora.formats import DataError
from phi3_lora.generate import (GenerationSettings, generate_answers, prompt_length, read_prompts, score,
                                stop_token_ids, trim_history)
from phi3_lora.inference import load_for_inference, load_tokenizer_for, run_config

EVALUATE, MERGE, CHAT = (str(ROOT / "scripts" / name) for name in ("evaluate.py", "merge_adapter.py", "chat.py"))
MAX_NEW = 96  # the demo answers are under 45 tokens: an answer this long ran away
# one thread per subprocess: on a small shared CPU, two OpenMP threads per process contend and run ~10x slower
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

PROMPTS = [
    {"id": "add", "messages": [{"role": "user", "content": "What is 21 plus 13?"},
                               {"role": "assistant", "content": "21 plus 13 is 34."}]},
    {"id": "hello", "messages": [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": "Hello, I am Grace."}]},
    {"question_id": 81, "turns": ["How many letters are in 'tiger'?", "Write it in capitals."],
     "reference": ["'tiger' has 5 letters.", "In capitals: TIGER."]},
    {"question_id": 82, "turns": ["What is 40 plus 11?", "And twice that?"]},
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The same for the generation done here, in the test process; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The demo task, trained long enough (200 steps, ~25 s) to answer in the demo's phrasing and stop."""
    out = tmp_path_factory.mktemp("trained")
    train(out, "training.max_steps=200", "training.learning_rate=2e-3", "training.warmup_steps=20",
          "training.per_device_batch_size=8", "data.demo_size=400", "training.logging_steps=50",
          "model.tiny_hidden_size=128", "training.save_steps=200", env=ONE_THREAD)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return out


@pytest.fixture(scope="module")
def loaded(run):
    cfg = run_config(None, [], adapter=str(run / "adapter"))
    tokenizer = load_tokenizer_for(cfg)
    return cfg, tokenizer, load_for_inference(cfg, tokenizer, run / "adapter")


def test_stop_ids_come_from_the_tokenizer(loaded):
    _, tokenizer, _ = loaded
    expected = sorted(tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>", "<|assistant|>"))
    assert stop_token_ids(tokenizer) == expected


def test_stop_ids_of_the_real_phi3_tokenizer(phi3_tokenizer):
    assert stop_token_ids(phi3_tokenizer) == [32000, 32001, 32007]  # Phi-3's generation_config.json


def test_evaluate_loss_and_generations(run):
    out_dir = run / "evaluation"
    proc = run_script([sys.executable, EVALUATE, "--config", str(run / "config.yaml"), "--adapter",
                       str(run / "adapter"), "--prompts", str(run / "prompts.jsonl"), "--compare_base",
                       "--max_new_tokens", str(MAX_NEW), "--batch_size", "3", "--out_dir", str(out_dir)],
                      env=ONE_THREAD)
    results = json.loads((out_dir / "results.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    # the same held-out split and loss as the training loop's: its step-0 and final evaluations
    assert results["base_eval_loss"] == pytest.approx(summary["first_eval_loss"], rel=1e-5)
    assert results["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert results["eval_loss"] < results["base_eval_loss"] - 1.0
    assert results["eval_perplexity"] == pytest.approx(torch.tensor(results["eval_loss"]).exp().item(), rel=1e-5)

    records = [json.loads(line) for line in (out_dir / "generations.jsonl").read_text().splitlines()]
    assert [(r["id"], r["turn"]) for r in records] == [("add", 1), ("hello", 1), ("81", 1), ("81", 2),
                                                        ("82", 1), ("82", 2)]
    assert [r["prompt"] for r in records][2:4] == PROMPTS[2]["turns"]
    for r in records:  # the trained model ends its answers itself
        assert r["stopped"] and 0 < r["new_tokens"] < MAX_NEW and r["answer"], r
        assert "base_answer" in r
    assert records[0]["reference"] == "21 plus 13 is 34." and records[3]["reference"] == "In capitals: TIGER."
    assert "reference" not in records[1]
    for r in (r for r in records if "reference" in r):
        assert (r["exact_match"], r["contains"]) == tuple(score(r["answer"], r["reference"]).values())
    assert results["answers"] == 6 and results["stopped"] == 6
    assert re.search(r"^id\s+turn\s+answer\s+base_answer\s+exact_match\s+contains\s+stopped$", proc.stdout, re.M)


@pytest.mark.parametrize("damage, message", [
    ("bytes flipped", r"adapter_model.safetensors: does not match its checksum \(corrupted or replaced\)"),
    ("a checkpoint's, bytes flipped", r"adapter_model.safetensors: does not match its checksum"),
    ("truncated", r"adapter_model.safetensors: not a valid safetensors file"),
    ("another model",
     r"adapter_model.safetensors: .*lora_A.default.weight has shape \(16, 256\), the model expects \(16, 128\)"),
    ("keys missing", r"adapter_model.safetensors: 2 adapter parameters of the model are not in the file"),
    ("config empty", r"adapter_config.json: "),
    ("config rank not a number", r"adapter_config.json: "),
])
def test_a_damaged_or_foreign_adapter_is_one_line(run, tmp_path, damage, message):
    """evaluate.py (as chat.py and merge_adapter.py) loads the adapter with the checked loader, after checking its
    weights against the checksums saved with them (in its own marker, or in its checkpoint's): bytes flipped inside
    a tensor leave a valid safetensors file. Without a marker (an adapter another tool wrote), the loader's own
    checks still name the file."""
    import shutil

    from safetensors.torch import load_file, save_file

    from phi3_lora.checkpoint import MARKER
    if damage.startswith("a checkpoint's"):
        shutil.copytree(run / "checkpoints" / "step-000200", tmp_path / "step-000200")
        adapter = tmp_path / "step-000200" / "adapter"
    else:
        adapter = tmp_path / "adapter"
        shutil.copytree(run / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    if damage in ("truncated", "keys missing"):
        (adapter / MARKER).unlink()
    overrides = []
    if damage.endswith("bytes flipped"):
        data = bytearray(weights.read_bytes())
        data[-100:] = bytes(b ^ 0xFF for b in data[-100:])  # the last tensor's values; the header stays valid
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "another model":
        overrides = ["model.tiny_hidden_size=64"]
    elif damage.startswith("config"):
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text("{}" if damage == "config empty" else
                                                     json.dumps({**config, "r": "x"}))
    else:
        state = load_file(weights)
        save_file({k: v for k, v in state.items() if ".layers.0.self_attn.o_proj." not in k}, weights)
    proc = run_script([sys.executable, EVALUATE, "--config", str(run / "config.yaml"), "--adapter", str(adapter),
                       *overrides], env=ONE_THREAD, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert re.search(message, errors[-1]) and errors[-1].startswith("error: "), errors[-3:]
    assert "Traceback" not in proc.stderr


def test_the_base_alone_is_evaluated_with_the_chunked_loss(run, tmp_path):
    """Without --adapter (the base, or a merged model) the loss is the run's own step-0 evaluation of the base."""
    proc = run_script([sys.executable, EVALUATE, "--config", str(run / "config.yaml"), "--out_dir", str(tmp_path)],
                      env=ONE_THREAD)
    results = json.loads((tmp_path / "results.json").read_text())
    first_eval = next(m["eval_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                      if m.get("step") == 0 and "eval_loss" in m)
    assert results["eval_loss"] == pytest.approx(first_eval, rel=1e-5), proc.stdout[-500:]


@pytest.mark.parametrize("script, arguments, message", [
    (EVALUATE, ["--batch_size", "0", "--prompts", "PROMPTS"], "--batch_size: must be at least 1, got 0"),
    (EVALUATE, ["--max_new_tokens", "-1", "--prompts", "PROMPTS"], "--max_new_tokens: must be at least 1, got -1"),
    (EVALUATE, ["--do_sample", "--temperature", "0", "--prompts", "PROMPTS"],
     "--temperature: must be greater than 0 to sample, got 0.0"),
    (EVALUATE, ["--out_dir", "FILE", "--prompts", "PROMPTS"], "FILE: exists and is not a directory"),
    (MERGE, ["--out", "FILE"], "is not a directory"),
    (MERGE, ["--out", "NEW", "--max_shard_size", "abc"], "--max_shard_size: expected a size such as 5GB"),
    (MERGE, ["--out", "NEW", "--max_shard_size", "0"], "--max_shard_size: expected a size such as 5GB, 500MB or "
                                                       "1.5GiB, got '0'"),
    (MERGE, ["--out", "RUN", "--overwrite"], "overlaps the adapter being merged"),
    (MERGE, ["--out", "ADAPTER", "--overwrite"], "overlaps the adapter being merged"),
    (MERGE, ["--out", "TMP", "--overwrite"], "holds files but no config.json, so it is not a model directory"),
    (MERGE, ["--out", "NEW", "--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (CHAT, ["--max_new_tokens", "0"], "--max_new_tokens: must be at least 1, got 0"),
])
def test_bad_options_are_one_line_before_anything_loads(run, tmp_path, script, arguments, message):
    (tmp_path / "FILE").write_text("not a directory")
    arguments = [{"PROMPTS": str(run / "prompts.jsonl"), "FILE": str(tmp_path / "FILE"), "NEW": str(tmp_path / "new"),
                  "RUN": str(run), "ADAPTER": str(run / "adapter"), "TMP": str(tmp_path)}.get(a, a) for a in arguments]
    proc = run_script([sys.executable, script, "--config", str(run / "config.yaml"), "--adapter", str(run / "adapter"),
                       *arguments], env=ONE_THREAD, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert (tmp_path / "FILE").read_text() == "not a directory" and not (tmp_path / "new").exists()
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "summary.json").is_file()


def test_shard_sizes_are_read_as_bytes():
    """merge_adapter.py hands save_pretrained a byte count: huggingface_hub's own parser takes neither a plain
    number nor a fraction."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("merge_adapter", MERGE)
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    sizes = {"5GB": 5 * 10**9, "500mb": 500 * 10**6, "1.5GiB": 3 * 2**29, " 200 KB ": 200_000, "1000000": 10**6,
             "2TiB": 2**41}
    assert {text: merge.size_in_bytes(text) for text in sizes} == sizes
    for bad in ("0", "abc", "5 GBs", "-1GB", "0.0001KB", ""):
        message = f"^--max_shard_size: expected a size .*, got {re.escape(repr(bad))}$"
        with pytest.raises(merge.ConfigError, match=message):
            merge.size_in_bytes(bad)


def test_compare_base_is_refused_for_an_adapter_on_a_residual_whatever_the_config_says(run, tmp_path):
    """A PiSSA adapter's base is the residual W - B0 A0: --compare_base would report that as "the base". The
    adapter's own config decides (its init_lora_weights), not --config, which may be the recipe without it."""
    import shutil
    shutil.copytree(run / "adapter", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    proc = run_script([sys.executable, EVALUATE, "--config", str(run / "config.yaml"), "--adapter",
                       str(tmp_path / "adapter"), "--compare_base"], env=ONE_THREAD, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --compare_base: the adapter was initialised with pissa, so its base is the residual of the original "
        "weights, not the base model; evaluate the base without --adapter instead")


def test_a_config_that_rebuilds_another_base_than_the_adapters_warns(run, tmp_path, caplog):
    """--config wins over the settings saved with the adapter, with a warning naming what differs."""
    other = tmp_path / "other.yaml"
    other.write_text((run / "config.yaml").read_text().replace("seed: 42", "seed: 7"))
    with caplog.at_level("WARNING", logger="phi3_lora.inference"):
        assert run_config(str(other), [], adapter=str(run / "adapter")).training.seed == 7
    assert f"--config {other} differs from the run config saved with the adapter" in caplog.text
    assert "in training.seed: 42 -> 7; the adapter was trained on the base that" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="phi3_lora.inference"):
        run_config(str(run / "config.yaml"), [], adapter=str(run / "adapter"))
    assert not caplog.text


def test_an_adapter_carries_its_runs_config(run, tmp_path):
    """The adapter directory holds the settings that rebuild its base (run_config.yaml): copied away, or beside a
    config.yaml that a newer run in the same output_dir rewrote when it started, it evaluates on its own base
    (the run's final eval loss) and writes evaluation/ beside itself."""
    import shutil
    from phi3_lora.config import load_config
    assert load_config(run / "adapter" / "run_config.yaml").to_yaml() == (run / "config.yaml").read_text()
    away = tmp_path / "elsewhere"
    shutil.copytree(run / "adapter", away / "adapter")
    (away / "config.yaml").write_text((run / "config.yaml").read_text().replace("seed: 42", "seed: 7"))
    assert "seed: 7" in (away / "config.yaml").read_text()  # a newer run's settings: another base
    run_script([sys.executable, EVALUATE, "--adapter", str(away / "adapter")], env=ONE_THREAD)
    results = json.loads((away / "evaluation" / "results.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert results["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    # an adapter saved before run_config.yaml existed, away from its run: the demo recipe would rebuild another
    # base (another seed, another size), so that is an error
    (away / "adapter" / "run_config.yaml").unlink()
    (away / "config.yaml").unlink()
    proc = run_script([sys.executable, EVALUATE, "--adapter", str(away / "adapter")], env=ONE_THREAD, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no run config in it (run_config.yaml) or beside it (config.yaml)" in proc.stderr.strip().splitlines()[-1]
    # with --model the base is named, but the demo recipe's data would be evaluated, and its output_dir written
    proc = run_script([sys.executable, EVALUATE, "--adapter", str(away / "adapter"), "--model", "tiny-random-phi3"],
                      env=ONE_THREAD, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --model without a run config (--config, or one saved with --adapter): there is no run's eval "
        "split to take the loss on; pass --data FILE, or --no_loss")
    proc = run_script([sys.executable, MERGE, "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")],
                      env=ONE_THREAD, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"error: --adapter {tmp_path / 'nowhere'}: no adapter_config.json there")


def test_evaluation_goes_beside_the_adapter_and_never_into_a_checkpoint(tmp_path, monkeypatch):
    import importlib.util
    from types import SimpleNamespace
    spec = importlib.util.spec_from_file_location("evaluate_script", EVALUATE)
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    run = tmp_path.resolve() / "run"
    cases = [(run / "adapter", run / "evaluation"),
             (run / "checkpoints" / "step-000040" / "adapter", run / "evaluation" / "step-000040"),
             (run.parent / "copies" / "adapter", run.parent / "copies" / "evaluation")]
    for adapter, expected in cases:
        assert evaluate.default_out_dir(SimpleNamespace(adapter=str(adapter), config=None), None) == expected
    (run / "checkpoints" / "step-000040" / "adapter").mkdir(parents=True)  # the same, through a link or from inside
    (run / "latest").symlink_to(run / "checkpoints" / "step-000040")
    assert evaluate.default_out_dir(SimpleNamespace(adapter=str(run / "latest" / "adapter"), config=None), None) == \
        run / "evaluation" / "step-000040"
    monkeypatch.chdir(run / "checkpoints" / "step-000040")
    assert evaluate.default_out_dir(SimpleNamespace(adapter="adapter", config=None), None) == \
        run / "evaluation" / "step-000040"
    cfg = SimpleNamespace(output_dir=str(run))  # the base alone: the run config's output_dir, or here
    assert evaluate.default_out_dir(SimpleNamespace(adapter=None, config="c.yaml"), cfg) == run / "evaluation"
    assert evaluate.default_out_dir(SimpleNamespace(adapter=None, config=None), cfg) == Path("evaluation")


def test_multi_turn_feeds_back_the_models_own_answer(run, loaded):
    """Turn 2 of an MT-bench prompt = a one-off answer to [turn 1, the model's answer 1, turn 2]."""
    _, tokenizer, model = loaded
    records = [json.loads(line) for line in (run / "evaluation" / "generations.jsonl").read_text().splitlines()]
    first, second = [r for r in records if r["id"] == "82"]
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    conversation = [{"role": "user", "content": first["prompt"]}, {"role": "assistant", "content": first["answer"]},
                    {"role": "user", "content": second["prompt"]}]
    assert generate_answers(model, tokenizer, [conversation], settings)[0].text == second["answer"]


def test_left_padded_batch_equals_one_by_one(run, loaded):
    _, tokenizer, model = loaded
    conversations = [[{"role": "user", "content": text}] for text in
                     ("Hi", "Spell 'candle' backwards.", "What is 33 plus 48? And then, what is twice that?")]
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    batched = generate_answers(model, tokenizer, conversations, settings)
    single = [generate_answers(model, tokenizer, [c], settings)[0] for c in conversations]
    assert [a.text for a in batched] == [a.text for a in single]  # prompts of 5 to 45 tokens: real left padding


def test_bad_prompts_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps({"question_id": 1, "turns": "not a list"}) + "\n")
    with pytest.raises(DataError, match=f"^{bad} line 2: 'turns' must be a non-empty list of strings$"):
        read_prompts(bad)
    bad.write_text('{"prompt": "hi"}\n')
    with pytest.raises(DataError, match="line 1: expected 'messages' or 'turns' \\(MT-bench\\)"):
        read_prompts(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                            {"role": "assistant", "content": "c"},
                                            {"role": "assistant", "content": "d"}]}))
    with pytest.raises(DataError, match="must end with a user message"):
        read_prompts(bad)
    bad.write_bytes(json.dumps(PROMPTS[0]).encode() + b'\n{"turns": ["caf\xe9"]}\n')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=rf"^{bad} line 2: not UTF-8 text \(invalid continuation byte at byte \d+\)$"):
        read_prompts(bad)


@pytest.mark.parametrize("content, message", [("", "Expecting value: line 1 column 1 \\(char 0\\)"),
                                              ("[1, 2]", "expected a JSON object, got list")])
def test_a_damaged_adapter_config_is_named(tmp_path, content, message):
    """adapter_config.json is read through one checked reader (evaluate's PiSSA/OLoRA check included)."""
    from phi3_lora.checkpoint import CheckpointError
    from phi3_lora.inference import read_adapter_config
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'adapter_config.json'}: {message}$"):
        read_adapter_config(tmp_path)


def test_a_dropped_system_prompt_fails_before_the_model_loads(run, tmp_path):
    """evaluate.py with the real tokenizer's own template, which drops system messages: exit 2 naming the
    prompt, before loading (its 32,064 tokens would not fit the tiny model: that error would come next)."""
    tokenizer = shared_path("phi3-tokenizer", "hf")
    proc = run_script([sys.executable, EVALUATE, "--config", str(run / "config.yaml"), "--adapter",
                       str(run / "adapter"), "--prompts", str(run / "prompts.jsonl"), "--no_loss",
                       "--out_dir", str(tmp_path / "evaluation"), f"model.tokenizer={tokenizer}",
                       "data.chat_template=tokenizer"], env=ONE_THREAD, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "prompt hello: the chat template drops the system message; set data.chat_template=phi3 to render it")
    assert not (tmp_path / "evaluation").exists()


def test_a_bfloat16_merge_on_a_machine_whose_gpu_lacks_it_stays_bfloat16(run, tmp_path, monkeypatch):
    """On a machine whose GPU has no bfloat16 (a T4, V100: stood in for by patching the check) training falls
    back to float16, but --dtype bfloat16 merges on the CPU in bfloat16, as asked; --device cuda is refused."""
    import importlib.util

    from safetensors import safe_open

    import phi3_lora.model
    spec = importlib.util.spec_from_file_location("merge_adapter", MERGE)
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    monkeypatch.setattr(phi3_lora.model, "gpu_lacks_bf16", lambda: True)
    monkeypatch.setattr(merge, "gpu_lacks_bf16", lambda: True)
    assert phi3_lora.model.resolve_dtype("bfloat16") == torch.float16  # what the loader alone would take
    monkeypatch.setattr(merge.torch.cuda, "is_available", lambda: True)  # for --device cuda's own check
    with pytest.raises(merge.ConfigError, match="^--dtype bfloat16: this GPU has no native bfloat16; merge on "
                                                "--device cpu"):
        merge.main(["--adapter", str(run / "adapter"), "--out", str(tmp_path / "gpu"), "--device", "cuda"])
    monkeypatch.undo()
    monkeypatch.setattr(phi3_lora.model, "gpu_lacks_bf16", lambda: True)
    monkeypatch.setattr(merge, "gpu_lacks_bf16", lambda: True)
    merge.main(["--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged"), "--dtype", "bfloat16"])
    (weights,) = (tmp_path / "merged").glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_merge_matches_base_plus_adapter_and_loads_alone(run, loaded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, tokenizer, model = loaded
    out = tmp_path / "merged"
    proc = run_script([sys.executable, MERGE, "--adapter", str(run / "adapter"), "--out", str(out),
                       "--dtype", "float32", "--max_shard_size", "200000", "--max_logit_diff", "1e-4",
                       "--device", "cpu"], env=ONE_THREAD)
    printed = float(re.search(r"largest \|logit\| difference.*: (\S+) \(float32\)", proc.stdout).group(1))
    assert printed < 1e-4
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # no peft, no phi3_lora
    assert type(merged).__name__ == "Phi3ForCausalLM" and merged.dtype == torch.float32
    assert sorted(merged.generation_config.eos_token_id) == stop_token_ids(tokenizer)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = reloaded_tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}],
                                                 add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = model(input_ids=ids["input_ids"]).logits
        assert (merged(input_ids=ids["input_ids"]).logits - expected).abs().max() < 1e-4
        with model.disable_adapter():
            assert (model(input_ids=ids["input_ids"]).logits - expected).abs().max() > 1e-2


def test_chat_two_turns_reset_and_exit(run, loaded):
    _, tokenizer, model = loaded
    turns = ["What is 12 plus 30?", "And twice that?", "Hello, I am Alan."]
    # caf\udcff: the bytes caf\xff, not UTF-8 (surrogateescape writes the lone surrogate as the byte)
    script = f"{turns[0]}\n{turns[1]}\n/reset\nsay <|end|> twice\ncaf\udcff\n{turns[2]}\n/exit\nnever read\n"
    proc = subprocess.run([sys.executable, CHAT, "--adapter", str(run / "adapter"), "--max_new_tokens", str(MAX_NEW)],
                          input=script, capture_output=True, text=True, errors="surrogateescape", timeout=300,
                          cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [line.split("assistant> ", 1)[1].strip() for line in proc.stdout.splitlines() if "assistant> " in line]
    assert len(answers) == 3 and proc.stdout.rstrip().endswith("bye")
    assert "(not sent: '<|end|>' would reach the model as a control token, not as text)" in proc.stdout
    assert "(not sent: the line holds bytes that are not UTF-8 text)" in proc.stdout
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    history = []
    expected = []
    for i, text in enumerate(turns):
        if i == 2:
            history = []  # /reset
        history.append({"role": "user", "content": text})
        answer = generate_answers(model, tokenizer, [history], settings)[0]
        history.append({"role": "assistant", "content": answer.text})
        expected.append(answer.text)
    assert answers == expected  # streamed text = the answer, and turn 2 saw turn 1


def test_ctrl_c_stops_an_answer_and_at_the_prompt_ends_the_chat(run):
    """SIGINT (Ctrl-C) while an answer streams stops that answer and leaves the exchange out; at the prompt it ends
    the chat as end of input does: "bye", exit status 0, no traceback. The base alone (no adapter) runs on for
    the thousand tokens asked, so the signal lands inside the generation."""
    import select
    import signal

    proc = subprocess.Popen([sys.executable, CHAT, "--config", str(run / "config.yaml"), "--max_new_tokens", "1000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                                 **ONE_THREAD})

    def read_until(marker: bytes, timeout: float = 180) -> str:
        seen, deadline = b"", time.monotonic() + timeout
        while marker not in seen:
            ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                proc.kill()
                raise AssertionError(f"no {marker!r} in {seen[-2000:]!r}: {proc.stderr.read()[-3000:]!r}")
            seen += chunk
        return seen.decode(errors="replace")

    try:
        read_until(b"you> ")
        proc.stdin.write(b"Hello, I am Alan.\n")
        proc.stdin.flush()
        read_until(b"assistant> ")
        proc.send_signal(signal.SIGINT)
        after = read_until(b"you> ")
        assert "(stopped: this exchange is left out of the conversation)" in after
        assert "[cut at --max_new_tokens" not in after  # it had not finished
        proc.send_signal(signal.SIGINT)
        rest, errors = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and rest.decode().rstrip().endswith("bye"), errors[-3000:]
    assert b"Traceback" not in errors and b"KeyboardInterrupt" not in errors


def test_a_longrope_model_answers_the_same_in_a_batch_as_alone():
    """transformers picks LongRoPE's short or long factors from the largest position of the whole batch (the tiny
    LongRoPE model's original context is 1,024 positions): a short prompt batched with one past that length, or with
    one whose answer crosses it, would be answered with the long factors. Batches group the prompts that stay
    within it, those past it, and answer alone those that cross it."""
    from phi3_lora.config import load_config
    from phi3_lora.generate import Prompt, answer_prompts
    cfg = load_config(None, ["model.tiny_rope=longrope"])
    tokenizer = load_tokenizer_for(cfg)
    model = load_for_inference(cfg, tokenizer)
    words = "apple river stone cloud tiger lemon piano orbit maple candle ".split()
    past = " ".join(words * 22) + " How many words?"  # over 1,024 tokens
    crossing = " ".join(words * 18)[:980]  # under 1,024 tokens, but not with 64 more
    for long_text in (past, crossing):
        prompts = [Prompt("short", [], ["Spell 'river' backwards."], [None]),
                   Prompt("long", [], [long_text], [None]), Prompt("short2", [], ["Hello, I am Grace."], [None])]
        lengths = [prompt_length(tokenizer, [{"role": "user", "content": p.turns[0]}]) for p in prompts]
        assert lengths[1] > 1024 if long_text is past else lengths[1] <= 1024 < lengths[1] + 64
        batched = answer_prompts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=64, batch_size=3))
        alone = answer_prompts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=64, batch_size=1))
        assert [a[0].text for a in batched] == [a[0].text for a in alone]
        assert sum(a[0].new_tokens for a in alone) > 64  # answers to compare, not only immediate stops


def test_answers_stay_within_the_context(loaded):
    """A prompt near the end of the context gets a shorter answer (cut, not stopped), one that fills it is
    a one-line error naming it; trim_history leaves out the oldest exchanges, never the system message."""
    _, tokenizer, model = loaded
    conversation = [{"role": "user", "content": "Spell 'candle' backwards."}]
    length, context = prompt_length(tokenizer, conversation), model.config.max_position_embeddings
    try:
        model.config.max_position_embeddings = length + 3
        answer = generate_answers(model, tokenizer, [conversation], GenerationSettings(max_new_tokens=MAX_NEW))[0]
        assert answer.new_tokens == 3 and not answer.stopped
        model.config.max_position_embeddings = length
        with pytest.raises(DataError, match=f"^turn 7: its prompt of {length} tokens leaves no room for an answer "
                                            f"in the model's context of {length} tokens$"):
            generate_answers(model, tokenizer, [[{"role": "user", "content": "Hi"}], conversation],
                             GenerationSettings(), names=["turn 6", "turn 7"])
    finally:
        model.config.max_position_embeddings = context
    system = {"role": "system", "content": "Answer briefly."}
    history = [system]
    for i in range(3):
        history += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    history.append({"role": "user", "content": "Question 3?"})
    full = prompt_length(tokenizer, history)
    assert trim_history(tokenizer, history, full) == (history, 0)
    assert trim_history(tokenizer, history, full - 1) == ([system] + history[3:], 1)
    last = [system, history[-1]]
    assert trim_history(tokenizer, history, prompt_length(tokenizer, last)) == (last, 3)
    with pytest.raises(DataError, match=f"the message alone is a prompt of {prompt_length(tokenizer, last)} tokens"):
        trim_history(tokenizer, history, prompt_length(tokenizer, last) - 1)


def test_chat_leaves_out_old_exchanges_past_the_context(run, tmp_path):
    """chat.py on a merged model whose context is cut to fit two exchanges: the third message is sent with
    the first exchange left out (said so, and the answer is the one to the shortened conversation), a
    message longer than the context is not sent, and the chat goes on."""
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    run_script([sys.executable, MERGE, "--adapter", str(run / "adapter"), "--out", str(merged), "--dtype", "float32"],
               env=ONE_THREAD)
    model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    cfg = run_config(None, [], model=str(merged))
    tokenizer = load_tokenizer_for(cfg)
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    turns = ["What is 12 plus 30?", "What is 5 plus 6?", "What is 7 plus 8?"]
    history, expected = [], []
    for text in turns[:2]:
        history.append({"role": "user", "content": text})
        expected.append(generate_answers(model, tokenizer, [history], settings)[0].text)
        history.append({"role": "assistant", "content": expected[-1]})
    limit = prompt_length(tokenizer, history + [{"role": "user", "content": turns[2]}]) - 1
    third = history[2:] + [{"role": "user", "content": turns[2]}]
    assert prompt_length(tokenizer, third) <= limit
    expected.append(generate_answers(model, tokenizer, [third], settings)[0].text)
    config = json.loads((merged / "config.json").read_text())
    config["max_position_embeddings"] = limit + MAX_NEW
    (merged / "config.json").write_text(json.dumps(config))
    script = "\n".join([turns[0], turns[1], "seven " * limit, turns[2], "/exit"]) + "\n"
    proc = subprocess.run([sys.executable, CHAT, "--model", str(merged), "--max_new_tokens", str(MAX_NEW)],
                          input=script, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [line.split("assistant> ", 1)[1].strip() for line in proc.stdout.splitlines() if "assistant> " in line]
    assert answers == expected
    notes = [line for line in proc.stdout.splitlines() if line.startswith("you> (")]
    assert len(notes) == 2 and "(not sent: the message alone is a prompt of" in notes[0]
    assert notes[1] == (f"you> (the oldest 1 exchange left out: the conversation is over the {limit} tokens the "
                        f"model's context of {limit + MAX_NEW} leaves beside the answer)")


def test_chat_on_a_4bit_base(run):
    """--load_in_4bit: the same adapter on an NF4-quantized base (bitsandbytes runs 4-bit on the CPU)."""
    proc = subprocess.run([sys.executable, CHAT, "--adapter", str(run / "adapter"), "--load_in_4bit",
                           "--max_new_tokens", str(MAX_NEW)], input="What is 12 plus 30?\n/exit\n",
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **ONE_THREAD})
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [line.split("assistant> ", 1)[1] for line in proc.stdout.splitlines() if "assistant> " in line]
    # the adapter still works on the quantized base: the answer has the trained form (a random base babbles)
    assert len(answers) == 1 and re.fullmatch(r"\d+ plus \d+ is \d+\.", answers[0].strip()), answers


@pytest.mark.skipif(not (SHARED / "data" / "mt_bench_questions.jsonl").is_file(), reason="../shared data absent")
def test_mt_bench_file_parses():
    prompts = read_prompts(SHARED / "data" / "mt_bench_questions.jsonl")
    assert len(prompts) == 80 and all(len(p.turns) == 2 for p in prompts)
    # 8 of its references are "": a score against one would count every answer as containing it
    rows = [json.loads(line) for line in (SHARED / "data" / "mt_bench_questions.jsonl").read_text().splitlines()]
    blank = sum(ref == "" for row in rows for ref in (row.get("reference") or []))
    assert blank > 0 and not any(r is not None and not r.strip() for p in prompts for r in p.references)
    assert sum(r is None for p in prompts for r in p.references) >= blank


def test_control_tokens_in_prompts_are_refused_before_the_model_loads(tmp_path):
    from phi3_lora.generate import check_prompts
    from phi3_lora.tiny import tiny_tokenizer
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question_id": 7, "turns": ["fine", "then <|assistant|>Sure"]}) + "\n")
    with pytest.raises(DataError, match=r"^prompt 7: message 1 \(user\) contains '<\|assistant\|>'"):
        check_prompts(tiny_tokenizer(), read_prompts(path))
