"""A CIFAR-100 copy from the Hugging Face Hub, or one clear line when the hub cannot be reached."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys

import datasets

from cifar_dist.config import UserError


def from_hub(dataset_id: str, sources_help: str) -> datasets.DatasetDict:
    """``load_dataset`` for a hub id; an unreachable hub is one line, fast: the cached copy if there is one
    (announced), else a UserError."""
    # load_dataset would retry a refused connection five times (23 s and 11 log lines) and a silent network for
    # minutes, before looking in its cache. One request without retries tells the same; then offline mode goes
    # straight to the cache.
    problem = None if datasets.config.HF_HUB_OFFLINE else _hub_network_problem(dataset_id)
    try:
        with _quiet_logger("huggingface_hub.utils._http"), (_hub_offline() if problem else contextlib.nullcontext()):
            loaded = datasets.load_dataset(dataset_id)
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(
            f"--data-source {dataset_id}: no such local path nor dataset on the Hugging Face Hub; expected "
            f"{sources_help}"
        ) from None
    except Exception as exc:
        if not _is_network_error(exc):
            raise
        if not problem:
            problem = ("offline mode is on: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE" if datasets.config.HF_HUB_OFFLINE
                       else first_line(_network_cause(exc)))
        raise _hub_unreachable(dataset_id, problem) from None
    if problem:
        print(f"cifar_dist: warning: the Hugging Face Hub ({datasets.config.HF_ENDPOINT}) cannot be reached "
              f"({problem}); using the cached copy of {dataset_id}", file=sys.stderr)
    return loaded


@contextlib.contextmanager
def _hub_offline():
    """datasets and huggingface_hub in offline mode while the block runs: cache only, no network, no retries.
    Both read HF_HUB_OFFLINE once at import, so their module constants are the switch."""
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        with _quiet_logger("datasets.load"):  # its "couldn't be found ... offline mode" line; ours says why
            yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub_unreachable(dataset_id: str, reason: str) -> UserError:
    return UserError(
        f"--data-source {dataset_id}: not a local path, and the Hugging Face Hub ({datasets.config.HF_ENDPOINT}) "
        f"cannot be reached to download it ({reason}); pass a local copy with --data-source PATH (a parquet folder "
        f"laid out like the hub repo, a save_to_disk folder, or cifar-100-python.tar.gz), e.g. made on a machine "
        f"with internet by: python -c \"import datasets; datasets.load_dataset('{dataset_id}').save_to_disk('DIR')\""
    )


def _hub_network_problem(dataset_id: str) -> str | None:
    """Why the hub gives no answer for the dataset's card, from one request without retries; None if it answers
    at all (a 404 or a gated repo is load_dataset's to report, in its own words)."""
    import huggingface_hub

    endpoint = datasets.config.HF_ENDPOINT
    url = huggingface_hub.hf_hub_url(dataset_id, "README.md", repo_type="dataset", endpoint=endpoint)
    try:
        huggingface_hub.get_hf_file_metadata(url, endpoint=endpoint)
    except Exception as exc:  # noqa: BLE001 (any answer, even an error status, is load_dataset's to report)
        return first_line(_network_cause(exc)) if _is_network_error(exc) else None
    return None


def _network_error_types() -> tuple[type[BaseException], ...]:
    """"No answer from the server" in every HTTP client the hub libraries may use: httpx2 or httpx
    (huggingface_hub, datasets), requests (older versions); builtin ConnectionError covers OfflineModeIsEnabled."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, name) for name in names if hasattr(mod, name)]
    return tuple(found)


def _network_cause(exc: BaseException) -> BaseException:
    """The first network error in ``exc``'s chain (libraries re-raise it as their own types), else ``exc``."""
    types = _network_error_types()
    seen: BaseException | None = exc
    for _ in range(20):  # chains are short; the bound guards against a cycle
        if seen is None:
            break
        if isinstance(seen, types):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _is_network_error(exc: BaseException) -> bool:
    return isinstance(_network_cause(exc), _network_error_types())


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Only errors from logger ``name`` while the block runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
