"""p2pshard: store model weights across a swarm of peers and load them back fast.

Layers, bottom up:

- ``hashing``     shard ids (blake3) and DHT keys; name validation
- ``formats``     strict safetensors parsing/writing; checkpoint directories
- ``chunking``    tensor-aligned shard plans
- ``manifest``    what a published model is made of (msgpack, validated)
- ``store``       a peer's on-disk, content-addressed shard store
- ``records``     name records: model name -> manifest, versioned
- ``dht``         kademlia: owners of a key, name records over UDP
- ``server``      a peer's HTTP API: shard GET/HEAD/PUT, status
- ``wire``        blocking HTTP/1.1 shard GETs in worker threads (strict, verified)
- ``memory``      fresh buffers for loaded arrays, populated cheaply
- ``transfer``    verified HTTP fetch with failover; uploads
- ``replication`` placement on the k closest peers; completing owner sets
- ``balance``     even bytes per peer for one publish (splits unlucky shards)
- ``publish``     checkpoint -> shards -> manifest -> name record
- ``schedule``    which shard a load asks which peer for, and when
- ``loader``      name -> manifest -> concurrent verified fetch -> arrays/files
- ``peer``        a peer's lifecycle; ``client`` the public client; ``cli``
"""

from .client import Client
from .errors import *  # noqa: F403
from .errors import __all__ as _errors
from .loader import LoadStats
from .manifest import Manifest
from .peer import Peer
from .publish import PublishResult
from .records import NameRecord
from .settings import Settings

__all__ = [
    "Client",
    "LoadStats",
    "Manifest",
    "NameRecord",
    "Peer",
    "PublishResult",
    "Settings",
    *_errors,
]
__version__ = "0.1.0"
