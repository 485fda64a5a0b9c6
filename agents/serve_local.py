"""`transformers serve` for a local Qwen-VL checkpoint folder, also where torchvision is missing.

    python -m agents.serve_local <folder> --host 127.0.0.1 --port 8000 --device cpu --dtype float32
    python -m algos.evaluate model=openai:<folder> endpoint=http://127.0.0.1:8000/v1

Every argument goes to `transformers serve` (the `serving` extra: `pip install -e '.[serve]'`),
which preloads `<folder>` and serves it at `/v1/chat/completions` (requests name the model by the
same folder string). Its server builds the checkpoint's processor with `AutoProcessor`, which in
transformers 5 needs torchvision for the Qwen-VL video processor; without torchvision this
launcher has it build the processor as `agents.loading.load_processor` does (images and text
unchanged, no video processor). With torchvision installed it changes nothing.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    from transformers.utils import is_torchvision_available
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise SystemExit("transformers serve needs its serving extra: pip install -e '.[serve]' "
                         "(or pip install 'transformers[serving]')")
    if not is_torchvision_available():
        from transformers.cli.serving.model_manager import ModelManager

        from agents.loading import load_processor

        def load_local_processor(self, model_id_and_revision: str, gguf_file: str | None = None):
            return load_processor(model_id_and_revision.split("@", 1)[0])  # serve names models "<id>@<revision>"

        ModelManager._load_processor = load_local_processor
    from transformers.cli.transformers import main as transformers_cli

    sys.argv = ["transformers", "serve", *(sys.argv[1:] if argv is None else argv)]
    transformers_cli()


if __name__ == "__main__":
    main()
