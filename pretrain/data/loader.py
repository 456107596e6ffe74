"""The training data loader: Energon over data_prep shards (or a blend) -> packed ``NeoBatch``es.

    loader = NeoDataLoader(LoaderConfig(path=..., seq_len=..., micro_batch_size=...),
                           dp_rank=dp_rank, dp_size=dp_size)
    batch = next(loader)          # NeoBatch of micro_batch_size rows of exactly seq_len tokens
    loader.totals                 # cumulative LoaderStats (samples, fill, skipped, errors)
    loader.stats()                # the same as a flat dict for metrics (pack_fill, skipped_samples, ...)
    loader.summary()              # one line on the samples skipped so far (None if none), for the end of a run
    loader.interval_stats()       # LoaderStats since the previous call (per log interval)
    loader.last                   # BatchInfo of the batch just returned (keys, fill per row)
    state = loader.state_dict()   # plain JSON-able; every DP rank saves its own
    loader.load_state_dict(state) # in a fresh loader, before the first batch

``path`` is a data_prep output directory (it has ``.nv-meta/``) or an Energon metadataset YAML
(``MetadatasetV2``), e.g. a weighted blend of caption, conversation and text sets::

    __module__: megatron.energon
    __class__: MetadatasetV2
    splits:
      train:
        blend:
          - {weight: 3, path: captions}
          - {weight: 5, path: conversations}
          - {weight: 2, path: text}

Untrusted data runs no code: Energon's metadata can name classes to import and Python files to
run (``sample_loader`` / ``part_filter`` in ``.nv-meta/dataset.yaml``, ``__module__``/``__class__``
anywhere), and tar files outside the directory. Before Energon reads anything, the loader accepts
only a directory whose ``.nv-meta/`` is exactly what data_prep writes
(``data_prep.energon_prepare.check_energon_metadata``, also run by ``python -m data_prep verify``)
or a blend YAML of the form above (``MetadatasetV2`` from ``megatron.energon``; ``splits`` ->
``{path}`` or ``{blend: [{path, weight, subflavors, split_part}]}``; plain-scalar subflavors;
local paths to such directories or such blends). Anything else is a one-line ``ConfigError``
naming the file and key, unless ``trust_dataset_code`` (``data.trust_dataset_code=true``).

Data parallelism: Energon splits the data over ``dp_size`` ranks by ``dp_rank``; every rank of
one model-parallel group (same ``dp_rank``) builds the same loader and so gets the same
micro-batches. Given ``seed``, the sequence of batches is deterministic.

The state is tied to (dp_size, dp_rank, num_workers, micro_batch_size, seq_len, format and
Energon versions): ``load_state_dict`` refuses any other with a message naming the difference.
Energon itself would accept a state saved at DP size 2 on DP size 1 and silently serve samples
again (notes/PLATFORM.md); moving a state to another layout is ``energon checkpoint redist``'s
job, not a silent resume.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset

from data_prep.energon_prepare import ENERGON_MODULE, MetadataError, check_energon_metadata, load_yaml_data
from pretrain.config import ConfigError
from pretrain.data import workers
from pretrain.data.state import from_plain, to_plain
from pretrain.data.task_encoder import MicroBatch, NeoTaskEncoder, SampleErrorLog, single_thread
from pretrain.data.template import load_tokenizer
from pretrain.model.batch import NeoBatch

log = logging.getLogger(__name__)

STATE_VERSION = 1


class LoaderStateError(ConfigError):
    """A saved loader state that does not belong to this loader's layout (a ``ConfigError``: the
    trainer ends on one line naming the difference)."""


@dataclass(frozen=True)
class LoaderConfig:
    path: str  # data_prep shard dir (with .nv-meta) or an Energon metadataset YAML (blend)
    seq_len: int
    micro_batch_size: int
    tokenizer: str | None = None  # HF tokenizer dir; default <path>/tokenizer for a shard dir
    num_workers: int = 1  # loader processes per rank (0: in the trainer process)
    seed: int = 1234
    packing_buffer_size: int = (
        512  # samples per first-fit round; pack fill grows with buffer tokens / seq_len
    )
    shuffle_buffer_size: int = 256  # raw samples; 0 disables the sample shuffle buffer
    max_samples_per_sequence: int | None = 64  # samples read in a row from one shard slice
    repeat: bool = True  # False: stop after one pass (tests, evaluation)
    prefetch_factor: int = 2
    # True: hand Energon metadata that data_prep does not write (class/module references, Python
    # files to run, shards elsewhere) to Energon as is. Only for data whose code you trust.
    trust_dataset_code: bool = False


@dataclass
class BatchInfo:
    keys: list[tuple[str, ...]]  # per row, the __key__ of each document
    real_tokens: list[int]  # per row
    seq_len: int

    @property
    def fill(self) -> list[float]:
        return [t / self.seq_len for t in self.real_tokens]


@dataclass
class LoaderStats:
    """Counters over everything this loader has returned (restored with its state)."""

    batches: int = 0
    rows: int = 0
    samples: int = 0  # documents packed into returned rows
    real_tokens: int = 0  # non-padding tokens in returned rows
    row_tokens: int = 0  # rows * seq_len
    skipped_too_long: int = 0  # too-long records, each time one came round (repeats included)
    sample_errors: int = 0  # failed samples, each time one came round
    too_long_samples: int = 0  # distinct samples longer than seq_len (never truncated)
    error_samples: int = 0  # distinct samples that failed

    @property
    def fill(self) -> float:
        """Mean pack fill: real tokens / (rows * seq_len)."""
        return self.real_tokens / self.row_tokens if self.row_tokens else 0.0

    def minus(self, other: LoaderStats) -> LoaderStats:
        return LoaderStats(**{k: v - getattr(other, k) for k, v in asdict(self).items()})


class NothingFitsError(ConfigError):
    """No sample of the data fits seq_len: every row would be padding (a loss of 0/0)."""


_MAX_LISTED_KEYS = 3


def too_long_summary(too_long: dict[str, tuple[int, int | None]], seq_len: int) -> str:
    """One line on the distinct samples longer than ``seq_len``: how many, how long, and what would
    make them fit (a longer seq_len, or the pixel budget per image to rebuild the data with)."""
    n = len(too_long)
    lengths = [length for length, _ in too_long.values()]
    keys = sorted(identity.rpartition(":")[2] for identity in too_long)[:_MAX_LISTED_KEYS]
    line = (f"{n} sample{'s' if n != 1 else ''} cannot fit seq_len {seq_len} (train.seq_len) and "
            f"{'are' if n != 1 else 'is'} skipped, never truncated ({min(lengths)} to {max(lengths)} tokens; "
            f"e.g. {', '.join(keys)})")
    budgets = [fit for _, fit in too_long.values() if fit]
    text_bound = sum(1 for _, fit in too_long.values() if not fit)
    fixes = [f"train.seq_len={max(lengths)} fits them all"]
    if budgets:
        fixes.append(f"rebuilding the data with data_prep --max-pixels {min(budgets)} fits the {len(budgets)} "
                     "with images at this seq_len")
        if text_bound:
            fixes.append(f"{text_bound} do not fit at any pixel budget")
    return f"{line}: {'; '.join(fixes)}"


def resolve_tokenizer_path(config: LoaderConfig) -> Path:
    if config.tokenizer:
        return Path(config.tokenizer)
    default = Path(config.path) / "tokenizer"
    if default.is_dir():
        return default
    raise ValueError(
        f"no tokenizer given and {default} does not exist: set the tokenizer directory explicitly"
    )


def check_data_path(path: str | Path) -> None:
    """ConfigError (one line) unless ``path`` is a finished data_prep build (or an Energon data set
    directory) or a blend YAML. A build is finished when its ``manifest.json`` is there (data_prep
    writes it last); Energon's ``.nv-meta/`` comes just before it, unless ``--no-energon``."""
    p = Path(path)
    if p.is_dir():
        if (p / ".nv-meta" / "dataset.yaml").is_file():
            return
        if not any(p.iterdir()):
            raise ConfigError(f"data.path {p} is an empty directory: build the data there with `python -m data_prep`")
        if not (p / "manifest.json").is_file():
            raise ConfigError(
                f"incomplete data_prep build at {p} (no manifest.json: the build was killed or is still running): "
                "rerun it"
            )
        raise ConfigError(
            f"{p} has no .nv-meta/dataset.yaml: it was built with --no-energon; run data_prep without --no-energon"
        )
    if p.is_file():
        if p.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"data.path {p} is a file but not an Energon metadataset (blend) YAML")
        return
    raise ConfigError(f"data.path {p} does not exist")


_check_data_path = check_data_path


BLEND_HEADER = {"__module__": ENERGON_MODULE, "__class__": "MetadatasetV2"}
_BLEND_ITEM_KEYS = ("path", "weight", "subflavors", "split_part")  # an entry of splits.<part>.blend
_REFERENCE_KEYS = ("path", "subflavors", "split_part")  # splits.<part> naming one data set
_MAX_BLEND_DEPTH = 8


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _reference_problems(
    blend: Path, where: str, ref, allowed: tuple[str, ...], stack: tuple[Path, ...]
) -> list[str]:
    """Problems of one data set reference in a blend, and of what its path points at."""
    if not isinstance(ref, dict):
        return [f"{blend}: {where} is not a mapping"]
    for key in ref:
        if key not in allowed:
            return [f"{blend}: {where}.{key} is not allowed (the blends we read use only {', '.join(allowed)})"]
    target = ref.get("path")
    if not isinstance(target, str) or not target:
        return [f"{blend}: {where}.path is missing or not a string"]
    if "weight" in ref and (isinstance(ref["weight"], bool) or not isinstance(ref["weight"], (int, float))):
        return [f"{blend}: {where}.weight {ref['weight']!r} is not a number"]
    subflavors = ref.get("subflavors")
    if subflavors is not None and (
        not isinstance(subflavors, dict)
        or not all(isinstance(k, str) and _is_scalar(v) for k, v in subflavors.items())
    ):
        return [f"{blend}: {where}.subflavors is not a mapping of names to plain values"]
    if "split_part" in ref and not isinstance(ref["split_part"], str):
        return [f"{blend}: {where}.split_part is not a string"]
    if "://" in target:
        return [f"{blend}: {where}.path {target!r} is not a local path"]
    resolved = blend.parent / target
    if resolved.is_dir():
        return [f"{blend}: {where}.path {target!r}: {p}" for p in check_energon_metadata(resolved)]
    if resolved.is_file() and resolved.suffix == ".yaml":
        return [f"{blend}: {where}.path {target!r}: {p}" for p in _blend_problems(resolved, stack)]
    return [f"{blend}: {where}.path {target!r} is not a data_prep directory or a blend .yaml"]


def _blend_problems(blend: Path, stack: tuple[Path, ...] = ()) -> list[str]:
    """Problems that make ``blend`` other than a MetadatasetV2 blend of data_prep directories."""
    real = blend.resolve()
    if real in stack or len(stack) >= _MAX_BLEND_DEPTH:
        return [f"{blend}: blends nest in a cycle or deeper than {_MAX_BLEND_DEPTH}"]
    stack = (*stack, real)
    try:
        data = load_yaml_data(blend)
    except MetadataError as exc:
        return [str(exc)]
    if not isinstance(data, dict):
        return [f"{blend}: not a mapping; a blend is {BLEND_HEADER} with splits"]
    for key in data:
        if key not in (*BLEND_HEADER, "splits"):
            return [f"{blend}: key {key!r} is not allowed (a blend has only __module__, __class__ and splits)"]
    for key, want in BLEND_HEADER.items():
        if data.get(key) != want:
            return [f"{blend}: {key} is {data.get(key)!r}; the blends we read are {want!r}"]
    splits = data.get("splits")
    if not isinstance(splits, dict) or not splits:
        return [f"{blend}: splits is missing or not a mapping of split names"]
    problems: list[str] = []
    for part, ref in splits.items():
        where = f"splits.{part}"
        if isinstance(ref, dict) and "blend" in ref:
            if set(ref) != {"blend"}:
                extra = sorted(k for k in ref if k != "blend")
                problems.append(f"{blend}: {where}.{extra[0]} is not allowed next to blend")
                continue
            items = ref["blend"]
            if not isinstance(items, list) or not items:
                problems.append(f"{blend}: {where}.blend is not a list of data sets")
                continue
            for i, item in enumerate(items):
                problems += _reference_problems(blend, f"{where}.blend[{i}]", item, _BLEND_ITEM_KEYS, stack)
        else:
            problems += _reference_problems(blend, where, ref, _REFERENCE_KEYS, stack)
    return problems


def data_trust_problems(path: str | Path) -> list[str]:
    """Why Energon must not be handed ``path`` (a data_prep directory or a blend YAML) without
    ``trust_dataset_code``: one line per problem, naming the file and key; empty when it is ours."""
    p = Path(path)
    if p.is_dir():
        return check_energon_metadata(p)
    return _blend_problems(p)


def check_data_trust(path: str | Path) -> None:
    """ConfigError (one line) unless ``path``'s Energon metadata is what data_prep writes."""
    problems = data_trust_problems(path)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        first = " ".join(problems[0].split())  # one line, whatever the file names hold
        raise ConfigError(
            f"refusing data {path}: {first}{more}; Energon could import or run what such metadata names. "
            "Rebuild the data with data_prep (`python -m data_prep verify DIR` checks a build) or set "
            "data.trust_dataset_code=true if you trust its code"
        )


class NeoDataLoader:
    """Iterator of packed micro-batches (``NeoBatch``) for one data-parallel rank."""

    def __init__(self, config: LoaderConfig, dp_rank: int = 0, dp_size: int = 1, tokenizer=None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if config.micro_batch_size < 1 or config.num_workers < 0:
            raise ValueError("micro_batch_size must be >= 1 and num_workers >= 0")
        _check_data_path(config.path)
        if not config.trust_dataset_code:  # before Energon reads any of it
            check_data_trust(config.path)
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        # Worker processes fork from here; a tokenizer that used its thread pool before the fork
        # would warn and deadlock-proof itself in every worker. Respect an explicit setting.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if tokenizer is None:
            tokenizer = load_tokenizer(resolve_tokenizer_path(config))
        self.error_log = SampleErrorLog()
        self.task_encoder = NeoTaskEncoder(tokenizer, config.seq_len, self.error_log)
        self.worker_config = WorkerConfig(
            rank=dp_rank,
            world_size=dp_size,
            num_workers=config.num_workers,
            seed_offset=config.seed,
            global_error_handler=self.error_log.handle,
        )
        dataset = get_train_dataset(
            config.path,
            split_part="train",
            worker_config=self.worker_config,
            batch_size=config.micro_batch_size,
            batch_drop_last=config.repeat,  # an endless stream has no last batch; one pass keeps its tail
            packing_buffer_size=config.packing_buffer_size,
            shuffle_buffer_size=config.shuffle_buffer_size or None,
            max_samples_per_sequence=config.max_samples_per_sequence,
            task_encoder=self.task_encoder,
            repeat=config.repeat,
        )
        self._loader = get_savable_loader(dataset, prefetch_factor=config.prefetch_factor)
        workers.protect(self._loader)  # its workers must not die of the SIGTERM meant for this rank
        self._iterator = None
        self.totals = LoaderStats()
        # Distinct skipped samples: identity -> (tokens, pixel budget per image that fits), and the
        # identities of failed ones. Saved with the state, so a resumed run does not count again.
        self._too_long: dict[str, tuple[int, int | None]] = {}
        self._errored: set[str] = set()
        self._too_long_reported = False
        self.last: BatchInfo | None = None
        self._interval_mark = LoaderStats()

    # -- iteration ----------------------------------------------------------------------------

    def __iter__(self) -> NeoDataLoader:
        return self

    def __next__(self) -> NeoBatch:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")  # no CUDA: nothing to pin
            if self._iterator is None:
                self._iterator = iter(self._loader)
            if self.config.num_workers == 0:  # the data work runs right here, in the trainer process
                with single_thread():
                    micro: MicroBatch = next(self._iterator)
            else:
                micro = next(self._iterator)
        self._account(micro)
        if self.totals.samples == 0 and micro.too_long:
            # Nothing has fitted yet and this whole micro-batch is padding: every sample read so
            # far is too long. Training on it would divide a zero loss by zero.
            raise NothingFitsError(
                f"no sample fits: every sample read so far is longer than seq_len; "
                f"{too_long_summary(self._too_long, self.config.seq_len)}"
            )
        if self._too_long and not self._too_long_reported:
            self._too_long_reported = True
            log.warning("%s; counted in skipped_samples from now on, not logged one by one",
                        too_long_summary(self._too_long, self.config.seq_len))
        return micro.batch

    def _account(self, micro: MicroBatch) -> None:
        s = self.totals
        s.batches += 1
        s.rows += len(micro.keys)
        s.samples += sum(len(k) for k in micro.keys)
        s.real_tokens += sum(micro.real_tokens)
        s.row_tokens += len(micro.keys) * self.config.seq_len
        s.skipped_too_long += len(micro.skipped)
        s.sample_errors += micro.errors
        for identity, length, fit in micro.too_long:
            self._too_long.setdefault(identity, (int(length), fit))
        self._errored.update(micro.error_ids)
        s.too_long_samples, s.error_samples = len(self._too_long), len(self._errored)
        self.last = BatchInfo(
            keys=list(micro.keys), real_tokens=list(micro.real_tokens), seq_len=self.config.seq_len
        )

    def stats(self) -> dict:
        """Cumulative counters as a flat dict for metrics; ``skipped_samples`` = distinct samples
        skipped as too long or failed (a sample the data brings round again counts once)."""
        t = self.totals
        return {
            **asdict(t),
            "pack_fill": t.fill,
            "skipped_samples": t.too_long_samples + t.error_samples,
        }

    def summary(self) -> str | None:
        """One line on what was skipped so far (distinct samples), for the end of a run; None if nothing."""
        parts = []
        if self._too_long:
            parts.append(too_long_summary(self._too_long, self.config.seq_len))
        if self._errored:
            n = len(self._errored)
            parts.append(f"{n} sample{'s' if n != 1 else ''} failed to load and {'were' if n != 1 else 'was'} "
                         f"skipped ({self.totals.sample_errors} times in all; the log names each)")
        return "; ".join(parts) or None

    def interval_stats(self) -> LoaderStats:
        """Counters since the previous call (for per-log-interval metrics such as pack fill)."""
        now = LoaderStats(**asdict(self.totals))
        delta = now.minus(self._interval_mark)
        self._interval_mark = now
        return delta

    # -- state --------------------------------------------------------------------------------

    def layout(self) -> dict:
        """What a saved state is only valid for."""
        return {
            "version": STATE_VERSION,
            "energon": version("megatron-energon"),
            "dp_size": self.dp_size,
            "dp_rank": self.dp_rank,
            "num_workers": self.config.num_workers,
            "micro_batch_size": self.config.micro_batch_size,
            "seq_len": self.config.seq_len,
        }

    def state_dict(self) -> dict:
        """Plain JSON-able state (dicts, lists, str, numbers): storable with json or torch.save."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            energon_state = self._loader.save_state_rank()
        return {
            "layout": self.layout(),
            "seed": self.config.seed,
            "data_path": str(self.config.path),
            "stats": asdict(self.totals),
            "skipped": {
                "too_long": [[k, length, fit] for k, (length, fit) in sorted(self._too_long.items())],
                "errors": sorted(self._errored),
            },
            "energon": to_plain(energon_state),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; only before the first batch, only for the same layout."""
        if self._iterator is not None:
            raise RuntimeError("load_state_dict must be called before the first batch is drawn")
        if not isinstance(state, dict) or "layout" not in state or "energon" not in state:
            raise LoaderStateError(
                "not a loader state (expected the dict written by NeoDataLoader.state_dict)"
            )
        saved, current = state["layout"], self.layout()
        diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
        if diffs:
            raise LoaderStateError(
                "data loader state does not match this run's layout ("
                + "; ".join(diffs)
                + "). Resume with the same data-parallel size, workers, micro-batch size and seq_len, "
                "or convert the state with `energon checkpoint redist` (DP size changes) first."
            )
        if state.get("seed") != self.config.seed:
            raise LoaderStateError(
                f"data loader state was saved with seed {state.get('seed')}, this run uses {self.config.seed}"
            )
        if state.get("data_path") != str(self.config.path):
            log.warning(
                "data loader state was saved for %s, resuming on %s", state.get("data_path"), self.config.path
            )
        self._loader.restore_state_rank(from_plain(state["energon"]))
        self.totals = LoaderStats(**state.get("stats", {}))
        skipped = state.get("skipped") or {}
        self._too_long = {str(k): (int(length), fit) for k, length, fit in skipped.get("too_long", [])}
        self._errored = set(map(str, skipped.get("errors", [])))
        self._too_long_reported = bool(self._too_long)
        self._interval_mark = LoaderStats(**asdict(self.totals))

    def close(self) -> None:
        """Stop worker processes (also happens at interpreter exit)."""
        self._iterator = None
        shutdown = getattr(getattr(self._loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class TrainLoader(NeoDataLoader):
    """``NeoDataLoader`` built from flat keyword arguments, as the trainer passes its config
    (``data.*``, ``tokenizer.path``, ``train.*``) and its data-parallel rank and size."""

    def __init__(
        self,
        *,
        path: str,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        tokenizer_path: str | None = None,
        num_workers: int = 1,
        seed: int = 1234,
        packing_buffer: int = LoaderConfig.packing_buffer_size,
        shuffle_buffer: int = LoaderConfig.shuffle_buffer_size,
        trust_dataset_code: bool = False,
        tokenizer=None,
    ):
        config = LoaderConfig(
            path=str(path),
            tokenizer=str(tokenizer_path) if tokenizer_path else None,
            seq_len=seq_len,
            micro_batch_size=micro_batch_size,
            num_workers=num_workers,
            seed=seed,
            packing_buffer_size=packing_buffer,
            shuffle_buffer_size=shuffle_buffer,
            trust_dataset_code=trust_dataset_code,
        )
        super().__init__(config, dp_rank=dp_rank, dp_size=dp_size, tokenizer=tokenizer)


__all__ = [
    "STATE_VERSION",
    "BatchInfo",
    "LoaderConfig",
    "LoaderStateError",
    "LoaderStats",
    "NeoDataLoader",
    "NothingFitsError",
    "TrainLoader",
    "check_data_path",
    "check_data_trust",
    "data_trust_problems",
]
