"""Where a run's settings come from: defaults < YAML file (``--config``) < command-line flags; and how every
command reports bad input (one line) and leaves once its work is done (``exit_now``).

The flags are built from the config's fields (their types, Literal choices and help); the YAML file is read
strictly (a duplicate key, a key under the wrong section, a non-finite number are one-line errors).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import difflib
import os
import sys
import threading
from pathlib import Path

import yaml

from cifar_dist.config import (
    _OWNER,
    _SECTION_TYPES,
    Config,
    UserError,
    _base_type,
    _choices,
    _coerce,
    _flag,
    make_config,
    read_yaml_text,
)


class TrainingStopped(Exception):
    """Raised on every process when a run stops early; ``exit_code`` is what the command exits with. Defined
    here, not in the trainer, so that the command catches it around the trainer's own import, and as one class
    whether cifar_dist.train runs as __main__ or is imported."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _unknown_key(key: str, path: str, section: str | None = None) -> UserError:
    """The error for a key that is no setting of ``section`` (or none at all), saying where it belongs."""
    shown = f"{section}.{key}" if section else repr(key)
    if section and key in _OWNER:
        return UserError(f"{path}: unknown key {shown}: {key} belongs under {_OWNER[key]}")
    close = difflib.get_close_matches(str(key), list(_OWNER) + list(_SECTION_TYPES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"{path}: unknown key {shown}{hint} (see --help for the settings)")


def _flatten_yaml(data, path: str) -> dict:
    """YAML mapping (flat or by section) -> {field name: value}, rejecting unknown keys."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    flat = {}
    for key, value in data.items():
        if key in _SECTION_TYPES:
            if not isinstance(value, dict):
                raise UserError(f"{path}: section {key!r} must be a mapping")
            for sub_key, sub_value in value.items():
                if _OWNER.get(sub_key) != key:
                    raise _unknown_key(sub_key, path, section=key)
                set_once(flat, sub_key, sub_value, path)
        elif key in _OWNER:
            set_once(flat, key, value, path)
        else:
            raise _unknown_key(key, path)
    if "overwrite" in flat:
        _drop_overwrite(flat.pop("overwrite"), path)
    if flat.pop("stop_marker", None) is not None:  # older config.yaml files of SLURM jobs carry their job's
        print(f"cifar_dist: warning: {path}: ignoring 'stop_marker' (a job script passes its own on the command "
              "line)", file=sys.stderr)
    return {name: _coerce(name, value, path) for name, value in flat.items()}


def set_once(flat: dict, key: str, value, path: str) -> None:
    """``flat[key] = value`` for a setting read from a file, which may give it flat or under its section but not
    both: that is a key given twice, of which the last would silently win."""
    if key in flat:
        raise UserError(f"{path}: {key} is given twice, flat and under {_OWNER[key]}; keep one")
    flat[key] = value


def _drop_overwrite(value, path: str) -> None:
    """``overwrite`` is an action on one start, not a setting: a file that carries it would wipe the run again
    on every replay. ``false`` (written by older versions into every config.yaml) is dropped with a note."""
    if value is False:
        print(f"cifar_dist: warning: {path}: ignoring 'overwrite: false' (not a setting; pass --overwrite on the "
              f"command line to start over)", file=sys.stderr)
        return
    raise UserError(f"{path}: overwrite is not read from a config file (replaying the file would delete the run "
                    f"again); remove it and pass --overwrite on the command line")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # unhashable key: SafeLoader reports it
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise UserError(f"duplicate key {key!r} on line {line} (first on line {seen}); keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: Path, shown: str):
    """The data of a YAML file of settings (a --config file, a sweep grid), read strictly; ``shown`` names the
    file in the one-line error for a file that is not UTF-8, not YAML, or gives a key twice."""
    text = read_yaml_text(path, shown)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except UserError as exc:
        raise UserError(f"{shown}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        where = f" on line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise UserError(f"{shown}: not valid YAML ({exc.problem or exc.context}{where})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{shown}: not valid YAML ({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def one_line_errors(prog: str, exit_code: int = 2):
    """A UserError raised in the block is printed as one line (``prog: error: ...``) and exits with ``exit_code``."""
    try:
        yield
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(exit_code) from None


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch, torchvision and datasets, which writes nothing and took
    about 1.6 s of a 7 s training run on a 2-core CPU: for a command whose work is done, its files written and
    closed. What a normal exit runs first still runs: the atexit handlers (logging's, W&B's, accelerate's) and
    the flush of stdout and stderr. A thread that is not a daemon (a checkpoint still being written) would be
    joined by a normal exit, so then that is the way out."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (every cifar_dist command uses it)."""

    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _with_default(help: str, default) -> str:
    """A setting's help with its default, unless the help says what its default is (``default: $WANDB_PROJECT``)."""
    return help if "default:" in help else f"{help} (default: {default})"


def build_parser(prog: str = "cifar_dist.train") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog,
        description="Fine-tune ImageNet ResNet50 on CIFAR-100 (the seed recipe), on one CPU or many GPU nodes.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the YAML file
        allow_abbrev=False,  # --num-epoch must not quietly mean --num-epochs
    )
    parser.add_argument("--config", help="YAML file of settings (flat or by section); flags override it")
    for section, cls in _SECTION_TYPES.items():
        group = parser.add_argument_group(section)
        for f in dataclasses.fields(cls):
            typ, nullable = _base_type(cls, f.name)
            default = f.default
            if typ is bool:
                group.add_argument(f"--{_flag(f.name)}", dest=f.name, action=argparse.BooleanOptionalAction,
                                   help=_with_default(f.metadata["help"], default))
                continue
            if _choices(cls, f.name) == ("auto", "yes", "no"):  # also the forms of a boolean flag (some were)
                name = _flag(f.name)
                group.add_argument(f"--{name}", dest=f.name, nargs="?", const="yes", choices=("auto", "yes", "no"),
                                   help=f"{f.metadata['help']}; --{name} alone: yes, --no-{name}: no "
                                   f"(default: {default})")
                group.add_argument(f"--no-{name}", dest=f.name, action="store_const", const="no",
                                   help=argparse.SUPPRESS)
                continue
            group.add_argument(
                f"--{_flag(f.name)}",
                dest=f.name,
                type=_nullable(typ) if nullable else typ,
                choices=_choices(cls, f.name),
                metavar=None if _choices(cls, f.name) else typ.__name__.upper(),
                help=_with_default(f.metadata["help"], default),
            )
    return parser


def _nullable(typ):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else typ(text)

    parse.__name__ = typ.__name__
    return parse


def parse_config(argv: list[str] | None = None) -> Config:
    """Build the run's config from defaults, the ``--config`` YAML file and flags; raises UserError."""
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    values = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        path = Path(config_path)
        if path.is_dir():
            raise UserError(f"--config {config_path} is a folder; give the YAML file of settings")
        if not path.is_file():
            raise UserError(f"--config {config_path}: no such file")
        shown = f"--config {config_path}"
        values.update(_flatten_yaml(load_yaml_file(path, shown), shown))
    values.update(args)
    return make_config(**values)
