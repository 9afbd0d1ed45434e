import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from lowbit.formats.packing import pack_int32, unpack_int32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(3, 70), (64, 96)])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_round_trips_and_matches_compressed_tensors(bits, shape, dim):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8)
    packed = pack_int32(q, bits, dim)
    assert packed.dtype == torch.int32
    assert torch.equal(packed, pack_to_int32(q, bits, packed_dim=dim))
    assert torch.equal(unpack_int32(packed, bits, shape, dim), q)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim), q)
