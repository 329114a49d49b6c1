"""What the command-line tests share: the argparse parsers the scripts build."""

from __future__ import annotations

import argparse
import importlib

import pytest


def parsers_of(script: str) -> list[argparse.ArgumentParser]:
    """The parser `script`.parse_args builds, and its subcommands' parsers."""
    module = importlib.import_module(script)

    class Built(Exception):
        pass

    def capture(self, args=None, namespace=None):
        raise Built(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(Built) as built:
            module.parse_args([])
    parser = built.value.args[0]
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser] + [p for action in subcommands for p in action.choices.values()]
