"""Show what the model will be trained on: rendered examples with the supervised spans marked.

    python scripts/inspect_data.py [--config PATH] [KEY=VALUE ...] --num_examples 3
    python scripts/inspect_data.py --config configs/phi3-mini-4k-lora.yaml --num_examples 100 --jsonl out.jsonl

Supervised text is shown between [[ and ]]. With --jsonl, one {"input_ids": [...], "labels": [...]}
object per example is written (labels are -100 where a token is not supervised).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3_lora import data as data_lib  # noqa: E402
from phi3_lora.checkpoint import check_can_create  # noqa: E402
from phi3_lora.cli import config_from_args, config_parser, positive, run_main  # noqa: E402
from phi3_lora.model import load_tokenizer  # noqa: E402


def marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The decoded example with each supervised run wrapped in [[ ]]."""
    pieces, run, supervised = [], [], False
    for token, label in zip(input_ids + [None], labels + [None]):
        now = label is not None and label != data_lib.IGNORE_INDEX
        if token is None or now != supervised:
            text = tokenizer.decode(run)
            pieces.append(f"[[{text}]]" if supervised else text)
            run, supervised = [], now
        if token is not None:
            run.append(token)
    return "".join(pieces)


def main(argv=None):
    parser = config_parser(__doc__)
    parser.add_argument("--num_examples", type=positive(), default=3, help="how many training examples to show")
    parser.add_argument("--jsonl", help="also write input_ids/labels of these examples to this file")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.jsonl:
        check_can_create(args.jsonl, "--jsonl", directory=False)
    tokenizer = load_tokenizer(cfg.model)
    data_lib.use_chat_template(tokenizer, cfg.data.chat_template)
    train, _ = data_lib.build_datasets(cfg.data, tokenizer, cfg.training.seed)
    rows = train.dataset.select(range(min(args.num_examples, len(train))))
    for row in rows:
        n_sup = sum(label != data_lib.IGNORE_INDEX for label in row["labels"])
        print(f"--- example {row['example_id']}: {len(row['input_ids'])} tokens, {n_sup} supervised")
        print(marked_text(tokenizer, row["input_ids"], row["labels"]))
    print(f"--- {len(train)} training examples ({train.truncated} truncated, {train.dropped} dropped)")
    if args.jsonl:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)  # check_can_create allowed new folders
        with open(args.jsonl, "w") as f:
            for row in rows:
                f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
        print(f"wrote {len(rows)} examples to {args.jsonl}")


if __name__ == "__main__":
    run_main(main)
