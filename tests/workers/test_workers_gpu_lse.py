"""CUDA: the stock attention that also yields the lse (cuDNN) is bit-identical to SDPA, and the lse is right."""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 4, 300, 64), (2, 24, 4429, 64), (1, 3, 77, 32)])
def test_stock_attention_bitwise_and_lse(dtype, shape):
    from workers.processors.common import stock_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*shape, generator=g).to("cuda", dtype) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    for _ in range(2):  # first call checks and caches the verdict, second uses it
        out, lse = stock_attention(q, k, v, want_lse=True)
        assert torch.equal(out, expected)
        if lse is not None:
            ref = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * shape[-1] ** -0.5, dim=-1)
            torch.testing.assert_close(lse.double(), ref, atol=2e-2, rtol=1e-3)
    out, lse = stock_attention(q, k, v, want_lse=False)
    assert lse is None and torch.equal(out, expected)


def test_remove_path_matches_fp64_through_apply_sinks():
    """fixed.m1 on a recorded layer takes the lse route (closed form + guard); compare with an fp64 masked softmax."""
    from manifests import RecordingSpec
    from manifests.interventions import PRESETS
    from workers.identification import KeyLayout
    from workers.processors.common import apply_sinks, stock_attention
    from workers.session import ElementPlan, LayerInfo, RunContext

    g = torch.Generator().manual_seed(0)
    b, h, n_img, n_txt, d = 2, 4, 256, 77 + 20, 64
    L = n_img + n_txt
    q, k, v = (torch.randn(b, h, L, d, generator=g) for _ in range(3))
    k[:, :, 300] = 3 * q[:, :, :n_img].mean(dim=2)  # a sink among the text keys
    qc, kc, vc = (x.to("cuda", torch.bfloat16) for x in (q, k, v))
    out, lse = stock_attention(qc, kc, vc, want_lse=True)
    iv = PRESETS["fixed.m1"].model_copy(update={"layers": [0]})
    ctx = RunContext([ElementPlan("a", "uncond", iv, 1), ElementPlan("a", "cond", iv, 1)], RecordingSpec(layers=[0]))
    ctx.step, ctx.active_steps = 0, [None, None]
    layout = KeyLayout(num_image=n_img, num_clip=77, num_t5=20)
    res = apply_sinks(ctx, LayerInfo("transformer_blocks.0.attn", 0, 0), qc, kc, vc, out.clone(), layout, lse=lse)
    sel = ctx.records[0].selected
    assert sel is not None
    qd, kd, vd = (x.double() for x in (qc, kc, vc))
    s = (qd @ kd.transpose(-1, -2)) * d**-0.5
    for e in range(b):
        idx = ctx.records[e].selected.cpu()  # [H, 1]
        mask = torch.zeros(h, L, dtype=torch.bool).scatter_(-1, idx, True)[:, None, :].cuda()
        ref = torch.softmax(s[e, :, :n_img].masked_fill(mask, float("-inf")), -1) @ vd[e]
        torch.testing.assert_close(res[e, :, :n_img].double(), ref, atol=2e-2, rtol=2e-2)
        assert torch.equal(res[e, :, n_img:], out[e, :, n_img:])  # text queries untouched
        assert torch.all(ctx.records[e].removed_mass_after == 0)
