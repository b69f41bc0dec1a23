"""Shared helpers of the parity tests against Hugging Face PyTorch models."""

import numpy as np
import torch
from transformers.activations import ACT2FN

X = np.linspace(-6, 6, 1201, dtype=np.float32)  # where activations are compared


def randomized(model, stds, ln_gains=None):
  """Every parameter random: N(0, std) by the first key of `stds` in its name (else 0.3);
  LayerNorm weights gain * (1 + N(0, 0.3^2)) and biases N(0, (0.3 gain)^2), gain by `ln_gains`
  (else 1): HF's init leaves LayerNorms at 1/0, hiding mix-ups."""
  g = torch.Generator().manual_seed(0)
  norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
  pick = lambda table, name, default: next((v for k, v in table.items() if k in name), default)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g)
      owner, kind = name.rsplit(".", 1) if "." in name else ("", name)
      if owner in norms:
        gain = pick(ln_gains or {}, name, 1.0)
        p.copy_(gain * (1 + 0.3 * r) if kind == "weight" else 0.3 * gain * r)
      else:
        p.copy_(pick(stds, name, 0.3) * r)
  return model.eval()


def assert_activations_follow_hf(layers, hidden_act, what=""):
  """Each block's feed-forward activation equals HF's `hidden_act` on X (exact, tanh and quick
  GELU differ there by >= 1e-4)."""
  want = ACT2FN[hidden_act](torch.from_numpy(X)).numpy()
  for i, block in enumerate(layers):
    np.testing.assert_allclose(block.mlp.act(X), want, atol=1e-6, rtol=0,
                               err_msg=f"{what}layer {i} activation vs HF {hidden_act!r}")
