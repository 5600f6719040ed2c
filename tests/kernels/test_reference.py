"""The references against independent formulations: transformers' Qwen2-VL rotary code for the
RoPEs, ``F.scaled_dot_product_attention`` over the concatenated [context; image] keys (the residual
as an additive float mask) for the attentions, explicit per-head loops for the LSE, gradcheck in
float64, and every class of malformed call."""
import math

import pytest
import torch
import torch.nn.functional as F

import latte_kernels as lk
from latte_kernels import reference as ref

f64 = torch.float64


def rand(*shape, dtype=f64):
    return torch.randn(*shape, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# transformers' Qwen2-VL rotary embeddings (the API moved between versions; both shapes handled)


def hf_mrope(x, positions, section, theta):
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m
    from transformers import Qwen2VLTextConfig

    b, n, h, d = x.shape
    kw = dict(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=h, max_position_embeddings=4096)
    try:
        cfg = Qwen2VLTextConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)})
        emb = m.Qwen2VLRotaryEmbedding(cfg)
        assert emb.mrope_section == list(section)
    except (TypeError, AssertionError, KeyError, AttributeError):
        cfg = Qwen2VLTextConfig(**kw, rope_theta=theta, rope_scaling={"type": "mrope", "mrope_section": list(section)})
        emb = m.Qwen2VLRotaryEmbedding(config=cfg)
    cos, sin = emb(x, positions)
    if cos.dim() == 4:  # older transformers: (3, B, N, D), sections chosen in apply_multimodal_rotary_pos_emb
        qh = x.transpose(1, 2)
        out, _ = m.apply_multimodal_rotary_pos_emb(qh, qh, cos, sin, list(section))
        return out.transpose(1, 2)
    out, _ = m.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=2)
    return out


def hf_rope_2d(x, positions, theta):
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m
    from transformers import Qwen2VLVisionConfig

    b, n, h, d = x.shape
    outs = []
    for i in range(b):
        pos = positions[:, i]  # (2, N)
        try:
            cfg = Qwen2VLVisionConfig(embed_dim=h * d, num_heads=h, rope_parameters={"rope_type": "axial", "rope_theta": theta})
            emb = m.Qwen2VLVisionRotaryEmbedding(cfg)
            cos, sin = emb(x, pos.T)  # position_ids (N, 2)
        except TypeError:  # older transformers: (dim, theta), forward(seqlen) -> per-position freqs
            emb = m.VisionRotaryEmbedding(d // 2, theta) if hasattr(m, "VisionRotaryEmbedding") else m.Qwen2VLVisionRotaryEmbedding(d // 2, theta)
            table = emb(int(pos.max()) + 1)
            freqs = table[pos.T].flatten(1)
            full = torch.cat([freqs, freqs], dim=-1)
            cos, sin = full.cos(), full.sin()
        out, _ = m.apply_rotary_pos_emb_vision(x[i], x[i], cos, sin)
        outs.append(out)
    return torch.stack(outs)


@pytest.mark.parametrize("d,section", [(128, (16, 24, 24)), (64, (8, 12, 12)), (32, (4, 6, 6))])
def test_mrope_matches_transformers(d, section):
    b, n, h = 2, 37, 3
    x = torch.randn(b, n, h, d)
    positions = torch.randint(0, 300, (3, b, n))
    out = lk.mrope(x, positions, mrope_section=section, theta=1e6)
    torch.testing.assert_close(out, hf_mrope(x, positions, section, 1e6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [128, 64, 16])
@pytest.mark.parametrize("grid", [(8, 8), (7, 9), (1, 5)])
def test_rope_2d_matches_transformers(d, grid):
    b, h = 2, 2
    n = grid[0] * grid[1]
    x = torch.randn(b, n, h, d)
    out = lk.rope_2d(x, grid, theta=10000.0)
    positions = ref.grid_positions(grid, b)
    torch.testing.assert_close(out, hf_rope_2d(x, positions, 10000.0), atol=1e-5, rtol=1e-5)


def test_rope_2d_explicit_positions_override_grid():
    b, n, h, d = 2, 12, 2, 16
    x = torch.randn(b, n, h, d)
    positions = torch.randint(0, 20, (2, b, n))
    out = lk.rope_2d(x, None, positions=positions)
    torch.testing.assert_close(out, hf_rope_2d(x, positions, 10000.0), atol=1e-5, rtol=1e-5)
    # the grid's own positions give the grid's rotation
    grid_pos = ref.grid_positions((3, 4), b)
    torch.testing.assert_close(lk.rope_2d(x, (3, 4), positions=grid_pos), lk.rope_2d(x, (3, 4)))


def test_rope_preserves_norm_and_dtype():
    x = torch.randn(1, 12, 2, 32, dtype=torch.float16)
    out = lk.rope_2d(x, (3, 4))
    assert out.dtype == torch.float16 and out.shape == x.shape
    torch.testing.assert_close(out.float().norm(dim=-1), x.float().norm(dim=-1), atol=1e-2, rtol=1e-3)


def test_rope_non_contiguous_input():
    x = torch.randn(2, 3, 12, 16).transpose(1, 2)  # (2, 12, 3, 16), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(lk.rope_2d(x, (3, 4)), lk.rope_2d(x.contiguous(), (3, 4)))


# --------------------------------------------------------------------------------------------------
# Attention against SDPA and per-head loops, float64


def sdpa(q, k, v, mask):
    """SDPA in float64 over (B, N, H, D) inputs; ``mask`` is (B, 1|Hq, Nq, Nk) additive or boolean."""
    hq, hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=1.0)
    return out.transpose(1, 2)


def loop_lse(logits):
    """LSE by an explicit loop over (b, h, i): max plus log-sum of shifted exps."""
    b, h, nq, _ = logits.shape
    lse = torch.empty(b, h, nq, dtype=logits.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                row = logits[bi, hi, i]
                row = row[row > -math.inf]
                lse[bi, hi, i] = -math.inf if row.numel() == 0 else row.max() + (row - row.max()).exp().sum().log()
    return lse


def einsum_logits(q, k, scale):
    group = q.shape[2] // k.shape[2]
    return scale * torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(group, dim=2))


def ctx_mask(ctx_lens, nq, nc):
    """Additive mask (B, 1, Nq, Nc): 0 on valid keys, -inf beyond ctx_lens."""
    valid = torch.arange(nc)[None, :] < ctx_lens[:, None]
    return torch.zeros(valid.shape, dtype=f64).masked_fill(~valid, -math.inf)[:, None, None, :].expand(-1, 1, nq, nc)


@pytest.mark.parametrize("b,nq,nc,hq,hkv,d", [(3, 63, 77, 6, 1, 32), (2, 77, 5, 4, 2, 64), (1, 16, 130, 2, 2, 8)])
def test_context_attention_matches_sdpa(b, nq, nc, hq, hkv, d):
    q, k, v = rand(b, nq, hq, d), rand(b, nc, hkv, d), rand(b, nc, hkv, d)
    lens = torch.randint(1, nc + 1, (b,))
    lens[0] = nc
    scale = d ** -0.5
    out, lse = lk.context_attention(q, k, v, lens)
    mask = ctx_mask(lens, nq, nc)
    torch.testing.assert_close(out, sdpa(q * scale, k, v, mask), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, loop_lse(einsum_logits(q, k, scale) + mask), atol=1e-12, rtol=1e-10)
    assert out.dtype == f64 and lse.shape == (b, hq, nq)


def test_context_attention_empty_rows():
    b, nq, nc, h, d = 3, 9, 7, 2, 16
    q, k, v = rand(b, nq, h, d), rand(b, nc, h, d), rand(b, nc, h, d)
    lens = torch.tensor([0, 7, 0])
    out, lse = lk.context_attention(q, k, v, lens)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    assert torch.isneginf(lse[[0, 2]]).all()
    ref_out, ref_lse = lk.context_attention(q[1:2], k[1:2], v[1:2])
    torch.testing.assert_close(out[1:2], ref_out)
    torch.testing.assert_close(lse[1:2], ref_lse)


def test_context_attention_padding_is_ignored():
    b, nq, nc, h, d = 2, 5, 8, 2, 16
    q, k, v = rand(b, nq, h, d), rand(b, nc, h, d), rand(b, nc, h, d)
    lens = torch.tensor([3, 8])
    out, lse = lk.context_attention(q, k, v, lens)
    k2, v2 = k.clone(), v.clone()
    k2[0, 3:] = 1e3
    v2[0, 3:] = float("nan")
    out2, lse2 = lk.context_attention(q, k2, v2, lens)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def residual_mask(q_prev, k_prev, gate, prev_scale):
    return torch.tanh(gate)[:, :, None, None] * einsum_logits(q_prev, k_prev, prev_scale)


@pytest.mark.parametrize("b,n,hq,hkv,d", [(2, 63, 6, 1, 32), (1, 77, 4, 2, 16), (2, 16, 2, 2, 64)])
def test_residual_attention_matches_sdpa(b, n, hq, hkv, d):
    q, k, v = rand(b, n, hq, d), rand(b, n, hkv, d), rand(b, n, hkv, d)
    qp, kp, gate = rand(b, n, hq, d), rand(b, n, hkv, d), rand(b, hq)
    scale, prev_scale = 0.3, 0.2
    out, lse = lk.residual_attention(q, k, v, q_prev=qp, k_prev=kp, gate=gate, scale=scale, prev_scale=prev_scale)
    mask = residual_mask(qp, kp, gate, prev_scale)
    torch.testing.assert_close(out, sdpa(q * scale, k, v, mask), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, loop_lse(einsum_logits(q, k, scale) + mask), atol=1e-12, rtol=1e-10)


def test_residual_attention_without_residual_and_zero_gate():
    b, n, h, d = 2, 20, 4, 16
    q, k, v = rand(b, n, h, d), rand(b, n, 2, d), rand(b, n, 2, d)
    out, lse = lk.residual_attention(q, k, v)
    torch.testing.assert_close(out, sdpa(q * d ** -0.5, k, v, None), atol=1e-12, rtol=1e-10)
    zero = lk.residual_attention(q, k, v, q_prev=rand(b, n, h, d), k_prev=rand(b, n, 2, d), gate=torch.zeros(b, h, dtype=f64))
    torch.testing.assert_close(zero[0], out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(zero[1], lse, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("b,grid,nc,hq,hkv,d", [(3, (7, 9), 11, 6, 1, 32), (2, (8, 8), 5, 2, 2, 64)])
def test_latte_attention_matches_sdpa_over_concatenated_keys(b, grid, nc, hq, hkv, d):
    n = grid[0] * grid[1]
    q, k, v = rand(b, n, hq, d), rand(b, n, hkv, d), rand(b, n, hkv, d)
    qp, kp, gate = rand(b, n, hq, d), rand(b, n, hkv, d), rand(b, hq)
    kc, vc = rand(b, nc, hkv, d), rand(b, nc, hkv, d)
    lens = torch.randint(0, nc + 1, (b,))
    lens[0] = 0  # a null-prompt row with no context at all
    out = lk.latte_attention(q, k, v, grid, k_ctx=kc, v_ctx=vc, ctx_lens=lens, q_prev=qp, k_prev=kp, gate=gate)

    rot = lambda t: lk.rope_2d(t, grid)  # noqa: E731  (checked against transformers above)
    scale = d ** -0.5
    keys, values = torch.cat([kc, rot(k)], 1), torch.cat([vc, v], 1)
    image_mask = residual_mask(rot(qp), rot(kp), gate, scale)  # (B, Hq, N, N)
    mask = torch.cat([ctx_mask(lens, n, nc).expand(-1, hq, -1, -1), image_mask], dim=-1)
    torch.testing.assert_close(out, sdpa(rot(q) * scale, keys, values, mask), atol=1e-12, rtol=1e-10)

    # the same through residual_attention's state and rope_grid: the definition in SPEC 2.6
    state = lk.context_attention(rot(q), kc, vc, lens)
    out2, lse2 = lk.residual_attention(q, k, v, q_prev=qp, k_prev=kp, gate=gate, state=state, rope_grid=grid)
    torch.testing.assert_close(out2, out, atol=1e-12, rtol=1e-10)
    full_logits = torch.cat([einsum_logits(rot(q), kc, scale), einsum_logits(rot(q), rot(k), scale)], -1) + mask
    torch.testing.assert_close(lse2, loop_lse(full_logits), atol=1e-12, rtol=1e-10)


def test_rope_grid_equals_rotating_beforehand():
    b, grid, h, d = 2, (3, 5), 2, 16
    n = 15
    q, k, v, qp, kp = rand(b, n, h, d), rand(b, n, h, d), rand(b, n, h, d), rand(b, n, h, d), rand(b, n, h, d)
    gate = rand(b, h)
    rot = lambda t: lk.rope_2d(t, grid)  # noqa: E731
    a = lk.residual_attention(q, k, v, q_prev=qp, k_prev=kp, gate=gate, rope_grid=grid)
    bb = lk.residual_attention(rot(q), rot(k), v, q_prev=rot(qp), k_prev=rot(kp), gate=gate)
    torch.testing.assert_close(a, bb, atol=1e-12, rtol=1e-10)


def test_merge_attention_states_is_softmax_over_union():
    b, nq, nk, h, d = 2, 7, 12, 3, 16
    q, k, v = rand(b, nq, h, d), rand(b, nk, h, d), rand(b, nk, h, d)
    full = lk.context_attention(q, k, v)
    part_a = lk.context_attention(q, k[:, :5], v[:, :5])
    part_b = lk.context_attention(q, k[:, 5:], v[:, 5:])
    out, lse = lk.merge_attention_states(*part_a, *part_b)
    torch.testing.assert_close(out, full[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, full[1], atol=1e-12, rtol=1e-10)


def test_merge_attention_states_empty_sides():
    b, n, h, d = 2, 4, 2, 8
    out_a, out_b = torch.randn(b, n, h, d), torch.randn(b, n, h, d)
    lse_a, lse_b = torch.randn(b, h, n), torch.randn(b, h, n)
    ninf = torch.full_like(lse_a, -math.inf)
    out, lse = lk.merge_attention_states(out_a, ninf, out_b, lse_b)
    assert torch.equal(out, out_b) and torch.equal(lse, lse_b)
    out, lse = lk.merge_attention_states(out_a, lse_a, out_b, ninf)
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)
    out, lse = lk.merge_attention_states(out_a, ninf, out_b, ninf)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# --------------------------------------------------------------------------------------------------
# Gradients (float64 gradcheck through every output, the LSE included)


def gradcheck(fn, *inputs):
    inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_rope():
    x = rand(2, 6, 2, 16)
    gradcheck(lambda x: lk.rope_2d(x, (2, 3)), x)
    positions = torch.randint(0, 9, (3, 2, 6))
    gradcheck(lambda x: lk.mrope(x, positions, mrope_section=(2, 3, 3)), x)


def test_gradcheck_merge():
    b, n, h, d = 1, 3, 2, 8
    gradcheck(lk.merge_attention_states, rand(b, n, h, d), rand(b, h, n), rand(b, n, h, d), rand(b, h, n))


def test_gradcheck_context_attention():
    b, nq, nc, hq, hkv, d = 2, 4, 5, 4, 2, 8
    lens = torch.tensor([3, 5])
    gradcheck(lambda q, k, v: lk.context_attention(q, k, v, lens), rand(b, nq, hq, d), rand(b, nc, hkv, d), rand(b, nc, hkv, d))


def test_gradcheck_residual_attention():
    b, n, hq, hkv, d = 1, 6, 4, 2, 8
    args = (rand(b, n, hq, d), rand(b, n, hkv, d), rand(b, n, hkv, d), rand(b, n, hq, d), rand(b, n, hkv, d), rand(b, hq),
            rand(b, n, hq, d), rand(b, hq, n))

    def fn(q, k, v, qp, kp, g, oc, lc):
        return lk.residual_attention(q, k, v, q_prev=qp, k_prev=kp, gate=g, state=(oc, lc), rope_grid=(2, 3))

    gradcheck(fn, *args)


def test_gradcheck_latte_attention():
    b, grid, nc, hq, hkv, d = 2, (2, 2), 3, 2, 1, 8
    n = 4
    lens = torch.tensor([0, 2])

    def fn(q, k, v, kc, vc, qp, kp, g):
        return lk.latte_attention(q, k, v, grid, k_ctx=kc, v_ctx=vc, ctx_lens=lens, q_prev=qp, k_prev=kp, gate=g)

    gradcheck(fn, rand(b, n, hq, d), rand(b, n, hkv, d), rand(b, n, hkv, d), rand(b, nc, hkv, d), rand(b, nc, hkv, d),
              rand(b, n, hq, d), rand(b, n, hkv, d), rand(b, hq))


def test_empty_context_rows_get_zero_gradient():
    q, k, v = rand(2, 3, 2, 8).requires_grad_(), rand(2, 4, 2, 8).requires_grad_(), rand(2, 4, 2, 8).requires_grad_()
    out, _ = lk.context_attention(q, k, v, torch.tensor([0, 4]))
    out.sum().backward()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0])) and torch.equal(k.grad[0], torch.zeros_like(k.grad[0]))
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()


# --------------------------------------------------------------------------------------------------
# Bad inputs: each class raises the right exception, naming the argument


def _qkv(b=2, n=12, hq=4, hkv=2, d=16):
    return torch.randn(b, n, hq, d), torch.randn(b, n, hkv, d), torch.randn(b, n, hkv, d)


def _bad_calls():
    q, k, v = _qkv()
    kc, vc = torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    qp, kp, g = torch.randn_like(q), torch.randn_like(k), torch.randn(2, 4)
    lens = torch.tensor([1, 5])
    R = lk.residual_attention
    return [
        # rank, type
        ("3-dim q", lambda: R(q[0], k, v), ValueError, "q must have 4 dimensions"),
        ("list q", lambda: R(q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
        ("int q", lambda: R(q.long(), k, v), TypeError, "q must have dtype"),
        # mismatches
        ("batch", lambda: R(q, k[:1], v[:1]), ValueError, "k has batch size 1"),
        ("head_dim", lambda: R(q, k[..., :8], v[..., :8]), ValueError, "k has head_dim 8"),
        ("dtype", lambda: R(q, k.half(), v.half()), TypeError, "k has dtype torch.float16"),
        ("v length", lambda: R(q, k, v[:, :5]), ValueError, "v has sequence length 5"),
        ("v heads", lambda: R(q, k, torch.randn(2, 12, 1, 16)), ValueError, "v has head count 1"),
        ("gqa", lambda: R(torch.randn(2, 12, 3, 16), k, v), ValueError, "Hq % Hkv"),
        ("head_dim 12", lambda: R(*_qkv(d=12)), ValueError, "multiple of 8"),
        ("head_dim 264", lambda: R(*_qkv(d=264)), ValueError, "multiple of 8 in \\[8, 256\\]"),
        ("empty", lambda: R(*_qkv(n=0)), ValueError, "non-empty"),
        ("head_dim 0", lambda: R(*_qkv(d=0)), ValueError, "non-empty"),  # not a ZeroDivisionError (default scale)
        # residual triple
        ("q_prev alone", lambda: R(q, k, v, q_prev=qp), ValueError, "without k_prev, gate"),
        ("no gate", lambda: R(q, k, v, q_prev=qp, k_prev=kp), ValueError, "without gate"),
        ("gate shape", lambda: R(q, k, v, q_prev=qp, k_prev=kp, gate=g[:, :2]), ValueError, "gate must have shape"),
        ("q_prev shape", lambda: R(q, k, v, q_prev=qp[:, :5], k_prev=kp, gate=g), ValueError, "q_prev must have the shape"),
        ("k_prev dtype", lambda: R(q, k, v, q_prev=qp, k_prev=kp.half(), gate=g), TypeError, "k_prev has dtype"),
        # state, grid, scale
        ("state arity", lambda: R(q, k, v, state=(q,)), TypeError, "state must be a pair"),
        ("state lse shape", lambda: R(q, k, v, state=(q, torch.randn(2, 12, 4))), ValueError, "lse_c"),
        ("state lse dtype", lambda: R(q, k, v, state=(q, torch.randn(2, 4, 12).half())), TypeError, "lse_c"),
        ("rope_grid", lambda: R(q, k, v, rope_grid=(3, 5)), ValueError, "rope_grid=\\(3, 5\\) holds 15 tokens"),
        ("rope_grid type", lambda: R(q, k, v, rope_grid=12), TypeError, "rope_grid must be a \\(gh, gw\\) pair"),
        ("scale", lambda: R(q, k, v, scale="x"), TypeError, "scale must be a float"),
        ("scale nan", lambda: R(q, k, v, scale=float("nan")), ValueError, "scale must be finite"),
        ("theta", lambda: R(q, k, v, rope_theta=-1.0), ValueError, "rope_theta must be a finite positive"),
        # context attention
        ("ctx_lens range", lambda: lk.context_attention(q, kc, vc, torch.tensor([1, 6])), ValueError, "ctx_lens values must lie in \\[0, Nc=5\\]"),
        ("ctx_lens negative", lambda: lk.context_attention(q, kc, vc, torch.tensor([-1, 2])), ValueError, "ctx_lens values"),
        ("ctx_lens dtype", lambda: lk.context_attention(q, kc, vc, lens.float()), TypeError, "ctx_lens must have dtype"),
        ("ctx_lens shape", lambda: lk.context_attention(q, kc, vc, lens[:1]), ValueError, "ctx_lens must have shape"),
        ("ctx_lens device", lambda: lk.context_attention(q, kc, vc, lens.to("meta")), ValueError, "ctx_lens is on meta"),
        ("k_ctx heads", lambda: lk.context_attention(q, torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16)), ValueError, "Hq % Hkv"),
        # rope
        ("rope N", lambda: lk.rope_2d(q, (3, 5)), ValueError, "grid_hw=\\(3, 5\\) holds 15 tokens but x has 12"),
        ("rope grid values", lambda: lk.rope_2d(q, (0, 12)), ValueError, "grid_hw must hold two positive ints"),
        ("rope positions shape", lambda: lk.rope_2d(q, None, positions=torch.zeros(2, 2, 5, dtype=torch.long)), ValueError, "positions must have shape"),
        ("rope positions dtype", lambda: lk.rope_2d(q, None, positions=torch.zeros(2, 2, 12)), TypeError, "positions must have dtype"),
        ("mrope section", lambda: lk.mrope(q, torch.zeros(3, 2, 12, dtype=torch.long), mrope_section=(2, 3, 4)), ValueError, "sums to 9"),
        ("mrope positions", lambda: lk.mrope(q, torch.zeros(2, 2, 12, dtype=torch.long), mrope_section=(2, 3, 3)), ValueError, "positions must have shape \\(3"),
        # merge
        ("merge shape", lambda: lk.merge_attention_states(q, torch.randn(2, 4, 12), q[:, :5], torch.randn(2, 4, 5)), ValueError, "out_b has shape"),
        ("merge lse", lambda: lk.merge_attention_states(q, torch.randn(2, 12, 4), q, torch.randn(2, 4, 12)), ValueError, "lse_a must have shape"),
        ("merge dtype", lambda: lk.merge_attention_states(q, torch.randn(2, 4, 12), q.half(), torch.randn(2, 4, 12)), TypeError, "out_b has dtype"),
        # latte attention
        ("latte grid", lambda: lk.latte_attention(q, k, v, (2, 5), k_ctx=kc, v_ctx=vc), ValueError, "grid_hw"),
        ("latte k_ctx dtype", lambda: lk.latte_attention(q, k, v, (3, 4), k_ctx=kc.half(), v_ctx=vc.half()), TypeError, "k_ctx has dtype"),
        ("latte gate alone", lambda: lk.latte_attention(q, k, v, (3, 4), k_ctx=kc, v_ctx=vc, gate=g), ValueError, "without q_prev, k_prev"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_inputs_raise(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("op", ["residual_attention", "context_attention"])
def test_reference_module_validates_too(op):
    q, k, v = _qkv(d=12)
    with pytest.raises(ValueError, match="multiple of 8"):
        getattr(ref, op)(q, k, v)
