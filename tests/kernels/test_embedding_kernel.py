import pytest
import torch
from kernel_check import dtypes_for_device

pytest.importorskip("triton")
from fasttune.kernels.embedding import device_reads_host, embedding_rows, embedding_rows_reference  # noqa: E402

DEVICE, DTYPES = dtypes_for_device()


@pytest.mark.parametrize("dtype", DTYPES + ([torch.bfloat16] if DEVICE == "cpu" else []))
@pytest.mark.parametrize("hidden", [48, 1100])  # one block, and two blocks with a ragged tail
def test_gathered_rows_equal_the_table_rows(dtype, hidden):
    torch.manual_seed(0)
    table = torch.randn(37, hidden).to(dtype)  # a copy (no arithmetic), so bf16 is exact in the interpreter too
    if DEVICE == "cuda":
        table = table.pin_memory()  # host memory, read by the GPU
    ids = torch.tensor([[0, 36, 5], [5, 5, 17]], device=DEVICE)
    out = embedding_rows(ids, table)
    assert out.device.type == DEVICE and out.dtype == dtype and out.shape == (2, 3, hidden)
    assert torch.equal(out.cpu(), embedding_rows_reference(ids, table).cpu())
    assert torch.equal(out.cpu(), table[ids.cpu()])


def _host_table(*shape):
    table = torch.randn(*shape)
    return table.pin_memory() if DEVICE == "cuda" else table


def test_ids_outside_the_vocabulary_give_nan_rows_not_other_memory():
    table = _host_table(8, 16)
    out = embedding_rows(torch.tensor([1, 8, -1, 7], device=DEVICE), table).cpu()
    assert torch.equal(out[0], table[1]) and torch.equal(out[3], table[7])
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()


def test_empty_batch():
    ids = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    assert embedding_rows(ids, _host_table(4, 8)).shape == (0, 3, 8)


def test_the_reference_raises_for_ids_outside_the_vocabulary():
    with pytest.raises(IndexError):
        embedding_rows_reference(torch.tensor([4]), torch.randn(4, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_this_gpu_reads_pinned_host_memory():
    assert device_reads_host(torch.device("cuda"))
