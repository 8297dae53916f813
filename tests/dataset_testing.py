"""TFDS and HF `datasets` corpora that the tests build from local files: no download, no network,
no TensorFlow (tensorflow-datasets writes and reads ArrayRecord files without it).

    name = build_tfds_corpus(data_dir, documents)   # TfdsSource(name, "pt", str(data_dir))
    path = write_hf_corpus(root, documents)         # HfDataset(path, "pt", "train")
"""

from __future__ import annotations

import json
from pathlib import Path

TFDS_NAME = "debertina_test_corpus"  # tfds's name for DebertinaTestCorpus below
SPLIT = "pt"
_FILE = "documents.jsonl"


def build_tfds_corpus(data_dir: Path, documents: list[str]) -> str:
    """Prepares DATA_DIR/debertina_test_corpus/1.0.0 (split "pt", feature "text") from a JSON
    lines file the way any TFDS dataset is prepared (a builder reading its manual_dir), and
    returns the dataset's name."""
    import tensorflow_datasets as tfds

    # Not registered: readers find the dataset by its files, as a process without this class does.
    class DebertinaTestCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = f"{_FILE}: one JSON object with a 'text' per line"

        def _info(self) -> tfds.core.DatasetInfo:
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {SPLIT: self._generate_examples(Path(dl_manager.manual_dir) / _FILE)}

        def _generate_examples(self, path: Path):
            for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                yield index, json.loads(line)

    manual = data_dir / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps({"text": d}, ensure_ascii=False) for d in documents]
    (manual / _FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
    builder = DebertinaTestCorpus(data_dir=str(data_dir), file_format="array_record")
    assert builder.name == TFDS_NAME
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    return TFDS_NAME


def write_hf_corpus(root: Path, documents: list[str], parts: int = 3) -> str:
    """A local HF dataset folder laid out like allenai/c4: config "pt", split "train", its
    documents spread round-robin over `parts` JSON lines files (the dataset's shards)."""
    (root / SPLIT).mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        rows = [json.dumps({"text": d}, ensure_ascii=False) for d in documents[k::parts]]
        (root / SPLIT / f"part-{k}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    # The dataset card's YAML header declares the config, as on the Hub.
    (root / "README.md").write_text(
        f"---\nconfigs:\n- config_name: {SPLIT}\n  data_files:\n  - split: train\n"
        f'    path: "{SPLIT}/*.jsonl"\n---\n'
    )
    return str(root)
