"""The decoder's dense MLP (models/decoder.py's layers and MoE shared experts use it): gated (SwiGLU / GeGLU, gate/up
fused or not) or ungated, under each family's module names, long sequences in tiles (models/tiled_mlp.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from fasttune.kernels import rebuild
from fasttune.kernels.activations import gated_act, gated_act_packed
from fasttune.kernels.gemv import gated_gemv, one_row_linears
from fasttune.models.config import ModelConfig
from fasttune.models.self_attention import one_linear
from fasttune.models.tiled_mlp import tiled_mlp
from fasttune.models.xielu import XIELU
from fasttune.peft.lora import project

MLP_TILE_BYTES = 1 << 30  # one bf16 (tokens x intermediate) activation per MLP tile


class MLP(nn.Module):
    """The gated MLP (SwiGLU / GeGLU): down(act(gate(x)) * up(x)), gate/up fused for Phi-3 and GLM-4; or the ungated
    down(act(up(x))) of Arcee (ReLU²), Apertus (xIELU, models/xielu.py) and Nemotron-H; long sequences run in tiles
    (MLP_TILE_BYTES of intermediate activations each)."""

    rope_kind = "global"  # (as a Nemotron-H layer's mixer: the layer loop hands it a RoPE table it ignores)
    keeps_block = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.act, self.fused, self.intermediate = cfg.hidden_act, cfg.fused_gate_up, i
        self.gated = cfg.mlp_gated
        # gate / up / down under the family's names (LFM2: w1 / w3 / w2)
        self.names = tuple(cfg.module_name(n) for n in ("gate_proj", "up_proj", "down_proj"))
        self.multipliers = cfg.mlp_multipliers  # Falcon-H1: act(gate(x) * m_gate) * up(x), down(...) * m_down
        self.fused_name = cfg.module_name("gate_up_proj")  # (Granite 4.0: input_linear)
        if self.fused:
            setattr(self, self.fused_name, nn.Linear(h, 2 * i, bias=cfg.mlp_bias))
        else:
            if self.gated:
                setattr(self, self.names[0], nn.Linear(h, i, bias=cfg.mlp_bias))
            setattr(self, self.names[1], nn.Linear(h, i, bias=cfg.mlp_bias))
        if self.act == "xielu":  # Apertus: a learnable activation, under transformers' name
            self.act_fn = XIELU()
        setattr(self, self.names[2], nn.Linear(i, h, bias=cfg.mlp_bias))

    @property
    def gate(self) -> nn.Module:
        """The gate projection (gate_proj, or the family's name for it)."""
        return getattr(self, self.names[0])

    @property
    def gate_up(self) -> nn.Module:
        """The fused gate|up projection (gate_up_proj, or the family's name for it), of a fused MLP."""
        return getattr(self, self.fused_name)

    @property
    def up(self) -> nn.Module:
        """The up projection (up_proj, or the family's name for it)."""
        return getattr(self, self.names[1])

    @property
    def down(self) -> nn.Module:
        """The down projection (down_proj, or the family's name for it)."""
        return getattr(self, self.names[2])

    def forward(self, x, values_unused: bool = False):
        """x (B, T, H) -> (B, T, H). values_unused: inside a recompute whose output value is discarded, down_proj's
        base GEMM is skipped (see kernels/lora.py)."""
        tile = max(1, MLP_TILE_BYTES // (2 * self.intermediate * x.shape[0]))  # sequence positions per tile
        if x.shape[1] <= 2 * tile:
            return self._mlp(x, values_unused)
        # Long sequences: the three (tokens x intermediate) activations exist for one tile at a time; in training
        # each tile is recomputed in backward, so only x is kept (models/tiled_mlp.py).
        trainable = any(p.requires_grad for p in self.parameters())
        return tiled_mlp(self._mlp, x, tile, values_unused, trainable)

    def _mlp(self, x, values_unused: bool = False):
        if not self.gated:  # Arcee's down(relu(up(x)) ** 2), Apertus' down(xielu(up(x))), in torch ops
            u = one_linear(self.up, x)
            if self.act == "xielu":
                h = self.act_fn(u)
            elif rebuild.active():  # (square keeps relu's output: down_proj's input is rebuilt from it)
                r = torch.relu(u)
                h = rebuild.mark(r.square(), torch.square, r.detach())
            else:
                h = torch.relu(u).square()
            return project(h, self.down, values_unused=values_unused)[0]
        if self.multipliers is not None:
            gate, up = project(x, self.gate, self.up)
            h = gated_act(gate * self.multipliers[0], up, self.act)
            return project(h, self.down, values_unused=values_unused)[0] * self.multipliers[1]
        pair = (self.gate_up,) if self.fused else (self.gate, self.up)
        if one_row_linears(x, pair):  # a batch-1 decode step: both projections and the activation in one launch
            if self.fused:
                bias = self.gate_up.bias
                weights, biases = self.gate_up.weight.chunk(2), (None, None) if bias is None else bias.chunk(2)
            else:
                weights, biases = (m.weight for m in pair), (m.bias for m in pair)
            h = gated_gemv(x, *weights, *biases, self.act)
        elif self.fused:
            h = gated_act_packed(self.gate_up(x), self.act)
        else:
            h = gated_act(*project(x, self.gate, self.up), self.act)
        return project(h, self.down, values_unused=values_unused)[0]
