"""Compile DeepSpeed's just-in-time CPU ops once, ahead of the first run that needs them.

On a machine without CUDA, DeepSpeed builds its shared-memory all-reduce (every launch) and its CPU
Adam (ZeRO-Offload) with ninja the first time they are used: about two minutes on 2 cores. `make
test` runs this once per environment, before the tests, so that no test's launch pays it. Safe to run again (the
build is cached under ~/.cache/torch_extensions); does nothing where the ops do not apply.

    python scripts/prebuild_deepspeed_ops.py
"""

import argparse

import torch


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if torch.cuda.is_available():
        return  # GPU machines use DeepSpeed's CUDA ops, built or loaded as needed
    from deepspeed.accelerator import get_accelerator
    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
            print(f"built DeepSpeed op {builder.absolute_name()}")


if __name__ == "__main__":
    main()
