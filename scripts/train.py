"""Fine-tune Phi-3 with LoRA: parse the config, build, train, save.

Single process (CPU or one GPU):
    python scripts/train.py --config configs/phi3-mini-4k-lora.yaml
One GPU or many with DDP (the launch topology lives in accelerate_configs/):
    accelerate launch --config_file accelerate_configs/multi_gpu_ddp.yaml scripts/train.py --config configs/phi3-mini-4k-lora.yaml
QLoRA (4-bit base, bitsandbytes) on one 8-12 GB GPU:
    python scripts/train.py --config configs/phi3-mini-4k-qlora-consumer.yaml
DeepSpeed ZeRO-3:
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml scripts/train.py --config configs/phi3-medium-4k-lora.yaml
Without --config the embedded demo runs: a tiny random Phi-3 learning generated chat tasks on the CPU.
Overrides are dotted KEY=VALUE pairs: training.max_steps=20 lora.r=8 output_dir=/tmp/run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3_lora.preemption import DEFAULT_SIGNALS, PreemptionFlag  # noqa: E402  (the standard library only)

# Run as a script, the signals are caught from here on: the imports below take seconds, and a signal during them,
# or while the model loads, ends the run as preempted (exit 75), not killed. main() narrows it to
# training.preemption_signals. Imported, the module leaves the process's signals alone.
early_preemption = PreemptionFlag(DEFAULT_SIGNALS) if __name__ == "__main__" else None

from phi3_lora.cli import config_from_args, config_parser, run_main  # noqa: E402


def main(argv=None):
    args = config_parser(__doc__).parse_args(argv)
    cfg = config_from_args(args)
    from phi3_lora.quant import bitsandbytes_unused
    if bitsandbytes_unused(cfg):  # peft would import it anyway, and its import compiles kernels (~1 s on a CPU)
        sys.modules.setdefault("bitsandbytes", None)  # an import of it now raises ImportError, as if absent
    from phi3_lora.loop import Trainer  # after the config is checked: --help answers in a second
    preemption = early_preemption or PreemptionFlag([])
    with preemption.narrow_to(cfg.training.preemption_signals):
        Trainer(cfg, preemption).train()


if __name__ == "__main__":
    run_main(main)
