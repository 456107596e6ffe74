"""The training data loader: Energon over data_prep shards (or a blend) -> packed ``NeoBatch``es.

    loader = NeoDataLoader(LoaderConfig(path=..., seq_len=..., micro_batch_size=...),
                           dp_rank=dp_rank, dp_size=dp_size)
    batch = next(loader)          # NeoBatch of micro_batch_size rows of exactly seq_len tokens
    loader.totals                 # cumulative LoaderStats (samples, fill, skipped, errors)
    loader.stats()                # the same as a flat dict for metrics (pack_fill, skipped_samples, ...)
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

from pretrain.data.state import from_plain, to_plain
from pretrain.data.task_encoder import MicroBatch, NeoTaskEncoder, SampleErrorLog, single_thread
from pretrain.data.template import load_tokenizer
from pretrain.model.batch import NeoBatch

log = logging.getLogger(__name__)

STATE_VERSION = 1


class LoaderStateError(ValueError):
    """A saved loader state that does not belong to this loader's layout."""


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
    skipped_too_long: int = 0
    sample_errors: int = 0

    @property
    def fill(self) -> float:
        """Mean pack fill: real tokens / (rows * seq_len)."""
        return self.real_tokens / self.row_tokens if self.row_tokens else 0.0

    def minus(self, other: LoaderStats) -> LoaderStats:
        return LoaderStats(**{k: v - getattr(other, k) for k, v in asdict(self).items()})


def resolve_tokenizer_path(config: LoaderConfig) -> Path:
    if config.tokenizer:
        return Path(config.tokenizer)
    default = Path(config.path) / "tokenizer"
    if default.is_dir():
        return default
    raise ValueError(
        f"no tokenizer given and {default} does not exist: set the tokenizer directory explicitly"
    )


def _check_data_path(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        if not (p / ".nv-meta" / "dataset.yaml").is_file():
            raise FileNotFoundError(
                f"{p} has no .nv-meta/dataset.yaml: not a finished data_prep build (run data_prep without --no-energon)"
            )
    elif p.is_file():
        if p.suffix not in (".yaml", ".yml"):
            raise ValueError(f"data path {p} is a file but not an Energon metadataset YAML")
    else:
        raise FileNotFoundError(f"data path {p} does not exist")


class NeoDataLoader:
    """Iterator of packed micro-batches (``NeoBatch``) for one data-parallel rank."""

    def __init__(self, config: LoaderConfig, dp_rank: int = 0, dp_size: int = 1, tokenizer=None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if config.micro_batch_size < 1 or config.num_workers < 0:
            raise ValueError("micro_batch_size must be >= 1 and num_workers >= 0")
        _check_data_path(config.path)
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
        self._iterator = None
        self.totals = LoaderStats()
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
        self.last = BatchInfo(
            keys=list(micro.keys), real_tokens=list(micro.real_tokens), seq_len=self.config.seq_len
        )

    def stats(self) -> dict:
        """Cumulative counters as a flat dict for metrics; ``skipped_samples`` = too long + errors."""
        t = self.totals
        return {
            **asdict(t),
            "pack_fill": t.fill,
            "skipped_samples": t.skipped_too_long + t.sample_errors,
        }

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
        )
        super().__init__(config, dp_rank=dp_rank, dp_size=dp_size, tokenizer=tokenizer)


__all__ = [
    "STATE_VERSION",
    "BatchInfo",
    "LoaderConfig",
    "LoaderStateError",
    "LoaderStats",
    "NeoDataLoader",
    "TrainLoader",
]
