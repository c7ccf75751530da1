"""The `broker-shim` command.

    broker-shim [RUN OPTIONS] -- CMD ARGS...   same as `broker run [RUN OPTIONS] -- CMD ARGS...`
    broker-shim COMMAND ...                    same as `broker COMMAND ...` (add, list, serve, ...)

The bundled broker replaces this process (exec), so signals, the terminal and the exit code
are the broker's, which are the agent's.
"""

import os
import sys

import broker_shim

USAGE = """\
usage: broker-shim [--allow P,..] [--profile NAME] [RUN OPTIONS] -- CMD [ARGS...]
       broker-shim COMMAND [ARGS...]

Runs CMD with its API keys replaced by placeholders; the broker, embedded for the run,
puts the real keys on requests to each key's own hosts ('broker run'). Any other COMMAND
goes to the bundled broker: 'broker-shim add openai', 'broker-shim list', 'broker-shim serve',
'broker-shim help run' for every run option.
"""


def broker_argv(args):
    """The broker's arguments for `broker-shim args`, or None for our own usage text."""
    if not args or args[0] in ("-h", "--help"):
        return None
    if args[0].startswith("-") and args[0] not in ("-V", "--version"):
        return ["run"] + args  # run options, then `--` (broker run says if it is missing)
    return args


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    forwarded = broker_argv(args)
    if forwarded is None:
        sys.stdout.write(USAGE)
        return 0 if args else 2
    try:
        broker = broker_shim.broker_path()
        environ = broker_shim._broker_env()
    except broker_shim.BrokerShimError as err:
        sys.stderr.write(f"broker-shim: {err}\n")
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(broker, [broker] + forwarded, environ)
    except OSError as err:
        sys.stderr.write(f"broker-shim: cannot run {broker}: {err}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
