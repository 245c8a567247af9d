"""Generation with a (possibly adapted) Phi-3: stop tokens, prompt files, batched and multi-turn answers.

Prompts are rendered with the tokenizer's chat template and the generation prompt
(``<|assistant|>\\n``), exactly as the training data was, then tokenized without adding special
tokens (the template already holds ``<s>``). A batch is padded on the LEFT, so every row's
last prompt token sits at the same position and the new tokens follow directly; position ids
come from the attention mask. Generation stops at Phi-3's end-of-turn tokens, looked up by
name in the tokenizer (``<|end|>``, ``<|endoftext|>``, ``<|assistant|>``: 32007, 32000, 32001
for the real tokenizer; the tiny tokenizer has its own ids), never hard-coded.

Prompt files (JSONL, one object a line) come in two shapes:

* ``{"messages": [...], "reference"?: str, "id"?: ...}`` — one answer to the conversation; a final
  assistant message, if present, is taken as the reference answer instead of being shown.
* MT-bench: ``{"question_id": ..., "turns": [str, ...], "reference"?: [str, ...]}`` — answered
  turn by turn; each turn sees the model's own previous answers.

Used by ``scripts/evaluate.py`` and ``scripts/chat.py``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError
from .data import long_context_threshold
from .formats import DataError, check_conversation, json_lines, read_utf8_text

STOP_TOKENS = ("<|end|>", "<|endoftext|>", "<|assistant|>")


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer: eos and those of ``STOP_TOKENS`` the tokenizer knows."""
    ids = {tokenizer.eos_token_id}
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


@dataclass
class GenerationSettings:
    """How to sample: greedy unless ``do_sample``; ``seed`` makes sampling repeatable."""
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be at least 1, got {getattr(self, name)}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"--temperature: must be greater than 0 to sample, got {self.temperature}")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p: must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict:
        if self.do_sample:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@dataclass
class Answer:
    text: str
    new_tokens: int
    stopped: bool  # ended on a stop token (False: cut at max_new_tokens)


# ----------------------------------------------------------------------------- prompt files

@dataclass
class Prompt:
    """One item of a prompts file: a fixed start (system/earlier turns), the user turns to answer, references."""
    id: str
    context: list[dict]
    turns: list[str]
    references: list[str | None]


def _references(value, n: int, where: str) -> list[str | None]:
    if value is None:
        return [None] * n
    if isinstance(value, str):
        value = [value] if n == 1 else [None] * (n - 1) + [value]
    if not isinstance(value, list) or len(value) != n or not all(v is None or isinstance(v, str) for v in value):
        raise DataError(f"{where}: 'reference' must be a string or a list of {n} strings (one per turn)")
    return [v if v and v.strip() else None for v in value]  # an empty reference is in every answer: none


def read_prompts(path: str | Path) -> list[Prompt]:
    """Parse a prompts file (see the module docstring); a bad line raises ``DataError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    prompts = []
    for lineno, line in json_lines(read_utf8_text(path)):
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        ident = str(row.get("question_id", row.get("id", len(prompts))))
        if "turns" in row:
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise DataError(f"{where}: 'turns' must be a non-empty list of strings")
            context = [{"role": "system", "content": row["system"]}] if row.get("system") else []
            prompts.append(Prompt(ident, context, turns, _references(row.get("reference"), len(turns), where)))
        elif "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not messages:
                raise DataError(f"{where}: 'messages' must be a non-empty list")
            for j, m in enumerate(messages):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise DataError(f"{where}: message {j} needs 'role' and 'content'")
            reference = row.get("reference")
            if messages[-1]["role"] == "assistant":
                reference = reference if reference is not None else messages[-1]["content"]
                messages = messages[:-1]
            if not messages or messages[-1]["role"] != "user":
                raise DataError(f"{where}: the conversation must end with a user message to answer")
            check_conversation(messages + [{"role": "assistant", "content": "x"}], where)
            context = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
            prompts.append(Prompt(ident, context, [messages[-1]["content"]], _references(reference, 1, where)))
        else:
            raise DataError(f"{where}: expected 'messages' or 'turns' (MT-bench), got keys {sorted(row)}")
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def check_prompts(tokenizer, prompts: list[Prompt]) -> None:
    """Before any model loads: a prompt with a control token's string in its text (the model would see that
    token), or whose system message the chat template drops, is a ``DataError``."""
    from .data import check_control_tokens, control_token_finder

    find = control_token_finder(tokenizer)
    for p in prompts:
        check_control_tokens(find, p.context + [{"role": "user", "content": t} for t in p.turns], f"prompt {p.id}")
    for p in prompts:
        if p.context and p.context[0]["role"] == "system":
            try:
                encode_prompts(tokenizer, [p.context + [{"role": "user", "content": p.turns[0]}]])
            except DataError as err:
                raise DataError(f"prompt {p.id}: {err}") from None


# ----------------------------------------------------------------------------- generation

def encode_prompts(tokenizer, conversations: list[list[dict]]) -> dict[str, torch.Tensor]:
    """Render with the chat template + generation prompt and tokenize, padded on the left."""
    from .data import SYSTEM_DROPPED, drops_system_message

    if any(c[0]["role"] == "system" for c in conversations) and drops_system_message(tokenizer):
        raise DataError(SYSTEM_DROPPED)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop id, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i], True
    return tokens, False


def context_length(model) -> int:
    """The most tokens (prompt and answer) the model was made for: its ``max_position_embeddings``."""
    return model.config.max_position_embeddings


def prompt_length(tokenizer, conversation: list[dict]) -> int:
    return len(encode_prompts(tokenizer, [conversation])["input_ids"][0])


def trim_history(tokenizer, history: list[dict], limit: int) -> tuple[list[dict], int]:
    """``history`` without its oldest exchanges, so that its prompt holds at most ``limit`` tokens, and how
    many user turns were left out. A leading system message stays; the last user turn must fit alone."""
    start = 1 if history and history[0]["role"] == "system" else 0
    turns = [i for i in range(start, len(history)) if history[i]["role"] == "user"]
    for dropped, first in enumerate(turns):
        kept = history[:start] + history[first:]
        if prompt_length(tokenizer, kept) <= limit:
            return kept, dropped
    raise DataError(f"the message alone is a prompt of {prompt_length(tokenizer, kept)} tokens, over the "
                    f"{limit} the model's context leaves beside the answer")


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], settings: GenerationSettings,
                     streamer=None, names: list[str] | None = None) -> list[Answer]:
    """Answer each conversation (ending with a user turn) in one left-padded batch.

    Prompt and answer stay within the model's context: the batch's answers get at most the room its longest
    prompt leaves (an answer cut there is not ``stopped``); a prompt that fills the context is a ``DataError``
    naming it (``names``: one per conversation, default "conversation N").
    """
    stop_ids = stop_token_ids(tokenizer)
    inputs = encode_prompts(tokenizer, conversations)
    room = context_length(model) - inputs["input_ids"].shape[1]
    if room < 1:
        longest = int(inputs["attention_mask"].sum(1).argmax())
        name = names[longest] if names else f"conversation {longest + 1}"
        raise DataError(f"{name}: its prompt of {inputs['input_ids'].shape[1]} tokens leaves no room for an "
                        f"answer in the model's context of {context_length(model)} tokens")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    output = model.generate(**inputs, max_new_tokens=min(settings.max_new_tokens, room), eos_token_id=stop_ids,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True, streamer=streamer,
                            **settings.generate_kwargs())
    answers = []
    for row in output[:, inputs["input_ids"].shape[1]:].tolist():
        tokens, stopped = cut_at_stop(row, stop_ids)
        answers.append(Answer(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), stopped))
    return answers


def answer_prompts(model, tokenizer, prompts: list[Prompt], settings: GenerationSettings,
                   desc: str = "generating") -> list[list[Answer]]:
    """Answers per prompt and turn. Turn t of every prompt is generated in batches, after turn t-1
    of all of them, so each conversation carries the model's own previous answers."""
    histories = [list(p.context) for p in prompts]
    answers: list[list[Answer]] = [[] for _ in prompts]
    total = sum(len(p.turns) for p in prompts)
    with torch.random.fork_rng(devices=[]), tqdm(total=total, desc=desc, dynamic_ncols=True) as bar:
        torch.manual_seed(settings.seed)
        for turn in range(max(len(p.turns) for p in prompts)):
            todo = [i for i, p in enumerate(prompts) if turn < len(p.turns)]
            for i in todo:
                histories[i].append({"role": "user", "content": prompts[i].turns[turn]})
            for chunk in generation_batches(model, tokenizer, todo, histories, settings):
                batch_answers = generate_answers(model, tokenizer, [histories[i] for i in chunk], settings,
                                                 names=[f"prompt {prompts[i].id} turn {turn + 1}" for i in chunk])
                for i, answer in zip(chunk, batch_answers):
                    answers[i].append(answer)
                    histories[i].append({"role": "assistant", "content": answer.text})
                bar.update(len(chunk))
    return answers


def generation_batches(model, tokenizer, todo: list[int], histories: list[list[dict]], settings: GenerationSettings):
    """``todo`` (indices into ``histories``) in batches of ``settings.batch_size`` whose answers are those each
    prompt gets alone. Under LongRoPE transformers picks the short or long rope factors from the largest position
    of the whole batch (as in training, see ``data.long_context_kinds``): a batch holds only prompts that stay
    within the original context with their whole answer, or only prompts already past it; one whose answer may
    cross it goes alone (its factors change during the answer, as they would alone)."""
    threshold = long_context_threshold(model.config)
    groups = [todo]
    if threshold is not None:
        within, past, crossing = [], [], []
        for i in todo:
            n = prompt_length(tokenizer, histories[i])
            (within if n + settings.max_new_tokens <= threshold else past if n > threshold else crossing).append(i)
        groups = [within, past, *([i] for i in crossing)]
    for group in groups:
        for start in range(0, len(group), settings.batch_size):
            yield group[start:start + settings.batch_size]


def disabled_adapter(model):
    """A context in which a peft model answers as its base; a no-op for a plain model."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


# ----------------------------------------------------------------------------- scoring

def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def score(answer: str, reference: str | None) -> dict[str, bool]:
    """Exact match and containment of the reference, after case and whitespace folding."""
    if reference is None:
        return {}
    return {"exact_match": normalise(answer) == normalise(reference),
            "contains": normalise(reference) in normalise(answer)}
