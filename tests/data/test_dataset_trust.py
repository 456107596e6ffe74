"""Untrusted data runs no code: the loader hands Energon only metadata that data_prep writes.

Energon's `.nv-meta/dataset.yaml` can name Python files to execute (`sample_loader`, `part_filter`:
the "crude dataset" hooks) and any class to import; `split.yaml` / `.info.json` can name tar files
anywhere; a blend YAML can point at such directories. Each case here is refused with one line
naming the file and the key, before Energon reads anything (the marker file the payload would
create never appears), unless `trust_dataset_code` is set: then Energon gets the data as is and
the payload runs, which shows what the refusal prevents.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import ConfigError, compose
from pretrain.data import LoaderConfig, NeoDataLoader
from pretrain.data.loader import data_trust_problems

REPO = Path(__file__).resolve().parents[2]

PAYLOAD = """\
from pathlib import Path
Path({marker!r}).write_text("the dataset's code ran")


def sample_loader(raw):
    return raw


def part_filter(part):
    return True
"""

SAMPLE_LOADER_YAML = """\
__module__: megatron.energon
__class__: CaptioningWebdataset
sample_loader: sample_loader.py:sample_loader
part_filter: sample_loader.py:part_filter
"""

CRUDE_PART_FILTER_YAML = """\
__module__: megatron.energon
__class__: CrudeWebdataset
part_filter: sample_loader.py:part_filter
"""


def plant(directory: Path, dataset_yaml: str, marker: Path) -> Path:
    """Make ``directory`` a crude dataset whose metadata runs a payload that creates ``marker``."""
    meta = directory / ".nv-meta"
    (meta / "sample_loader.py").write_text(PAYLOAD.format(marker=str(marker)))
    (meta / "dataset.yaml").write_text(dataset_yaml)
    return directory


def config(path: Path, synthetic: Path, **kwargs) -> LoaderConfig:
    return LoaderConfig(
        path=str(path),
        tokenizer=str(synthetic / "tokenizer"),
        seq_len=256,
        micro_batch_size=1,
        num_workers=0,
        packing_buffer_size=8,
        shuffle_buffer_size=8,
        **kwargs,
    )


def refused(cfg: LoaderConfig, tokenizer, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        NeoDataLoader(cfg, tokenizer=tokenizer)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    assert "data.trust_dataset_code=true" in message, message
    return message


def test_clean_build_and_blend_are_accepted(synthetic, blend_yaml, tokenizer):
    assert data_trust_problems(synthetic) == []
    assert data_trust_problems(blend_yaml) == []
    loader = NeoDataLoader(config(synthetic, synthetic), tokenizer=tokenizer)
    assert next(loader).tokens.shape == (1, 256)


def test_sample_loader_is_refused_and_never_runs(synthetic, synthetic_copy, tokenizer, tmp_path):
    marker = tmp_path / "MARKER"
    plant(synthetic_copy, SAMPLE_LOADER_YAML, marker)
    refused(config(synthetic_copy, synthetic), tokenizer, str(synthetic_copy / ".nv-meta" / "dataset.yaml"),
            "'sample_loader'")
    assert not marker.exists()
    # Trusted: Energon gets the metadata as is and runs the file while it builds the dataset.
    NeoDataLoader(config(synthetic_copy, synthetic, trust_dataset_code=True), tokenizer=tokenizer)
    assert marker.exists()


def test_crude_part_filter_is_refused_and_trust_lifts_it(synthetic, synthetic_copy, tokenizer, tmp_path):
    """Our own sample type with a `part_filter` file: still code. Trusted, it loads and trains."""
    marker = tmp_path / "MARKER"
    plant(synthetic_copy, CRUDE_PART_FILTER_YAML, marker)
    refused(config(synthetic_copy, synthetic), tokenizer, "dataset.yaml", "'part_filter'")
    assert not marker.exists()
    loader = NeoDataLoader(config(synthetic_copy, synthetic, trust_dataset_code=True), tokenizer=tokenizer)
    assert next(loader).tokens.shape == (1, 256)
    assert marker.exists()


DATASET = "__module__: megatron.energon\n__class__: CrudeWebdataset\n"

TAMPERED = {
    "foreign module": ("dataset.yaml", "__module__: builtins\n__class__: CrudeWebdataset\n", "__module__"),
    "another class": ("dataset.yaml", "__module__: megatron.energon\n__class__: StandardWebdatasetFactory\n",
                      "__class__"),
    "function call": ("dataset.yaml", "__module__: os\n__function__: system\n", "'__function__'"),
    "other split file": ("dataset.yaml", DATASET + "split_config: other.yaml\n", "'split_config'"),
    "subflavor object": ("dataset.yaml", DATASET + "subflavors: {x: {__module__: os, __function__: system}}\n",
                         "'subflavors'"),
    "duplicate key": ("dataset.yaml", "__module__: os\n" + DATASET, "duplicate key '__module__'"),
    "python tag": ("dataset.yaml", "__module__: !!python/name:os.system ''\n__class__: CrudeWebdataset\n",
                   "not plain YAML"),
    "alias": ("dataset.yaml", "__module__: &m megatron.energon\n__class__: CrudeWebdataset\nx: *m\n", "anchors"),
    "merge key": ("dataset.yaml", DATASET + "<<: {part_filter: sample_loader.py:part_filter}\n", "merge keys"),
    "two documents": ("dataset.yaml", DATASET + "---\npart_filter: sample_loader.py:part_filter\n",
                      "not plain YAML"),
    "shard elsewhere": ("split.yaml",
                        "split_parts:\n  train:\n  - ../elsewhere/shard-000000.tar\n  val: []\n  test: []\nexclude: []\n",
                        "split_parts.train"),
    "brace bomb": ("split.yaml",
                   "split_parts:\n  train:\n  - shard-{0..99999999999}.tar\n  val: []\n  test: []\nexclude: []\n",
                   "split_parts.train"),
    "split object": ("split.yaml", "__module__: os\n__class__: system\nsplit_parts: {train: [], val: [], test: []}\n"
                     "exclude: []\n", "split.yaml"),
    "absolute shard": (".info.json", json.dumps({"energon_version": "7.4.1", "shard_counts": {"/etc/x.tar": 1}}),
                       "shard_counts key '/etc/x.tar'"),
}


@pytest.mark.parametrize("name", TAMPERED)
def test_tampered_metadata_is_refused(name, synthetic, synthetic_copy, tokenizer):
    filename, content, needle = TAMPERED[name]
    (synthetic_copy / ".nv-meta" / filename).write_text(content)
    refused(config(synthetic_copy, synthetic), tokenizer, filename, needle)


BLEND = """\
__module__: megatron.energon
__class__: MetadatasetV2
splits:
  train:
    blend:
      - weight: 1
        path: {good}
      - weight: 1
        path: {other}
"""


def test_blend_with_a_bad_directory_is_refused(synthetic, synthetic_copy, tokenizer, tmp_path):
    marker = tmp_path / "MARKER"
    plant(synthetic_copy, CRUDE_PART_FILTER_YAML, marker)
    blend = tmp_path / "blend.yaml"
    blend.write_text(BLEND.format(good=synthetic, other=synthetic_copy))
    refused(config(blend, synthetic), tokenizer, str(blend), "splits.train.blend[1].path", "'part_filter'")
    # A blend of a blend of it: the same, through every level.
    outer = tmp_path / "outer.yaml"
    outer.write_text(BLEND.format(good=synthetic, other=blend.name))
    refused(config(outer, synthetic), tokenizer, str(outer), str(blend), "'part_filter'")
    assert not marker.exists()
    loader = NeoDataLoader(config(blend, synthetic, trust_dataset_code=True), tokenizer=tokenizer)
    loader.close()
    assert marker.exists()


def blend_problem(tmp_path: Path, text: str) -> str:
    blend = tmp_path / "blend.yaml"
    blend.write_text(text)
    problems = data_trust_problems(blend)
    assert problems, text
    assert all(str(blend) in p for p in problems), problems
    return "\n".join(problems)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("__module__: os\n__class__: MetadatasetV2\nsplits: {train: {path: X}}\n", "__module__"),
        ("__module__: megatron.energon\n__class__: Metadataset\nsplits: {train: {path: X}}\n", "__class__"),
        ("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits: {train: {path: X, dataset_config: "
         "evil.yaml}}\n", "splits.train.dataset_config"),
        ("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
         "      - {weight: 1, path: X, split_config: evil.yaml}\n", "splits.train.blend[0].split_config"),
        ("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
         "      - {weight: 1, path: X, subflavors: {a: {__module__: os, __function__: system}}}\n",
         "splits.train.blend[0].subflavors"),
        ("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    join: []\n"
         "    joiner: {__module__: os, __function__: system}\n", "splits.train.join"),
        ("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits: {train: {path: 'msc://bucket/x'}}\n",
         "not a local path"),
        ("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits: {train: {path: data.jsonl}}\n",
         "not a data_prep directory"),
        ("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits: {train: {path: blend.yaml}}\n", "cycle"),
    ],
)
def test_blend_structure_is_checked(tmp_path, synthetic, text, needle):
    (tmp_path / "data.jsonl").write_text("{}\n")
    problems = blend_problem(tmp_path, text.replace("X", str(synthetic)))
    assert needle in problems, problems


def test_trust_flag_is_a_data_config_key():
    assert compose([]).data.trust_dataset_code is False
    assert compose(["data.trust_dataset_code=true"]).data.trust_dataset_code is True


@pytest.mark.slow
def test_trainer_refuses_with_one_line(synthetic, tmp_path):
    """`python -m pretrain.train data.path=<planted dir>`: exit 2, one line, the payload never ran."""
    data = tmp_path / "data"
    shutil.copytree(synthetic, data)
    marker = tmp_path / "MARKER"
    plant(data, SAMPLE_LOADER_YAML, marker)
    done = subprocess.run(
        [sys.executable, "-m", "pretrain.train", "model=tiny", "train.seq_len=256", "train.global_batch_size=2",
         "train.steps=1", "data.num_workers=0", "wandb.mode=disabled", f"data.path={data}",
         f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "dataset.yaml" in errors[0] and "'sample_loader'" in errors[0], done.stderr[-3000:]
    assert not marker.exists()
