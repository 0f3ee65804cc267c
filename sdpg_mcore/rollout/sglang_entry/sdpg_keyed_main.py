"""Run SGLang or sglang-router with the run's API key read from its file, never from the command line.

    python sdpg_keyed_main.py --api-key-file FILE -m sglang.launch_server ARGS...
    python sdpg_keyed_main.py --api-key-file FILE -m sglang_router.launch_router ARGS...

Both programs take their key only as an option (``--api-key KEY``), and ``/proc/PID/cmdline`` is
readable by every user of the host. This script becomes their ``__main__`` instead: it reads the
key from FILE (``rollout/auth.py``: mode 0600, else it refuses), appends ``--api-key KEY`` to the
program's own ``sys.argv`` (inside this process: ``/proc`` keeps showing the arguments above), and
writes ``<redacted>`` for the key in everything the process logs or prints (SGLang logs all its
options at start-up, the key among them). The processes the program spawns (SGLang's scheduler and
detokenizer) die with it (``parallel/lifetime.py``), as it dies with the trainer.

Standard library only, run by its path, with ``auth.py`` and ``lifetime.py`` (standard library
only too) loaded by theirs: it works in any interpreter that has SGLang, with or without sdpg_mcore
installed, and its directory (``sys.path[0]``) holds nothing that could shadow a module.
"""

import argparse
import importlib.util
import logging
import runpy
import sys
from pathlib import Path

REDACTED = "<redacted>"
PACKAGE = Path(__file__).resolve().parents[2]


def _load(relative_path: str):
    """A standard-library-only module of sdpg_mcore, loaded by its path (no package import)."""
    path = PACKAGE / relative_path
    spec = importlib.util.spec_from_file_location(f"sdpg_keyed_main_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RedactingStream:
    """``sys.stdout``/``sys.stderr`` with the key replaced in what is written; the rest passes through."""

    def __init__(self, stream, key: str):
        self._stream, self._key = stream, key

    def write(self, text):
        return self._stream.write(text.replace(self._key, REDACTED) if isinstance(text, str) else text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _redact_log_records(key: str) -> None:
    """Every log record made in this process carries its message with the key redacted, whatever
    handler (file, stream, a framework's own) later writes it."""
    make_record = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's to report, as it would be without us
            return record
        if key in message:
            record.msg, record.args = message.replace(key, REDACTED), None
        return record

    logging.setLogRecordFactory(factory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--api-key-file", required=True, help="the run's key file (mode 0600)")
    parser.add_argument("--key-option", default="--api-key", help="the program's option for the key")
    parser.add_argument("-m", dest="module", required=True, help="the module to run as __main__")
    args, program_args = parser.parse_known_args()
    try:
        key = _load("rollout/auth.py").read_key_file(args.api_key_file)
    except ValueError as err:
        parser.exit(2, f"sdpg_keyed_main: {err}\n")
    _load("parallel/lifetime.py").kill_children_with_parent()
    sys.stdout, sys.stderr = _RedactingStream(sys.stdout, key), _RedactingStream(sys.stderr, key)
    _redact_log_records(key)
    sys.argv = [args.module, *program_args, args.key_option, key]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
