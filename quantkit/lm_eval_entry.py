"""`quantkit-lm-eval`: lm-eval's own command line with quantkit's model class registered.

lm-eval's CLI resolves `--model NAME` only among registered classes and never imports a module
by path, so this entry point imports quantkit.evaluate (which registers "quantkit") and hands
over to lm-eval unchanged:

    quantkit-lm-eval run --model quantkit --model_args pretrained=out/smollm2-awq,dtype=bfloat16 \
        --tasks qk_piqa --include_path eval/tasks --limit 100
"""

from __future__ import annotations

import os


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see kernels/threads.py)
    import quantkit.evaluate  # noqa: F401  registers the "quantkit" model with lm-eval
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
