"""Chat with a fine-tuned Phi-3 in the terminal: streamed answers, history, /reset, /exit.

    python scripts/chat.py --model microsoft/Phi-3-mini-4k-instruct --adapter outputs/run/adapter
    python scripts/chat.py --adapter outputs/demo/adapter --system "Answer briefly."   # tiny demo run
    python scripts/chat.py --model microsoft/Phi-3-mini-4k-instruct --adapter outputs/qlora/adapter --load_in_4bit
    python scripts/chat.py --model merged/phi3-mini-tuned                               # a merged model, no adapter

Type a message and press Enter. /reset forgets the conversation (the system prompt stays),
/exit (or end of input, Ctrl-D, or Ctrl-C at the prompt) quits; Ctrl-C while an answer streams
stops it. Answers stream token by token and stop on <|end|>,
<|endoftext|> or <|assistant|> (ids from the tokenizer). Greedy unless --do_sample. A conversation
longer than the model's context (less --max_new_tokens) leaves out its oldest exchanges, and says so.
The base of a run of the tiny demo model is rebuilt from the run's config saved with the adapter (or
--config).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from phi3_lora.cli import config_parser, run_main  # noqa: E402
from phi3_lora.data import control_token_finder  # noqa: E402
from phi3_lora.formats import DataError  # noqa: E402
from phi3_lora.generate import (GenerationSettings, context_length, encode_prompts, generate_answers,  # noqa: E402
                               trim_history)
from phi3_lora.inference import (load_for_inference, load_tokenizer_for, quantization_override,  # noqa: E402
                                 run_config)


def parse_args(argv):
    parser = config_parser(__doc__, epilog_keys=False)
    parser.add_argument("--model", help="base model (hub id or directory); default: the run's model.name_or_path")
    parser.add_argument("--adapter", help="PEFT adapter directory (OUTPUT_DIR/adapter); default: none")
    parser.add_argument("--system", help="system prompt (needs a template with a system role: data.chat_template=phi3)")
    parser.add_argument("--load_in_4bit", action="store_true", help="load the base in 4 bits (QLoRA adapters)")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    from transformers import TextStreamer

    args = parse_args(argv)
    cfg = run_config(args.config, [*args.overrides, *quantization_override(args.load_in_4bit)],
                     adapter=args.adapter, model=args.model)
    settings = GenerationSettings(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, 1, args.seed)
    tokenizer = load_tokenizer_for(cfg)
    start = [{"role": "system", "content": args.system}] if args.system else []
    find_control_token = control_token_finder(tokenizer)
    if args.system and (token := find_control_token(args.system)):
        raise DataError(f"--system contains '{token}', which the tokenizer reads as a control token, not as text")
    encode_prompts(tokenizer, [start + [{"role": "user", "content": "hi"}]])  # a template without a system role
    model = load_for_inference(cfg, tokenizer, args.adapter)
    if torch.cuda.is_available() and not args.load_in_4bit:
        model.to("cuda")
    limit = context_length(model) - args.max_new_tokens  # what the prompt may hold
    if limit < 1:
        raise DataError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context_length(model)} tokens")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    # bytes that are not UTF-8 come in as lone surrogates (what Python does under the C locales) and the line is
    # refused below; under other UTF-8 locales input() would raise and end the chat
    sys.stdin.reconfigure(errors="surrogateescape")
    history = list(start)
    torch.manual_seed(args.seed)
    print(f"chatting with {cfg.model.name_or_path}" + (f" + {args.adapter}" if args.adapter else "")
          + " — /reset forgets, /exit quits", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the end of the chat
            print()
            break
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("(conversation reset)", flush=True)
            continue
        if not text:
            continue
        if not text.isascii() and not is_utf8(text):
            print("(not sent: the line holds bytes that are not UTF-8 text)", flush=True)
            continue
        if token := find_control_token(text):
            print(f"(not sent: '{token}' would reach the model as a control token, not as text)",
                  flush=True)
            continue
        try:
            history, dropped = trim_history(tokenizer, history + [{"role": "user", "content": text}], limit)
        except DataError as err:
            print(f"(not sent: {err}; shorten it or lower --max_new_tokens)", flush=True)
            continue
        if dropped:
            print(f"(the oldest {dropped} exchange{'s' if dropped > 1 else ''} left out: the conversation is over "
                  f"the {limit} tokens the model's context of {context_length(model)} leaves beside the answer)",
                  flush=True)
        try:
            print("assistant> ", end="", flush=True)
            answer = generate_answers(model, tokenizer, [history], settings, streamer=streamer)[0]
        except KeyboardInterrupt:  # Ctrl-C while it answers: that answer stops, the chat goes on
            history.pop()  # the unanswered message too: a conversation alternates user and assistant turns
            print("\n(stopped: this exchange is left out of the conversation)", flush=True)
            continue
        if not answer.stopped:
            print(f"[cut at --max_new_tokens {args.max_new_tokens}]", flush=True)
        history.append({"role": "assistant", "content": answer.text})
    print("bye", flush=True)


def is_utf8(text: str) -> bool:
    """False for a line read with bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":
    run_main(main)
