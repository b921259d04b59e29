"""Codecs: numpy blocks in, the bytes of one GGUF tensor type out; one small class per type, kept
by the runtime that reads the type (as gguf-py's `quants.py` keeps one class per type):

- `ggml`: upstream ggml's types (TQ2_0, TQ1_0, Q2_0, Q1_0, F16, F32, BF16, Q8_0);
- `bitnet_cpp`: bitnet.cpp's I2_S (x86 and ARM layouts), TL1 and TL2;
- `ik`: ik_llama.cpp's IQ2_BN, IQ1_BN, IQ2_BN_R4;
- `base`: the `Codec` class, the 2-bit code layout of quantize.zarr and the shared helpers;
- `quantizer`: the absmean ternary quantizer and the reading of group-scaled weights.

`CODECS` maps every output type registry key (pipeline/outtypes.py) to its codec.
"""
from __future__ import annotations

from pipeline.codecs.base import (CODE_BLOCK, Codec, CodecError, codes_from_packed, codes_supported, pack_fields,
                                  unpack_fields)
from pipeline.codecs.bitnet_cpp import I2_S, I2_S_ARM, I2_S_TAIL, QK_I2_S, QK_I2_S_ARM, TL1, TL2, Tiles, column_order
from pipeline.codecs.ggml import (BF16, F16, F32, Q1_0, Q2_0, Q8_0, QK1_0, QK2_0, QK_K, TQ1_0, TQ2_0,
                                  encode_floats)
from pipeline.codecs.ik import IK_CODECS, IQ1_BN, IQ2_BN, IQ2_BN_R4, QK_IQ1BN
from pipeline.codecs.quantizer import (ABSMEAN_FLOOR, MAGNITUDE_BITS, NonFiniteWeights, absmean_row_sums,
                                       absmean_scale, absmean_total, constant_over, effective_scale, group_magnitudes,
                                       group_rows, row_abs_max, row_abs_max_bits, scale_granularity, sign_fields,
                                       ternary_codes)

CODECS: dict[str, type[Codec]] = {
    "tq2_0": TQ2_0, "tq1_0": TQ1_0, "i2_s": I2_S, "i2_s_arm": I2_S_ARM, "tl1": TL1, "tl2": TL2,
    "f16": F16, "bf16": BF16, "f32": F32, "q8_0": Q8_0,
    "q2_0": Q2_0,  # upstream llama.cpp (type 42): group-scaled checkpoints
    "q1_0": Q1_0,  # upstream llama.cpp (type 41): binary group-scaled checkpoints
    **IK_CODECS,  # ik_llama.cpp: iq2_bn, iq1_bn, iq2_bn_r4
}

__all__ = ["ABSMEAN_FLOOR", "BF16", "CODECS", "CODE_BLOCK", "Codec", "CodecError", "F16", "F32", "I2_S", "I2_S_ARM",
           "I2_S_TAIL", "IK_CODECS", "IQ1_BN", "IQ2_BN", "IQ2_BN_R4", "MAGNITUDE_BITS", "NonFiniteWeights", "Q1_0", "Q2_0", "Q8_0", "QK1_0", "QK2_0",
           "QK_I2_S", "QK_I2_S_ARM", "QK_IQ1BN", "QK_K", "TL1", "TL2", "TQ1_0", "TQ2_0", "Tiles", "absmean_row_sums",
           "absmean_scale", "absmean_total", "codes_from_packed", "codes_supported", "column_order", "constant_over",
           "effective_scale", "encode_floats", "group_magnitudes", "group_rows", "pack_fields", "row_abs_max",
           "row_abs_max_bits", "scale_granularity",
           "sign_fields", "ternary_codes", "unpack_fields"]
