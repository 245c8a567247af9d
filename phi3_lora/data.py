"""From rows to batches: render with the chat template, tokenize, mask labels, plan and collate.

Labels are the input ids where a token is supervised and -100 elsewhere; the model's loss does
the shift, once. Supervised tokens are each assistant turn's content and the ``<|end|>`` that
closes it, so the model learns to stop. They are found from the rendered conversation, never
from hard-coded ids: the conversation up to each assistant turn is rendered with the
generation prompt and tokenized, which must be a prefix of the whole conversation's tokens
(else ``DataError``); the turn's span runs from there to its end-of-turn token.

Batches are planned per optimizer step, not per micro-batch (see ``plan_epoch``), so every
example is seen exactly once per epoch on any number of processes, and every process runs
the same number of micro-batches.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import re
from array import array
from collections import Counter
from dataclasses import dataclass

import torch

from .config import DataConfig
from .formats import DataError, detect_format, is_single_file, read_rows, row_name, to_messages

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# The template of Phi-3-mini's later revisions on the hub: like the original one, plus system turns.
PHI3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# ----------------------------------------------------------------------------- tokenization

def end_of_turn_id(tokenizer) -> int:
    """The id of Phi-3's ``<|end|>`` (closes every turn), or of eos for tokenizers without it."""
    token_id = tokenizer.convert_tokens_to_ids("<|end|>")
    if token_id is None or token_id == tokenizer.unk_token_id:
        return tokenizer.eos_token_id
    return token_id


def use_chat_template(tokenizer, which: str) -> None:
    """Select the template: the tokenizer's own, or the built-in Phi-3 one (``data.chat_template``)."""
    if which == "phi3" or tokenizer.chat_template is None:
        tokenizer.chat_template = PHI3_CHAT_TEMPLATE


def drops_system_message(tokenizer) -> bool:
    """Whether the chat template leaves a system message out (the original Phi-3-mini template has no system
    role), probed with a text found nowhere else: a system prompt repeated in a user turn would hide the drop."""
    probe = "phi3-lora system probe 7f3c"
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": probe}, {"role": "user", "content": "u"},
                                              {"role": "assistant", "content": "a"}], tokenize=False)
    except Exception:  # a template may raise on a system role (jinja's raise_exception): it has none either
        return True
    return probe not in text


SYSTEM_DROPPED = "the chat template drops the system message; set data.chat_template=phi3 to render it"


def control_token_finder(tokenizer):
    """``find(text)``: the first string in ``text`` that the tokenizer reads as one of its added (control) tokens,
    ``<|end|>``, ``<|assistant|>``, ``<s>``..., or None. Such text in a message would act as that token."""
    controls = sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, controls))) if controls else None

    def find(text: str) -> str | None:
        found = pattern.search(text) if pattern else None
        return found.group() if found else None
    return find


def check_control_tokens(find, messages: list[dict], where: str) -> None:
    """A ``DataError`` naming the first message whose text holds a control token's string (see above)."""
    for i, m in enumerate(messages):
        token = find(m["content"])
        if token:
            raise DataError(f"{where}: message {i} ({m['role']}) contains '{token}', which the tokenizer reads as a "
                            "control token, not as text; remove it from the data")


class ConversationEncoder:
    """Turns one conversation into ``input_ids`` and ``labels`` (assistant turns + their end token).

    ``max_len``: assistant turns that start at or past it are not marked (truncation cuts them), so a
    long conversation is not re-tokenized turn after turn beyond what is kept. A message whose text holds
    a control token's string (``<|end|>``, ``<|assistant|>``...) is a ``DataError``: the tokenizer would
    read it as that token, not as text, and the label mask would follow it.
    """

    def __init__(self, tokenizer, train_on_prompt: bool = False, max_len: int | None = None):
        self.tokenizer = tokenizer
        self.train_on_prompt = train_on_prompt
        self.max_len = max_len
        self.end_id = end_of_turn_id(tokenizer)
        self.find_control_token = control_token_finder(tokenizer)
        self._drops_system = None  # probed at the first system message

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_texts(self, messages: list[dict], full: str, where: str) -> None:
        if messages[0]["role"] == "system":
            if self._drops_system is None:
                self._drops_system = drops_system_message(self.tokenizer)
            if self._drops_system:
                raise DataError(f"{where}: {SYSTEM_DROPPED}")
        for m in messages:
            if m["content"] and m["content"] not in full:
                raise DataError(f"{where}: the chat template drops the {m['role']} message; "
                                "set data.chat_template=phi3 to render it")
        check_control_tokens(self.find_control_token, messages, where)

    def encode(self, messages: list[dict], where: str) -> dict[str, list[int]]:
        full = self._render(messages, generation_prompt=False)
        self._check_texts(messages, full, where)
        ids = self._ids(full)
        if self.train_on_prompt:  # every token but the first, which nothing predicts
            return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}
        labels = [IGNORE_INDEX] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._ids(self._render(messages[:i], generation_prompt=True))
            if ids[:len(prefix)] != prefix:
                raise DataError(f"{where}: tokens of the conversation up to message {i} are not a prefix "
                                "of the whole conversation's tokens; cannot mark the assistant turn")
            if self.max_len is not None and len(prefix) >= self.max_len:
                break  # this turn and the later ones lie past what truncation keeps
            try:
                end = ids.index(self.end_id, len(prefix)) + 1
            except ValueError:
                raise DataError(f"{where}: assistant message {i} is not closed by the end-of-turn token") from None
            labels[len(prefix):end] = ids[len(prefix):end]
        return {"input_ids": ids, "labels": labels}


@dataclass
class TokenizedSplit:
    """A tokenized dataset (columns ``input_ids``, ``labels``, ``example_id``) and what was cut."""
    dataset: object
    truncated: int
    dropped: int
    copies_of_training: int = 0  # evaluation examples left out: the same tokens as a training example

    def __len__(self) -> int:
        return len(self.dataset)


def _normalise(rows, fmt: str, source: str) -> tuple[list[list[dict]], list[str]]:
    """The rows as messages, and each row's place in ``source`` (``row_name``) for errors."""
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    places = [row_name(rows, i) for i in range(len(rows))]
    fmt = detect_format(rows[0], f"{source} {places[0]}") if fmt == "auto" else fmt
    return [to_messages(row, fmt, f"{source} {place}") for row, place in zip(rows, places)], places


def tokenize_conversations(conversations: list[list[dict]], tokenizer, cfg: DataConfig, source: str,
                           places: list[str]) -> TokenizedSplit:
    """Encode conversations with ``datasets.map`` and apply ``data.max_seq_len`` / ``data.overlong``.

    ``places``: each conversation's place in ``source`` (``row 3``, ``line 4``), for errors."""
    import datasets

    encoder = ConversationEncoder(tokenizer, cfg.train_on_prompt, max_len=cfg.max_seq_len)
    table = datasets.Dataset.from_dict({"messages": conversations,
                                        "example_id": list(range(len(conversations)))})

    def encode(row):
        out = encoder.encode(row["messages"], f"{source} {places[row['example_id']]}")
        n = len(out["input_ids"])
        out["was_truncated"] = n > cfg.max_seq_len
        if n > cfg.max_seq_len:
            out = {k: v[:cfg.max_seq_len] if isinstance(v, list) else v for k, v in out.items()}
        out["num_supervised"] = sum(label != IGNORE_INDEX for label in out["labels"][1:])
        return out

    encoded = table.map(encode, remove_columns=["messages"], num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                        desc=f"Tokenizing {source}")
    over = encoded["was_truncated"]
    keep = [i for i, (o, s) in enumerate(zip(over, encoded["num_supervised"]))
            if s > 0 and not (o and cfg.overlong == "drop")]
    dropped = len(encoded) - len(keep)
    if not keep:
        raise DataError(f"{source}: every example was dropped (longer than data.max_seq_len="
                        f"{cfg.max_seq_len} or nothing supervised left after truncation)")
    encoded = encoded.select(keep) if dropped else encoded
    return TokenizedSplit(encoded.remove_columns(["was_truncated", "num_supervised"]),
                          truncated=sum(over[i] for i in keep), dropped=dropped)


def fingerprint(split: TokenizedSplit) -> str:
    """SHA-256 of the examples' token ids and labels, in order: what a checkpoint's data position refers to."""
    digest = hashlib.sha256()
    for batch in split.dataset.iter(batch_size=1000):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            digest.update(array("q", [len(ids), *ids, *labels]).tobytes())
    return digest.hexdigest()


def _held_out_count(n: int, eval_size: float) -> int:
    if eval_size <= 0:
        return 0
    count = int(eval_size) if eval_size >= 1 else max(1, round(n * eval_size))
    if count >= n:
        raise DataError(f"data.eval_size={eval_size} holds out all {n} rows; nothing left to train on")
    return count


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[TokenizedSplit, TokenizedSplit | None]:
    """Load, normalise, split and tokenize the training data and the evaluation data (if any)."""
    _single_file_split(cfg.path, cfg.split, "data.split", "all of it is read")
    eval_split = _single_file_split(cfg.eval_path or cfg.path, cfg.eval_split, "data.eval_split",
                                    "all of it is the evaluation set" if cfg.eval_path else
                                    f"holding out data.eval_size={cfg.eval_size:g} of its rows instead"
                                    if cfg.eval_size > 0 else "no evaluation (data.eval_size=0)")
    conversations, places = _normalise(read_rows(cfg.path, cfg.split, cfg.demo_size, seed=0), cfg.format, cfg.path)
    eval_conversations, eval_places, eval_source = None, None, cfg.path
    if cfg.eval_path or eval_split:
        eval_source = cfg.eval_path or f"{cfg.path}[{eval_split}]"
        eval_conversations, eval_places = _normalise(read_rows(cfg.eval_path or cfg.path, eval_split or cfg.split,
                                                               cfg.demo_size, seed=1), cfg.format, eval_source)
    else:
        n_eval = _held_out_count(len(conversations), cfg.eval_size)
        if n_eval:  # rows held out of the training file keep their places there, for errors
            eval_rows = _rows_to_hold_out(conversations, n_eval, seed, cfg)
            held_out = set(eval_rows)
            train_rows = [i for i in range(len(conversations)) if i not in held_out]
            eval_conversations, eval_places = [conversations[i] for i in eval_rows], [places[i] for i in eval_rows]
            conversations, places = [conversations[i] for i in train_rows], [places[i] for i in train_rows]
    train = tokenize_conversations(conversations, tokenizer, cfg, cfg.path, places)
    evaluation = None
    if eval_conversations:
        evaluation = tokenize_conversations(eval_conversations, tokenizer, cfg, eval_source, eval_places)
        evaluation = without_copies_of(train, evaluation, eval_source)
    return train, evaluation


def _rows_to_hold_out(conversations: list[list[dict]], n_eval: int, seed: int, cfg: DataConfig) -> list[int]:
    """``n_eval`` rows drawn at random (``seed``) among the conversations that occur once in the file: a
    repeated one would land in both splits, and its evaluation would measure memorisation."""
    keys = [json.dumps(c, sort_keys=True) for c in conversations]
    counts = Counter(keys)
    once = [i for i, key in enumerate(keys) if counts[key] == 1]
    if len(once) < n_eval:
        raise DataError(f"{cfg.path}: data.eval_size={cfg.eval_size:g} holds out {n_eval} rows, but only {len(once)} "
                        "conversations occur once (a repeated one would be in both splits); hold out fewer, or "
                        "give data.eval_path")
    order = torch.randperm(len(once), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(once[i] for i in order[:n_eval])


def without_copies_of(train: TokenizedSplit, evaluation: TokenizedSplit, source: str) -> TokenizedSplit:
    """``evaluation`` less the examples whose tokens (as truncated) equal a training example's: their loss
    measures memorisation. Rows held out of the training file are never copies (``_rows_to_hold_out``);
    a separate evaluation file or split may hold some (chat dumps repeat conversations)."""
    trained = {hash(tuple(ids)) for batch in train.dataset.iter(batch_size=1000) for ids in batch["input_ids"]}
    keep = [i for i, ids in enumerate(evaluation.dataset["input_ids"]) if hash(tuple(ids)) not in trained]
    if not keep:
        raise DataError(f"{source}: every evaluation example is also a training example")
    copies = len(evaluation) - len(keep)
    if copies:
        logger.warning("%s: %d evaluation examples are copies of training examples; they are left out", source, copies)
        evaluation.dataset = evaluation.dataset.select(keep)
        evaluation.copies_of_training = copies
    return evaluation


def _single_file_split(path: str, split: str | None, key: str, instead: str) -> str | None:
    """``split``, or None with a warning where ``path`` is a single local file, which has no splits (a recipe's
    hub split names, e.g. train_sft/test_sft, with ``data.path=my.jsonl``): the evaluation rows are then held out
    of the file rather than the whole file evaluated, the mistake this guards against."""
    if split and split != "train" and is_single_file(path):
        logger.warning(f"{key}='{split}' does not apply to {path}, a single file with no splits: {instead}")
        return None
    return split


# ----------------------------------------------------------------------------- packing

def pack_best_fit_decreasing(lengths: list[int], capacity: int, kinds: list[int] | None = None) -> list[list[int]]:
    """Rows of example indices whose lengths add up to at most ``capacity``, by best-fit decreasing.

    Longest first, each into the fullest row it still fits (O(n log n)); as good as first-fit
    decreasing or better, and within 22% of the fewest possible rows.
    Examples of different ``kinds`` never share a row (LongRoPE: examples past the original context
    and examples within it must not meet, see ``long_context_kinds``). Rows come out in a fixed
    order, so packing is deterministic; the epoch plan shuffles them.
    """
    kinds = kinds or [0] * len(lengths)
    rows: list[list[int]] = []
    open_rows: dict[int, list[tuple[int, int]]] = {}  # kind -> sorted (free room, row index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        free = open_rows.setdefault(kinds[i], [])
        at = bisect.bisect_left(free, (lengths[i], -1))  # the fullest row that still fits (best fit)
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(i)
            bisect.insort(free, (room - lengths[i], r))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - lengths[i], len(rows) - 1))
    return rows


def long_context_threshold(model_config) -> int | None:
    """LongRoPE models switch rope factors past this many positions (see ``long_context_kinds``)."""
    rope = getattr(model_config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "longrope":
        return None
    return rope.get("original_max_position_embeddings") or model_config.original_max_position_embeddings


def long_context_kinds(lengths: list[int], threshold: int | None) -> list[int] | None:
    """1 for examples longer than ``threshold`` (LongRoPE's original context), else 0; None without one.

    transformers picks LongRoPE's short or long factors from the largest position in the whole batch,
    so one long example would switch every example it is batched with to the long factors. Keeping
    the two kinds apart (in rows, micro-batches and optimizer steps) gives each example the factors
    it would get alone.
    """
    if threshold is None:
        return None
    kinds = [int(n > threshold) for n in lengths]
    return kinds if len(set(kinds)) > 1 else None


class TrainItems:
    """What an epoch plan indexes: single examples, or packed rows of several examples."""

    def __init__(self, split: TokenizedSplit, max_seq_len: int, packing: bool, long_threshold: int | None):
        self.dataset = split.dataset
        self.example_lengths = lengths = [len(ids) for ids in self.dataset["input_ids"]]
        example_kinds = long_context_kinds(lengths, long_threshold)
        if packing:
            self.rows = pack_best_fit_decreasing(lengths, max_seq_len, example_kinds)
        else:
            self.rows = [[i] for i in range(len(lengths))]
        self.kinds = None if example_kinds is None else [example_kinds[row[0]] for row in self.rows]
        self.lengths = [sum(lengths[i] for i in row) for row in self.rows]
        self.packing_efficiency = sum(lengths) / (len(self.rows) * max_seq_len) if packing else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.dataset[j] for j in self.rows[i]]


# ----------------------------------------------------------------------------- batching

def plan_epoch(num_items: int, epoch: int, seed: int, micro_batch_size: int, accumulation: int,
               num_processes: int, process_index: int, shuffle: bool = True,
               kinds: list[int] | None = None, lengths: list[int] | None = None) -> list[list[list[int]]]:
    """The micro-batches of one process for one epoch, grouped by optimizer step.

    The epoch's items (examples, or packed rows) are shuffled (seed + epoch, the same on every
    process) and cut into optimizer steps of ``micro_batch_size * accumulation * num_processes``
    items. Within a step, item k goes to slot k mod (accumulation * num_processes), slot =
    (micro-batch, process). So every item is used exactly once per epoch; the last, smaller step
    spreads its remainder evenly, and a slot it cannot fill is an empty micro-batch (it contributes
    no tokens to the loss), so every process always runs ``accumulation`` micro-batches per step.
    With ``kinds`` (see ``long_context_kinds``) each kind is cut into its own steps, so no step mixes
    kinds; the steps of all kinds are then shuffled together. With ``lengths`` (``data.group_by_length``)
    the shuffled items are sorted by length within windows of 50 steps before they are cut, so a
    micro-batch holds items of similar length (less padding), and the steps are shuffled again.

    Returns:
        ``steps[s][j]`` = item indices of micro-batch j of optimizer step s on this process.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_items, generator=generator).tolist() if shuffle else list(range(num_items))
    per_step = micro_batch_size * accumulation * num_processes
    groups = [order] if kinds is None else [[i for i in order if kinds[i] == k] for k in sorted(set(kinds))]
    chunks = []
    for group in groups:
        if lengths is not None:
            window = 50 * per_step
            group = [i for w in range(0, len(group), window)
                     for i in sorted(group[w:w + window], key=lambda i: -lengths[i])]
        chunks += [group[start:start + per_step] for start in range(0, len(group), per_step)]
    if shuffle and (kinds is not None or lengths is not None):
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
    slots = accumulation * num_processes
    return [[chunk[j * num_processes + process_index::slots] for j in range(accumulation)] for chunk in chunks]


def eval_plan(split: TokenizedSplit, batch_size: int, long_threshold: int | None, num_processes: int = 1,
              process_index: int = 0) -> list[list[int]]:
    """This process's evaluation batches, in order, each within one LongRoPE kind (see ``long_context_kinds``):
    an example's loss does not depend on the batch size or on which examples share its batch."""
    kinds = long_context_kinds([len(ids) for ids in split.dataset["input_ids"]], long_threshold)
    steps = plan_epoch(len(split), 0, 0, batch_size, 1, num_processes, process_index, shuffle=False, kinds=kinds)
    return [batch for (batch,) in steps]


def steps_per_epoch(num_items: int, micro_batch_size: int, accumulation: int, num_processes: int,
                    kinds: list[int] | None = None) -> int:
    per_step = micro_batch_size * accumulation * num_processes
    sizes = [num_items] if kinds is None else [kinds.count(k) for k in set(kinds)]
    return sum(math.ceil(n / per_step) for n in sizes)


class Collator:
    """Pads items into a batch. An item is a list of examples: one, or several packed into one row.

    Every batch carries ``supervised_positions`` (see there), found here on the CPU so that the loss
    needs no device sync to find them. Packed rows carry ``position_ids`` restarting at 0 for each
    example and no attention mask, so transformers gives each example its own causal block (with
    ``use_cache=False``); the first label of every example is ignored, so no example learns from the
    one before it. Unpacked batches carry an attention mask instead (except under ``varlen``). An empty item
    list gives one all-ignored row.

    ``varlen`` (flash-attention, packed or not): the micro-batch's examples are laid end to end as one
    row, with no padding, ``position_ids`` restarting at 0 for each, and the batch carries their bounds as
    flash-attention's ``cu_seq_lens_q/k`` and ``max_length_q/k``. transformers runs flash-attention's
    variable-length kernel only on a single row (with several, examples would attend to the ones before
    them in their row), and with the bounds given it need not find them from ``position_ids``; a padded
    batch with an attention mask would have it unpad every layer's input instead (``nonzero`` and
    ``.item()``: device syncs in every layer). sdpa keeps the rows: one long row would cost it attention
    over all their tokens.
    """

    def __init__(self, pad_token_id: int, packed: bool = False, varlen: bool = False):
        self.pad_token_id = pad_token_id
        self.packed = packed
        self.varlen = varlen

    def __call__(self, items: list[list[dict]]) -> dict:
        if not items:
            items = [[{"input_ids": [self.pad_token_id], "labels": [IGNORE_INDEX], "example_id": -1}]]
        if self.varlen:
            items = [[e for examples in items for e in examples]]
        rows = [self._row(examples) for examples in items]
        longest = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id)
        labels = torch.full((len(rows), longest), IGNORE_INDEX)
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, (ids, labs, pos) in enumerate(rows):
            n = len(ids)
            input_ids[r, :n], labels[r, :n], positions[r, :n], mask[r, :n] = (
                torch.tensor(ids), torch.tensor(labs), torch.tensor(pos), 1)
            # padding keeps position 0: each padding token is a block of its own, never attended to, and the
            # batch's largest position (which picks LongRoPE's factors, see long_context_kinds) is an example's
        example_ids = [e["example_id"] for examples in items for e in examples if e["example_id"] >= 0]
        batch = {"input_ids": input_ids, "labels": labels, "example_ids": torch.tensor(example_ids, dtype=torch.long),
                 "num_tokens": torch.tensor(int(mask.sum()) if example_ids else 0),
                 "supervised_positions": supervised_positions(labels)}
        if self.packed or self.varlen:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = mask
        if self.varlen:
            lengths = [len(e["input_ids"]) for e in items[0]]
            bounds = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            longest_example = max(lengths)
            batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest_example,
                         max_length_k=longest_example)
        return batch

    @staticmethod
    def _row(examples: list[dict]) -> tuple[list[int], list[int], list[int]]:
        ids, labels, positions = [], [], []
        for e in examples:
            ids += e["input_ids"]
            labels += [IGNORE_INDEX] + list(e["labels"][1:])
            positions += range(len(e["input_ids"]))
        return ids, labels, positions


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``, its numbers as they are. The copies do not wait for the GPU: CUDA stages
    pageable memory at once, so the CPU goes on queueing the step's work while the GPU runs the last one."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def uses_varlen(model) -> bool:
    """Whether ``model`` attends with flash-attention, whose batches the ``Collator`` lays end to end (``varlen``)."""
    return model.config._attn_implementation.startswith("flash_attention")


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Indices into ``labels.flatten()`` of the positions whose next token is supervised: position ``i``
    predicts the label at ``i + 1``, in the same row. On a GPU, finding them costs a device sync."""
    rows, columns = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.size(1) + columns
