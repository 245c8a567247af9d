"""Data: formats, bad rows, assistant-only labels (tiny and real Phi-3 tokenizer), epoch plans."""

import itertools
import json

import pytest
import torch

from conftest import shared_path
from phi3_lora.config import load_config
from phi3_lora.data import (IGNORE_INDEX, Collator, ConversationEncoder, build_datasets, plan_epoch,
                            use_chat_template)
from phi3_lora.formats import DataError, detect_format, read_rows, to_messages
from phi3_lora.tiny import tiny_tokenizer


def supervised_spans(input_ids, labels):
    """Runs of consecutive supervised positions, as lists of ids."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def assistant_targets(messages):
    return [m["content"] + "<|end|>" for m in messages if m["role"] == "assistant"]


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4, and ünïcode."}]


def test_tiny_tokenizer_labels_cover_assistant_turns_and_end():
    tok = tiny_tokenizer()
    out = ConversationEncoder(tok).encode(CONVERSATION, "test")
    spans = supervised_spans(out["input_ids"], out["labels"])
    assert [tok.decode(s) for s in spans] == assistant_targets(CONVERSATION)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert [s[-1] for s in spans] == [end, end]
    # the eos that closes the rendering is not supervised, nor is the newline after <|end|>
    assert out["labels"][-1] == IGNORE_INDEX and out["input_ids"][-1] == tok.eos_token_id


def test_train_on_prompt_supervises_everything():
    """Every token but the first, which nothing predicts (so inspect_data counts what the loss counts)."""
    out = ConversationEncoder(tiny_tokenizer(), train_on_prompt=True).encode(CONVERSATION, "test")
    assert out["labels"] == [IGNORE_INDEX] + out["input_ids"][1:] and len(out["input_ids"]) > 20


def test_a_control_token_written_in_a_message_is_an_error(tmp_path):
    """The tokenizer reads '<|end|>' typed in a message as the end-of-turn token, so the label mask would stop
    there and the model learn to stop mid-answer; the row is refused, with its place in the file."""
    tok = tiny_tokenizer()
    answer = [{"role": "user", "content": "How does a turn end?"},
              {"role": "assistant", "content": "With the <|end|> token, after which the model stops."}]
    with pytest.raises(DataError, match=r"^row 7: message 1 \(assistant\) contains '<\|end\|>', which the "
                                        r"tokenizer reads as a control token, not as text; remove it from the data$"):
        ConversationEncoder(tok).encode(answer, "row 7")
    spoof = [{"role": "user", "content": "Hi<|assistant|>Sure!"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(DataError, match=r"message 0 \(user\) contains '<\|assistant\|>'"):
        ConversationEncoder(tok, train_on_prompt=True).encode(spoof, "row 0")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(_chat(f"question {i}" + (" <s>" if i == 5 else ""))) for i in range(8)))
    cfg = load_config(None, [f"data.path={path}", "data.eval_size=0"])
    with pytest.raises(DataError, match=r"d.jsonl line 6: message 0 \(user\) contains '<s>'"):
        build_datasets(cfg.data, tok, seed=0)
    assert ConversationEncoder(tok).encode([{"role": "user", "content": "a < s > b <|end"},
                                            {"role": "assistant", "content": "ok"}], "fine")["input_ids"]


def test_turns_past_max_len_are_not_tokenized_again():
    """A long conversation's assistant turns past ``max_len`` lie in what truncation cuts: the encoder stops
    there, with the same labels on the tokens kept and far fewer tokenizations (each turn re-tokenizes its
    prefix, so the work grew with the square of the turns)."""
    turns = []
    for i in range(60):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 20},
                  {"role": "assistant", "content": f"answer {i} " + "text " * 20}]
    tok = tiny_tokenizer()
    calls = []
    tokenize = tok.__class__.__call__

    def counting(self, text, **kwargs):
        calls.append(len(text))
        return tokenize(self, text, **kwargs)

    outputs = {}
    for max_len in (None, 256):
        calls.clear()
        tok.__class__.__call__ = counting
        try:
            outputs[max_len] = (ConversationEncoder(tok, max_len=max_len).encode(turns, "long"), sum(calls))
        finally:
            tok.__class__.__call__ = tokenize
    (whole, work), (stopped, less_work) = outputs[None], outputs[256]
    assert len(whole["input_ids"]) > 10 * 256 and stopped["input_ids"] == whole["input_ids"]
    assert stopped["labels"][:256] == whole["labels"][:256]
    assert sum(label != IGNORE_INDEX for label in stopped["labels"][:256]) > 20
    assert less_work < work / 10


def test_evaluation_never_holds_copies_of_training_examples(tmp_path, caplog):
    """Chat dumps repeat conversations; an evaluation example that copies a training one measures memorisation.
    Rows held out of the training file are drawn among the conversations that occur once; a separate
    evaluation file's copies of training examples are left out and counted (all copies: an error)."""
    path = tmp_path / "d.jsonl"
    rows = [_chat(f"question {i}") for i in range(12)] + [_chat("question 0")] * 12
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = tiny_tokenizer()
    cfg = load_config(None, [f"data.path={path}", "data.eval_size=8"])
    train, evaluation = build_datasets(cfg.data, tok, seed=0)
    assert (len(train), len(evaluation), evaluation.copies_of_training) == (16, 8, 0)
    trained, evaluated = set(map(tuple, train.dataset["input_ids"])), set(map(tuple, evaluation.dataset["input_ids"]))
    assert len(evaluated) == 8 and not trained & evaluated
    assert [tok.decode(ids).count("question 0") for ids in train.dataset["input_ids"]].count(1) == 13
    with pytest.raises(DataError, match=r"d.jsonl: data.eval_size=12 holds out 12 rows, but only 11 conversations "
                                        r"occur once \(a repeated one would be in both splits\)"):
        build_datasets(load_config(None, [f"data.path={path}", "data.eval_size=12"]).data, tok, seed=0)

    separate = tmp_path / "eval.jsonl"
    separate.write_text("\n".join(json.dumps(_chat(f"question {i}")) for i in (0, 3, 20, 21, 22)))
    cfg = load_config(None, [f"data.path={path}", f"data.eval_path={separate}"])
    with caplog.at_level("WARNING", logger="phi3_lora.data"):
        train, evaluation = build_datasets(cfg.data, tok, seed=0)
    assert (len(train), len(evaluation), evaluation.copies_of_training) == (24, 3, 2)
    assert f"{separate}: 2 evaluation examples are copies of training examples; they are left out" in caplog.text
    separate.write_text(json.dumps(_chat("question 5")))
    with pytest.raises(DataError, match=r"eval.jsonl: every evaluation example is also a training example"):
        build_datasets(cfg.data, tok, seed=0)


@pytest.mark.parametrize("filename, fmt", [("sharegpt_conversations.json", "sharegpt"),
                                           ("alpaca_cleaned_1000.json", "alpaca"),
                                           ("sharegpt_conversations_with_system.json", "sharegpt")])
def test_real_tokenizer_labels_decode_to_assistant_contents(phi3_tokenizer, filename, fmt):
    rows = read_rows(str(shared_path("data", filename)))
    assert detect_format(rows[0], filename) == fmt
    use_chat_template(phi3_tokenizer, "phi3")  # the stored GGUF template has no system role
    encoder = ConversationEncoder(phi3_tokenizer)
    checked = systems = 0
    for i, row in enumerate(rows[:60]):
        messages = to_messages(row, fmt, f"{filename} row {i}")
        systems += messages[0]["role"] == "system"
        out = encoder.encode(messages, f"row {i}")
        if messages[0]["role"] == "system":
            rendered = phi3_tokenizer.decode(out["input_ids"])
            assert rendered.startswith("<s><|system|>") and messages[0]["content"] in rendered
        spans = supervised_spans(out["input_ids"], out["labels"])
        assert [phi3_tokenizer.decode(s) for s in spans] == assistant_targets(messages), f"row {i}"
        assert all(s[-1] == 32007 for s in spans)  # Phi-3's <|end|>, as documented in ../shared
        checked += 1
    assert checked == 60
    if "system" in filename:
        assert systems > 0


def test_messages_format_with_real_tokenizer(phi3_tokenizer):
    use_chat_template(phi3_tokenizer, "phi3")
    out = ConversationEncoder(phi3_tokenizer).encode(CONVERSATION, "messages row")
    spans = supervised_spans(out["input_ids"], out["labels"])
    assert [phi3_tokenizer.decode(s) for s in spans] == assistant_targets(CONVERSATION)
    assert out["input_ids"][0] == 1  # <s>


def test_template_that_drops_system_prompt_fails_loudly(phi3_tokenizer):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(shared_path("phi3-tokenizer", "hf")))  # its own template
    with pytest.raises(DataError, match="drops the system message; set data.chat_template=phi3"):
        ConversationEncoder(tok).encode(CONVERSATION, "row 3")
    # the system text repeated in the user turn: still found missing (it used to pass, the system turn dropped)
    repeated = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Be brief. What is 2+2?"},
                {"role": "assistant", "content": "4"}]
    assert "<|system|>" not in tok.apply_chat_template(repeated, tokenize=False)
    with pytest.raises(DataError, match="^row 4: the chat template drops the system message"):
        ConversationEncoder(tok).encode(repeated, "row 4")
    use_chat_template(tok, "phi3")
    out = ConversationEncoder(tok).encode(repeated, "row 4")
    assert out["input_ids"][1] == tok.convert_tokens_to_ids("<|system|>")
    assert tok.decode(out["input_ids"]).count("Be brief.") == 2


# Templates that break the encoder's two assumptions: the conversation up to an assistant turn, rendered with
# the generation prompt, is a token prefix of the whole; and each assistant turn ends with <|end|>.
NOT_A_PREFIX = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
UNCLOSED = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
            "{% if m['role'] != 'assistant' %}{{ '<|end|>\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.mark.parametrize("template, message", [
    (NOT_A_PREFIX, r"row 3: tokens of the conversation up to message 1 are not a prefix of the whole conversation"),
    (UNCLOSED, r"row 3: assistant message 1 is not closed by the end-of-turn token"),
])
def test_a_template_the_label_mask_cannot_follow_fails_loudly(template, message):
    """Labels are found from the rendering, never guessed: a template that breaks either assumption is an error
    naming the row, not a silently wrong mask."""
    tok = tiny_tokenizer()
    tok.chat_template = template
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match=message):
        ConversationEncoder(tok).encode(conversation, "row 3")


@pytest.mark.parametrize("row, fmt, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "row 7: no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "messages",
     "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, "messages", "message 0 needs 'role' and 'content'"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown speaker 'alien'"),
    ({"instruction": "x"}, "alpaca", "need string 'instruction' and 'output'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "must start with a user turn"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages", "'messages' must be a list"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages", "message 0 content must be a string, got list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "b"}]}, "messages",
     r"a system message may only come first \(found at message 1\)"),
    ({"instruction": "a", "input": 7, "output": "b"}, "alpaca", "alpaca 'input' must be a string, got int"),
    ({"instruction": "a", "input": [], "output": "b"}, "alpaca", "alpaca 'input' must be a string, got list"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "messages",
     r"row 7: message 0 and message 1 are both user turns; user and assistant turns must alternate"),
    ({"system": "s", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                       {"from": "gpt", "value": "c"}]}, "sharegpt",
     r"turn 1 and turn 2 are both assistant turns"),
    ({"system": "s", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}]}, "sharegpt",
     r"row 7: turn 1 content must be a string, got int"),
    ({"system": ["s"], "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "sharegpt", r"row 7: 'system' content must be a string, got list"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "messages",
     r"row 7: no 'messages' \(this file's rows are read as messages, from its first row or data.format; this row "
     r"has keys \['conversations'\]\)"),
])
def test_bad_rows_name_row_and_problem(row, fmt, message):
    with pytest.raises(DataError, match=message):
        to_messages(row, fmt, "data.jsonl row 7")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl line 3: not valid JSON"):
        read_rows(str(path))


def _chat(user="a", system=None):
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("name, content, message", [
    ("saved", None, r"saved: a directory, but not a dataset saved with save_to_disk"),
    ("bad.parquet", b"not parquet at all", r"bad.parquet: cannot read it as parquet"),
    ("latin1.jsonl",
     (json.dumps(_chat()) + "\n" + json.dumps(_chat("caf\u00e9"), ensure_ascii=False)).encode("latin-1"),
     r"latin1.jsonl line 2: not UTF-8 text"),
    ("bom.jsonl", b"\xef\xbb\xbf" + json.dumps(_chat()).encode() + b"\n\xff\n",
     r"bom.jsonl line 2: not UTF-8 text \(invalid start byte at byte %d\)" % (3 + len(json.dumps(_chat())) + 1)),
    ("one.json", json.dumps(_chat(), indent=2).encode(), r"one.json: one JSON object; expected a list of rows"),
    ("broken.json", json.dumps(_chat(), indent=2).replace('"assistant"', '"assistant",').encode(),
     r"broken.json line 8: not valid JSON \(Expecting property name enclosed in double quotes\)"),
    ("rows.json", json.dumps([_chat(), [1, 2]]).encode(), r"rows.json row 1: expected a JSON object, got list"),
    ("rows.jsonl", (json.dumps(_chat()) + "\n\n7\n").encode(), r"rows.jsonl line 3: expected a JSON object, got int"),
    ("missing.jsonl", None, r"data file not found: .*missing.jsonl"),
    ("rows.csv", b"user,assistant\nhi,hello\n",
     r"rows.csv: a file, but not .json, .jsonl or .parquet \(the suffix tells"),
])
def test_files_that_are_not_data_get_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if name == "saved":
        path.mkdir()
        (path / "rows.jsonl").write_text(json.dumps(_chat()))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_rows(str(path))
    assert "\n" not in str(err.value)


def test_json_lines_end_at_newlines_only_and_a_byte_order_mark_is_skipped(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (``ensure_ascii=False`` writes them so);
    str.splitlines would cut a row there. Editors' UTF-8 byte-order mark is not part of the JSON."""
    texts = ["one\u2028two", "three\u2029four\u0085five"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(_chat(t), ensure_ascii=False) for t in texts) + "\n", encoding="utf-8")
    assert [row["messages"][0]["content"] for row in read_rows(str(path))] == texts
    for name, text in (("bom.json", json.dumps([_chat("x"), _chat("y")])),
                       ("bom.jsonl", json.dumps(_chat("x")) + "\n" + json.dumps(_chat("y")))):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        assert (tmp_path / name).read_bytes()[:3] == b"\xef\xbb\xbf"
        assert [row["messages"][0]["content"] for row in read_rows(str(tmp_path / name))] == ["x", "y"]


def test_suffixes_are_read_in_any_case(tmp_path):
    path = tmp_path / "UP.JSONL"
    path.write_text(json.dumps(_chat("x")) + "\n" + json.dumps(_chat("y")))
    assert [row["messages"][0]["content"] for row in read_rows(str(path))] == ["x", "y"]


def test_split_names_do_not_apply_to_a_single_file_and_evaluation_is_held_out(tmp_path, caplog):
    """A recipe's hub split names with data.path=my.jsonl: a warning each, the whole file read, and the
    evaluation rows held out of it (data.eval_size), never the whole training file evaluated."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(_chat(str(i))) for i in range(20)))
    cfg = load_config(None, [f"data.path={path}", "data.split=train_sft", "data.eval_split=test_sft",
                             "data.eval_size=4"])
    with caplog.at_level("WARNING", logger="phi3_lora.data"):
        train, evaluation = build_datasets(cfg.data, tiny_tokenizer(), seed=0)
    assert f"data.split='train_sft' does not apply to {path}, a single file with no splits: all of it is read" \
        in caplog.text
    assert "data.eval_split='test_sft' does not apply" in caplog.text and "holding out data.eval_size=4" in caplog.text
    assert (len(train), len(evaluation)) == (16, 4)
    train_ids = set(map(tuple, train.dataset["input_ids"]))
    assert not train_ids & set(map(tuple, evaluation.dataset["input_ids"]))


def test_errors_in_held_out_rows_name_their_row_in_the_file(tmp_path):
    """Held-out evaluation rows are taken out of the file before tokenization; an error still names the row's
    place in the file (line 31 here, the only one with a system message, which the tokenizer's template drops)."""
    path = tmp_path / "d.jsonl"
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(shared_path("phi3-tokenizer", "hf")))  # its own template, unchanged
    path.write_text("\n".join(json.dumps(_chat(str(i), system="Be brief." if i == 30 else None)) for i in range(40)))
    for eval_size in (0, 4, 0.5):
        cfg = load_config(None, [f"data.path={path}", f"data.eval_size={eval_size}", "data.chat_template=tokenizer"])
        with pytest.raises(DataError, match=r"d.jsonl line 31: the chat template drops the system message"):
            build_datasets(cfg.data, tok, seed=0)


def test_unknown_format_names_the_keys():
    with pytest.raises(DataError, match=r"cannot tell the format from keys \['prompt', 'response'\]"):
        detect_format({"prompt": "a", "response": "b"}, "x.jsonl row 0")


def test_truncate_and_drop_are_counted(tmp_path):
    """Each example is counted once: kept whole, kept truncated, or dropped (too long with overlong=drop, or
    with no answer token left after truncation)."""
    rows = [{"messages": [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a" * answer}]}
            for n, answer in ((10, 20), (10, 20), (60, 80), (300, 20), (400, 20))]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = tiny_tokenizer()
    for mode, kept, truncated, dropped in (("drop", 2, 0, 3), ("truncate", 3, 1, 2)):
        cfg = load_config(None, [f"data.path={path}", "data.max_seq_len=100", f"data.overlong={mode}",
                                 "data.eval_size=0"])
        train, _ = build_datasets(cfg.data, tok, seed=0)
        # truncation cuts off the whole answer of the two longest rows: they have nothing left to learn, so go
        assert (len(train), train.truncated, train.dropped) == (kept, truncated, dropped)
        assert max(len(x) for x in train.dataset["input_ids"]) <= 100


def test_held_out_eval_split_is_disjoint_and_deterministic():
    cfg = load_config(None, ["data.demo_size=100", "data.eval_size=0.1"])
    tok = tiny_tokenizer()
    train, evaluation = build_datasets(cfg.data, tok, seed=3)
    train2, evaluation2 = build_datasets(cfg.data, tok, seed=3)
    assert (len(train), len(evaluation)) == (90, 10)
    assert list(evaluation.dataset["input_ids"]) == list(evaluation2.dataset["input_ids"])
    assert list(train.dataset["input_ids"]) == list(train2.dataset["input_ids"])
    everything, _ = build_datasets(load_config(None, ["data.demo_size=100", "data.eval_size=0"]).data, tok, seed=3)
    split = sorted(map(tuple, list(train.dataset["input_ids"]) + list(evaluation.dataset["input_ids"])))
    assert split == sorted(map(tuple, everything.dataset["input_ids"]))  # a partition of the same rows


@pytest.mark.parametrize("n, mbs, accum, procs", list(itertools.product([1, 7, 16, 37], [1, 3], [1, 2], [1, 2, 3])))
def test_epoch_plan_uses_each_example_once_with_equal_micro_batches(n, mbs, accum, procs):
    plans = [plan_epoch(n, epoch=1, seed=5, micro_batch_size=mbs, accumulation=accum, num_processes=procs,
                        process_index=r) for r in range(procs)]
    seen = [i for plan in plans for step in plan for micro in step for i in micro]
    assert sorted(seen) == list(range(n))
    assert len({len(plan) for plan in plans}) == 1  # same number of optimizer steps on every process
    assert all(len(step) == accum for plan in plans for step in plan)
    assert all(len(micro) <= mbs for plan in plans for step in plan for micro in step)


def test_epoch_plans_differ_between_epochs_and_match_across_calls():
    a = plan_epoch(50, 0, 1, 4, 1, 1, 0)
    assert a == plan_epoch(50, 0, 1, 4, 1, 1, 0)
    assert a != plan_epoch(50, 1, 1, 4, 1, 1, 0)


A = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "example_id": 4}
B = {"input_ids": [5, 6], "labels": [5, 6], "example_id": 8}


def test_collator_pads_and_masks():
    batch = Collator(pad_token_id=9)([[A], [B]])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 6, -100]]  # position 0 is never a target
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert "position_ids" not in batch
    assert batch["example_ids"].tolist() == [4, 8] and int(batch["num_tokens"]) == 5
    empty = Collator(9)([])
    assert (empty["labels"] == IGNORE_INDEX).all() and empty["example_ids"].numel() == 0
    assert torch.equal(empty["input_ids"], torch.tensor([[9]])) and int(empty["num_tokens"]) == 0


def test_packed_collator_restarts_positions_and_cuts_labels_between_examples():
    batch = Collator(pad_token_id=9, packed=True)([[A, B], [B]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [5, 6, 9, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]  # padding: each token its own block
    # B's first token is not learned from A's last; padding is ignored
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 6], [-100, 6, -100, -100, -100]]
    assert "attention_mask" not in batch and int(batch["num_tokens"]) == 7


def test_best_fit_packing_fills_rows_and_keeps_kinds_apart():
    from phi3_lora.data import long_context_kinds, pack_best_fit_decreasing
    lengths = [7, 5, 4, 3, 3, 2, 1]
    rows = pack_best_fit_decreasing(lengths, capacity=8)
    assert sorted(i for row in rows for i in row) == list(range(7))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert len(rows) == 4  # 25 tokens need at least ceil(25 / 8) = 4 rows
    kinds = long_context_kinds([10, 2, 9, 3], threshold=8)
    assert kinds == [1, 0, 1, 0]
    rows = pack_best_fit_decreasing([10, 2, 9, 3], capacity=32, kinds=kinds)
    assert sorted(map(sorted, rows)) == [[0, 2], [1, 3]]
    assert long_context_kinds([1, 2], threshold=8) is None and long_context_kinds([1, 9], threshold=None) is None


def test_epoch_plan_never_mixes_kinds_in_a_step():
    kinds = [i % 3 == 0 for i in range(37)]
    kinds = [int(k) for k in kinds]
    for procs in (1, 2):
        plans = [plan_epoch(37, 0, 1, 2, 2, procs, r, kinds=kinds) for r in range(procs)]
        assert len({len(p) for p in plans}) == 1
        for s in range(len(plans[0])):
            step_items = [i for p in plans for micro in p[s] for i in micro]
            assert len({kinds[i] for i in step_items}) == 1
        assert sorted(i for p in plans for step in p for micro in step for i in micro) == list(range(37))
        from phi3_lora.data import steps_per_epoch
        assert len(plans[0]) == steps_per_epoch(37, 2, 2, procs, kinds)


def test_inspect_data_marks_spans_and_writes_jsonl(tmp_path):
    import sys

    from conftest import ROOT, run_script
    out = tmp_path / "new" / "folder" / "examples.jsonl"  # folders made as for any output
    proc = run_script([sys.executable, str(ROOT / "scripts" / "inspect_data.py"), "--num_examples", "3",
                       "--jsonl", str(out), "data.demo_size=50"])
    assert proc.stdout.count("--- example") == 3
    assert "<|assistant|>\n[[" in proc.stdout and "<|end|>]]" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    tok = tiny_tokenizer()
    for row in rows:
        spans = supervised_spans(row["input_ids"], row["labels"])
        assert spans and all(tok.decode(s).endswith("<|end|>") for s in spans)
        assert all(label == IGNORE_INDEX or label == token for token, label in zip(row["input_ids"], row["labels"]))


def test_group_by_length_cuts_padding_and_keeps_every_example_once():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (203,), generator=gen).tolist()

    def padded_tokens(plan):
        return sum(len(micro) * max(lengths[i] for i in micro) for step in plan for micro in step if micro)

    for procs in (1, 2):
        plain = [plan_epoch(203, 3, 0, 4, 2, procs, r) for r in range(procs)]
        grouped = [plan_epoch(203, 3, 0, 4, 2, procs, r, lengths=lengths) for r in range(procs)]
        assert sorted(i for p in grouped for step in p for micro in step for i in micro) == list(range(203))
        assert len(grouped[0]) == len(plain[0]) and len({len(p) for p in grouped}) == 1
        waste_plain = sum(padded_tokens(p) for p in plain) - sum(lengths)
        waste_grouped = sum(padded_tokens(p) for p in grouped) - sum(lengths)
        assert waste_grouped < 0.25 * waste_plain, (waste_grouped, waste_plain)
    assert plan_epoch(203, 3, 0, 4, 2, 1, 0, lengths=lengths) != plan_epoch(203, 4, 0, 4, 2, 1, 0, lengths=lengths)


def test_group_by_length_in_a_run(tmp_path):
    from conftest import FAST, in_process_trainer, read_metrics
    cfg = load_config(None, [*FAST, f"output_dir={tmp_path}", "data.group_by_length=true", "training.max_steps=3"])
    trainer = in_process_trainer(cfg)
    first = next(trainer._batches_of_epoch())
    expected = plan_epoch(len(trainer.train_items), 0, cfg.training.seed, cfg.training.per_device_batch_size, 1, 1, 0,
                          lengths=trainer.train_items.lengths)[0][0]
    assert sorted(first[0]["example_ids"].tolist()) == sorted(expected)
    trainer.train()
    assert [m["step"] for m in read_metrics(tmp_path) if "loss" in m] == [1, 2, 3]


def test_a_damaged_saved_dataset_is_one_line(tmp_path):
    """A save_to_disk directory whose state file or Arrow data is damaged: a DataError naming it."""
    import datasets
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}] * 4).save_to_disk(str(saved))
    (arrow,) = saved.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:300])
    unreadable = rf"^{saved}: a dataset saved with save_to_disk, but not readable"
    with pytest.raises(DataError, match=unreadable + r" \(ArrowInvalid: "):
        read_rows(str(saved))
    (saved / "state.json").write_text("{broken")
    with pytest.raises(DataError, match=unreadable + r" \(JSONDecodeError: "):
        read_rows(str(saved))


def test_a_damaged_base_model_file_is_one_line(tmp_path):
    """model.name_or_path whose weights file is cut short: a ConfigError naming the model, not safetensors' own."""
    from phi3_lora.config import ConfigError
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, ["model.tiny_hidden_size=64"])
    tokenizer = load_tokenizer(cfg.model)
    load_model(cfg.model, tokenizer, seed=0).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = load_config(None, [f"model.name_or_path={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"^model.name_or_path: cannot load '{tmp_path}': "):
        load_model(cfg.model, tokenizer, seed=0)


def test_a_model_that_is_no_directory_here_is_named_by_the_key_the_user_set(tmp_path):
    """Offline, a missing local model reaches the hub and fails there: the error says it is not here, and names
    model.name_or_path (what was set), not model.tokenizer (which defaults to it)."""
    from phi3_lora.config import ConfigError
    from phi3_lora.model import load_tokenizer
    missing = tmp_path / "merged" / "phi3"
    for overrides, key in (([f"model.name_or_path={missing}"], "model.name_or_path"),
                           ([f"model.tokenizer={missing}"], "model.tokenizer")):
        cfg = load_config(None, overrides)
        with pytest.raises(ConfigError, match=rf"^{key}: cannot load '{missing}' \(no such directory here, so it "
                                              r"was looked up on the hub\): "):
            load_tokenizer(cfg.model)
