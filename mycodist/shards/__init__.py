"""WebDataset shards: the writer every producer uses, the manifest every reader checks (docs/shards.md)."""

from mycodist.shards.manifest import Manifest, ManifestError, ShardInfo, read_manifest
from mycodist.shards.writer import DatasetWriter, DuplicateKeyError, WriterSettings, assign_splits

__all__ = ["DatasetWriter", "DuplicateKeyError", "Manifest", "ManifestError", "ShardInfo", "WriterSettings",
           "assign_splits", "read_manifest"]
