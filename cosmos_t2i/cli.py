"""What every script's command line shares: the --help layout, the seed's range, and the entry point.

Every script's `__main__` is `cli.main_entry(parse_args, main)` (or `user_errors.run(main)` where `main` parses),
so a user's mistake ends it with one `error: ...` line and exit code 2 (cosmos_t2i/user_errors.py), and `--help`
shows each option's default beside its description.
"""

from __future__ import annotations

import argparse
import copy

from . import user_errors

# Every seed the samplers take: torch.Generator.manual_seed accepts up to 2**64 - 1 (negatives wrap), but
# `--sampler nvidia` draws its noise from numpy's RandomState, which takes 0 .. 2**32 - 1 only. One range for both,
# so a seed that works with one sampler works with the other.
SEED_MAX = 2**32 - 1


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description (the script's docstring) as written, and every option's default in --help.

    argparse's ArgumentDefaultsHelpFormatter skips options without a help text and prints "(default: None)" and
    "(default: False)" for unset values and switches; here an option shows its default whenever it has one that is
    not None, and switches (store_true) do not: their default is "off", which their name already says.
    """

    def _get_help_string(self, action):
        help_text = "" if action.help is None or isinstance(action.help, _NoHelp) else action.help
        if "%(default)" in help_text or not _has_default_to_show(action):
            return help_text
        return f"{help_text} (default: {_default_text(action.default)})".strip()

    def _format_action(self, action):
        if not action.help and _has_default_to_show(action):
            # argparse formats no help line at all for an option without help text, default included.
            action = copy.copy(action)
            action.help = _NoHelp("-")
        return super()._format_action(action)


class _NoHelp(str):
    """The help of an option that has none, non-empty so that argparse formats its line (and default)."""


def _default_text(default) -> str:
    """What --help prints for a default (a %-format: the help text is expanded with the action's fields)."""
    if default == "":
        return "''"
    if isinstance(default, (list, tuple)):  # nargs="+" options: the values as they are typed
        return " ".join(str(v) for v in default).replace("%", "%%") or "none"
    return "%(default)s"


def _has_default_to_show(action: argparse.Action) -> bool:
    return (bool(action.option_strings) and action.default is not None and action.default is not argparse.SUPPRESS
            and action.nargs != 0)  # nargs 0: a switch (store_true / store_const / help)


def parser(description: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared --help layout and --debug (tracebacks of user errors)."""
    result = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    user_errors.add_debug_flag(result)
    return result


def seed(text: str) -> int:
    """argparse type of a --seed: an integer in 0 .. SEED_MAX."""
    try:
        return check_seed(int(text), "--seed")
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed: expected an integer from 0 to {SEED_MAX}.") from None


def check_seed(value, where: str) -> int:
    """`value` as a seed, or a BadValue naming `where` (a flag, or a prompt list's item). A prompt list's "7" is 7."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise user_errors.BadValue(f"{where}: seed {value!r} is not an integer from 0 to {SEED_MAX}.")
    return value


def main_entry(parse_args, main) -> None:
    """`main(parse_args())` with a user's mistake as one `error:` line and exit code 2 (tracebacks with --debug)."""
    user_errors.run(lambda: main(parse_args()))
