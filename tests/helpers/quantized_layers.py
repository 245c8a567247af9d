"""scripts/train.py, plus a record of how the base model was quantized and sharded (for the tests).

Writes OUTPUT_DIR/layers.rank{R}.json: the class of each adapted layer's base, and for each 4-bit
weight its local element count and its full ZeRO-3 shape (``ds_shape``), if partitioned.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from phi3_lora.cli import config_from_args, config_parser, run_main  # noqa: E402
from phi3_lora.loop import Trainer  # noqa: E402


def main(argv=None):
    cfg = config_from_args(config_parser(__doc__, epilog_keys=False).parse_args(argv))
    trainer = Trainer(cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    layers = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is not None and name.endswith("_proj"):
            weight = base.weight
            layers[name] = {"class": type(base).__name__, "local_numel": weight.numel(),
                            "ds_shape": list(weight.ds_shape) if hasattr(weight, "ds_shape") else None}
    rank = trainer.accelerator.process_index
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.output_dir, f"layers.rank{rank}.json").write_text(json.dumps(layers))
    trainer.train()


if __name__ == "__main__":
    run_main(main)
