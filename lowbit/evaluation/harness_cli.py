"""``lowbit-lm-eval ARGS``: lm-evaluation-harness's own command line, with the "lowbit" model registered."""

import sys

from lowbit.errors import LowbitError
from lowbit.evaluation import harness


def main() -> None:
    try:
        harness.require()
    except LowbitError as error:
        sys.exit(f"lowbit-lm-eval: {error}")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
