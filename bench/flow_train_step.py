"""The flow's train step alone, as the flow runs it: init products, then `accelerate launch` training.

Prints the TrainResult as JSON. Used by bench/throughput.py; usage: python bench/flow_train_step.py CONFIG OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(config_path: str, out_dir: str) -> None:
    from adapterflow.tasks.config import load_config
    from adapterflow.tasks.init_adapter import initialize_adapter
    from adapterflow.tasks.launch import launch_training
    from adapterflow.tasks.model_io import resolve_base
    from adapterflow.tasks.state import prepare_environment

    prepare_environment(offline=True)
    config = load_config(config_path)
    base_ref = resolve_base(config.model)
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init = initialize_adapter(config, base_ref, run_dir)
    result = launch_training(config, base_ref, Path(init.init_dir), run_dir, None)
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
