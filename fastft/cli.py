"""The ``fastft`` command line. Subcommands are imported only when invoked, so
``fastft --help`` does not pay for importing torch and transformers."""
from __future__ import annotations

import importlib
import sys

import click

# name -> (module, attribute). Each subcommand lives next to the code it drives.
COMMANDS = {
    "env": ("fastft.cli", "env"),
    "train": ("fastft.train.cli", "train"),
    "bench": ("fastft.bench.cli", "bench"),
    "generate": ("fastft.models.generate", "generate"),
    "eval": ("fastft.train.eval_cli", "eval_cmd"),
    "plot": ("fastft.train.plot", "plot_cmd"),
    "search": ("fastft.search.cli", "search"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        if module == __name__:
            return globals()[attr]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="fastft")
def cli():
    """fastft: fast fine-tuning for Hugging Face language models."""


@click.command()
def env():
    """Print versions, CPU features, built backends and the backend each op uses."""
    from fastft._backend import describe

    info = describe()
    for key, value in info.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit code 2, no traceback.

    Run as the ``fastft`` command (argv None), it first re-executes itself once with malloc on
    transparent huge pages (fastft/runtime.py; ``FASTFT_HUGEPAGES=0`` turns that off)."""
    from fastft.errors import TrainingDiverged, UserError

    if argv is None:
        from fastft.runtime import reexec_with_hugepages

        reexec_with_hugepages(sys.argv[1:])

    try:
        cli.main(args=argv, prog_name="fastft", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if e.exit_code in (1, 2) else e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except TrainingDiverged as e:  # not the user's input: its own exit code for scripts
        click.echo(f"error: {e}", err=True)
        sys.exit(3)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
