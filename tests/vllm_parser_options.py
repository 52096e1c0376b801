"""Prints, as JSON, every option of the installed vLLM's OpenAI server parser: run with vLLM's Python.

The allowlist names flags; argparse accepts unambiguous prefixes, so a name the installed release
does not know could be read as a longer option. tests/test_vllm.py and tests/test_vllm_flags.py compare
the two. Written apart from backends/vllm/dump_options.py on purpose: the tests check the backend's
reading of the parser against this one.
"""

import json

from vllm.utils.argparse_utils import FlexibleArgumentParser

try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:  # releases before the launchers package
    from vllm.entrypoints.openai.cli_args import make_arg_parser

parser = make_arg_parser(FlexibleArgumentParser())
options = {
    name: {"choices": sorted(str(c) for c in action.choices if c is not None) if action.choices else None,
           "takes_value": action.nargs != 0}
    for action in parser._actions
    for name in action.option_strings
}
print(json.dumps({"allow_abbrev": parser.allow_abbrev, "options": options}))
