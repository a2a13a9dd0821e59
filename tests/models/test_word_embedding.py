"""models/word_embedding.py: Gemma's scaled input embedding, also when offload_embedding moves it to the host."""
import torch

from fasttune.models.host_embedding import HostEmbedding
from fasttune.models.word_embedding import ScaledWordEmbedding, word_embedding


def test_scaled_rows_in_the_weight_dtype_and_kept_on_the_host():
    emb = ScaledWordEmbedding(10, 8, 8 ** 0.5).to(torch.bfloat16)
    ids = torch.tensor([[1, 4, 9]])
    expected = emb.weight[ids] * torch.tensor(8 ** 0.5, dtype=torch.bfloat16)
    assert torch.equal(emb(ids), expected)
    emb.weight.requires_grad_(False)
    assert torch.equal(HostEmbedding.from_embedding(emb)(ids), expected)
    assert type(word_embedding(10, 8, None)) is torch.nn.Embedding
    assert "embed_scale=2.82843" in repr(emb)
