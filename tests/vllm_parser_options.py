"""Prints, as JSON, every option of the installed vLLM's OpenAI server parser: run with vLLM's Python.

The allowlist names flags; argparse accepts unambiguous prefixes, so a name the installed release
does not know could be read as a longer option. tests/test_vllm.py compares the two.
"""

import json

from vllm.utils.argparse_utils import FlexibleArgumentParser

try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # releases before the launchers package
    from vllm.entrypoints.openai.cli_args import make_arg_parser

parser = make_arg_parser(FlexibleArgumentParser())
options = {
    name: sorted(str(c) for c in action.choices) if action.choices else None
    for action in parser._actions
    for name in action.option_strings
}
print(json.dumps({"allow_abbrev": parser.allow_abbrev, "options": options}))
