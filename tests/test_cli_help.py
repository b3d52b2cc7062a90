"""``--help`` of every command and action states every option's default (issue 13, item 6)."""

from __future__ import annotations

import argparse

import pytest

from curvlab.commands import _parsers, build_parser

PARSERS = {p.prog: p for p in _parsers(build_parser())}


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_option_says_its_default(prog):
    parser = PARSERS[prog]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.required:
            continue  # flags (off unless given), --help/--version, required options
        assert action.help, f"{prog} {action.option_strings[0]} has no help"
        shown = " ".join((parser._get_formatter()._get_help_string(action) % vars(action)).split())
        assert "default" in shown.lower(), f"{prog} {action.option_strings[0]}: {shown!r}"
        assert shown in text  # what the check read is what --help prints


def test_defaults_are_added_where_the_help_does_not_say_them():
    gradcov = PARSERS["curvlab gradcov"]
    text = " ".join(gradcov.format_help().split())
    assert "seed of the mc labels (default: 0)" in text
    assert "examples per batch (default: 128)" in text
    # an option that says its default itself is left alone
    assert "(default 1024) (default" not in text


def test_required_options_say_so():
    for prog, option in (("curvlab train", "--steps"), ("curvlab nqm steps", "--batch-sizes"),
                         ("curvlab nqm figure", "--out")):
        action = next(a for a in PARSERS[prog]._actions if option in a.option_strings)
        assert "required" in action.help and isinstance(action, argparse.Action)
