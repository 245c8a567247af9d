"""scripts/train.py, plus a record of which examples each process trained on (for the tests).

Writes OUTPUT_DIR/seen.rank{R}.json: for every optimizer step, the example ids of this process, and
OUTPUT_DIR/dtypes.rank{R}.json: the dtypes of the trainable parameters once prepared and of DeepSpeed's ZeRO
optimizer (its ``dtype``, which decides fp16's loss scaling), if any.
With SLOW_DATA_ON_LAST_RANK=SECONDS, the last process takes that much longer to collate each batch.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from phi3_lora.cli import config_from_args, config_parser, run_main  # noqa: E402
from phi3_lora.loop import Trainer  # noqa: E402


def main(argv=None):
    cfg = config_from_args(config_parser(__doc__, epilog_keys=False).parse_args(argv))
    trainer = Trainer(cfg)
    seen = []
    step = trainer.train_step

    def recording_step(batches):
        seen.append([int(i) for b in batches for i in b["example_ids"]])
        return step(batches)

    trainer.train_step = recording_step
    delay = float(os.environ.get("SLOW_DATA_ON_LAST_RANK", 0))
    if delay and trainer.accelerator.process_index == trainer.accelerator.num_processes - 1:
        collate = trainer.collate

        def slow_collate(items):
            time.sleep(delay)
            return collate(items)

        trainer.collate = slow_collate
    rank = trainer.accelerator.process_index
    dtypes = {"trainable": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
              "zero_optimizer": str(getattr(trainer.optimizer.optimizer, "dtype", None))}
    trainer.train()
    Path(cfg.output_dir, f"seen.rank{rank}.json").write_text(json.dumps(seen))
    Path(cfg.output_dir, f"dtypes.rank{rank}.json").write_text(json.dumps(dtypes))


if __name__ == "__main__":
    run_main(main)
