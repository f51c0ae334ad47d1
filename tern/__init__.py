"""tern: federated learning for IoT fleets over MQTT.

This package is the protocol every component speaks: topics, the signed CBOR
envelope, tensor codecs (float32, float16, ternary), partial aggregates and message
bodies. It does no I/O and uses no asyncio; the one exception is the command line,
`tern.cli` (and `tern.fleet_cli`, its `tern fleet` commands), which nothing else imports.
"""

from tern.aggregate import Accumulator, Partial, fold, fold_sorted, mean
from tern.codecs import Codec, CodecName, Float16Codec, Float32Codec, TernaryCodec, codec_for
from tern.envelope import Envelope, Kind, open_envelope, seal
from tern.errors import TernError
from tern.messages import GlobalModel, RoundSchedule, TrainConfig, Update, encode_update
from tern.spec import ModelSpec, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "Codec",
    "CodecName",
    "Envelope",
    "Float16Codec",
    "Float32Codec",
    "GlobalModel",
    "Kind",
    "ModelSpec",
    "Partial",
    "RoundSchedule",
    "TensorSpec",
    "TernError",
    "TernaryCodec",
    "TrainConfig",
    "Update",
    "__version__",
    "codec_for",
    "encode_update",
    "fold",
    "fold_sorted",
    "mean",
    "open_envelope",
    "seal",
]
