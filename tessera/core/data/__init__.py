"""Token data: prepared once into WebDataset tar shards, streamed by a resumable loader."""
from tessera.core.data.loader import ShardReader, StreamingLoader
from tessera.core.data.manifest import DataError, Manifest, read_manifest
from tessera.core.data.prepare import prepare
from tessera.core.data.streams import ShardStreams

__all__ = ["DataError", "Manifest", "ShardReader", "ShardStreams", "StreamingLoader", "prepare", "read_manifest"]
