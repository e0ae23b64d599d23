"""The `dlmodels` console script and `python -m dlmodels`: the command line of the full install.

The CLI (`dlmodels.cli`) trains, exports and benchmarks, so it needs TensorFlow, Keras, typer
and rich, which only the full install brings (`pip install 'dlmodels[tf]'`). A serving-only
install (`pip install 'dlmodels[serving]'`) still gets this script; there it prints one line
saying what to install instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib.util
import sys

FULL_INSTALL = "pip install 'dlmodels[tf]'"
_FULL_MODULES = ("tensorflow", "keras", "typer", "rich")


def missing_full_install() -> list[str]:
    """The modules of the full install that this environment lacks (found without importing)."""
    missing = []
    for name in _FULL_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses it, a broken half-install
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int | None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:
        # The server needs no TensorFlow: `dlmodels serve` works on a serving-only install.
        from serving.__main__ import main as serve

        return serve(args[1:])
    missing = missing_full_install()
    if missing:
        command = next((a for a in args if not a.startswith("-")), None)
        what = f"dlmodels {command}" if command else "the dlmodels command line"
        print(
            f"{what} needs the full install ({', '.join(missing)} missing): {FULL_INSTALL}; "
            "to serve exported models without TensorFlow: "
            "python -m serving --model-repository DIR --check",
            file=sys.stderr,
        )
        return 1
    if args and not {"--help", "-h"} & set(args):
        # A `.keras` file holding dlmodels layers loads only once they are registered, which
        # `import dlmodels` no longer does (it stays free of Keras); every command but --help
        # imports Keras anyway. TensorFlow's start-up chatter stays quiet, as in dlmodels.cli.
        from dlmodels.cli import _quiet_tf

        _quiet_tf()
        import dlmodels.layers  # noqa: F401

    from dlmodels.cli import main as cli_main

    if argv is not None:
        sys.argv = [sys.argv[0], *args]
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
