"""How much attention do zero tokens get? prob mode vs Echo's score mode, with numbers.

Run: python examples/prob_vs_score.py
"""
import torch

import zeromask

torch.manual_seed(0)
B, H, L, D = 4, 8, 256, 64
q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
key_zero = torch.rand(B, L) < 0.25  # a quarter of the keys are zero tokens (silence, padding)

print(f"{'zero_scale':>10} | {'prob: share on zero keys':>25} | {'score: share on zero keys':>26}")
for s in (1e-6, 1e-2, 1.0):
    shares = []
    for mode in ("prob", "score"):
        p = zeromask.ops.zero_soft_attention_weights(q, k, key_zero=key_zero, zero_scale=s,
                                                     zero_mode=mode)
        shares.append((p * key_zero[:, None, None, :]).sum(-1).mean().item())
    print(f"{s:>10g} | {shares[0]:>25.2e} | {shares[1]:>26.2e}")

# A row whose logits are all negative: score mode pulls the zero key's logit up to ~0.
q1 = torch.ones(1, 1, 1, 4)
k1 = -torch.ones(1, 1, 8, 4)  # every logit is -2
k1[..., 0, :] *= 1.5          # the zero key is even less similar: logit -3
kz = torch.zeros(1, 8, dtype=torch.bool)
kz[0, 0] = True
for mode in ("prob", "score"):
    p = zeromask.ops.zero_soft_attention_weights(q1, k1, key_zero=kz, zero_mode=mode)
    print(f"negative row, {mode:5s}: zero key gets {p[0, 0, 0, 0].item():.1%} of the attention")
