"""Per-layer norm rules (raygd/diversity/rules.py): exact per-example norms and B_D of the layers
transformers use, against a brute-force loop of one backward per example in float64; which route each
layer takes; the torch.func fallback; the registry; DropConnect masks on sequence inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from raygd import diversity as D
from raygd.diversity import exact as exact_module
from raygd.diversity import per_example as per_example_module
from raygd.diversity import rules as rules_module
from raygd.loss import example_losses, mean_loss
from raygd.mechanisms.dropconnect_linear import dropconnect_masks

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many tiny ops: one thread is faster, and steady when other processes load the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def registry():
    """``NORM_RULES`` as it was, restored after the test (registrations are global)."""
    saved = dict(D.NORM_RULES)
    yield D.NORM_RULES
    D.NORM_RULES.clear()
    D.NORM_RULES.update(saved)


# --------------------------------------------------------------------------- references


def as_f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(F64) if x.is_floating_point() else x


def brute_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, d) float64 per-example gradients ∇f_i, f_i = ``example_losses`` of one example: one backward each."""
    m = copy.deepcopy(model).to(F64)
    params = [p for p in m.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = example_losses(m(as_f64(x[i : i + 1])), y[i : i + 1])[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- models


class Attention(nn.Module):
    """Causal self-attention from nn.Linear qkv and output projections and SDPA."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, norm: type[nn.Module]):
        super().__init__()
        self.ln1, self.attn, self.ln2 = norm(d), Attention(d, heads), norm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Decoder(nn.Module):
    """Token + positional Embedding, pre-norm blocks, final norm, Linear head to [N, T, V].

    positions: "batched" (arange(T).expand(N, T)), "1d" (arange(T), nanoGPT) or "row" (arange(T)[None], minGPT).
    """

    def __init__(self, vocab=11, d=8, heads=2, context=7, layers=1, positions="batched", norm=nn.LayerNorm, tie=False):
        super().__init__()
        self.positions = positions
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads, norm) for _ in range(layers)])
        self.ln, self.head = norm(d), nn.Linear(d, vocab)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, t = ids.shape
        pos = torch.arange(t, device=ids.device)
        pos = {"batched": pos.expand(n, t), "1d": pos, "row": pos[None]}[self.positions]
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(pos))))


class SeqNet(nn.Module):
    """One nn.Linear on (N, ..., p) inputs, tanh, a classifier on the flattened result."""

    def __init__(self, shape: tuple[int, ...], q: int):
        super().__init__()
        positions = 1
        for s in shape[:-1]:
            positions *= s
        self.seq, self.out = nn.Linear(shape[-1], q), nn.Linear(positions * q, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.seq(x)).flatten(1))


class Pooled(nn.Module):
    """Embedding (with padding_idx) -> layer -> mean over positions -> Linear: a sequence classifier."""

    def __init__(self, norm: nn.Module, vocab=9, d=6):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(vocab, d, padding_idx=0), norm, nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.emb(ids))).mean(1))


class Gain(nn.Module):
    """y = x ⊙ gain: a layer of the user's own with its own nn.Parameter (no built-in rule)."""

    def __init__(self, d: int):
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def gain_norms(layer, inputs, grad_output, params):
    """‖Σ_t x_t ⊙ δ_t‖² per example: the rule a user registers for ``Gain``."""
    (x,) = inputs
    return (x * grad_output).reshape(x.shape[0], -1, x.shape[-1]).sum(1).square().sum(1)


def tokens(n: int, t: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, T] with repeats (and the padding id 0) and next-token labels [N, T]."""
    return torch.randint(vocab, (n, t)), torch.randint(vocab, (n, t))


def decoder(n=6, t=5, **kwargs):
    model = Decoder(**kwargs)
    return model, *tokens(n, t, 11)


def pooled(norm: nn.Module, n=7):
    ids, _ = tokens(n, 6, 9)
    ids[:, -2:] = 0  # padded tails
    return Pooled(norm), ids, torch.randint(3, (n,))


def seq(shape: tuple[int, ...], q: int, n=8):
    return SeqNet(shape, q), torch.randn(n, *shape), torch.randint(3, (n,))


LINEAR = "ghost:linear"
# (case, builder, expected routes of some layers); every layer of these models takes a ghost route
GHOST_CASES = [
    ("linear_3d_gram", lambda: seq((3, 16), 16), {"seq": LINEAR, "out": LINEAR}),
    ("linear_3d_per_example", lambda: seq((20, 4), 4), {"seq": LINEAR}),
    ("linear_4d_input", lambda: seq((2, 3, 5), 4), {"seq": LINEAR}),
    ("embedding_padding_layer_norm", lambda: pooled(nn.LayerNorm(6)), {"emb": "ghost:embedding"}),
    ("layer_norm_no_bias", lambda: pooled(nn.LayerNorm(6, bias=False)), {"norm": "ghost:layer_norm"}),
    ("layer_norm_over_two_dims", lambda: pooled(nn.LayerNorm((6, 6), eps=1e-3)), {"norm": "ghost:layer_norm"}),
    ("rms_norm", lambda: pooled(nn.RMSNorm(6)), {"norm": "ghost:rms_norm"}),
    ("rms_norm_default_eps", lambda: pooled(nn.RMSNorm(6, eps=None)), {"norm": "ghost:rms_norm"}),
    (
        "decoder_block",
        decoder,
        {
            "tok": "ghost:embedding",
            "pos": "ghost:embedding",
            "blocks.0.ln1": "ghost:layer_norm",
            "blocks.0.attn.qkv": LINEAR,
            "blocks.0.mlp.0": LINEAR,
            "head": LINEAR,
        },
    ),
    ("decoder_positions_1d", lambda: decoder(positions="1d"), {"pos": "ghost:embedding"}),
    ("decoder_positions_row", lambda: decoder(positions="row"), {"pos": "ghost:embedding"}),
    ("decoder_rms_norm_2_layers", lambda: decoder(norm=nn.RMSNorm, layers=2), {"ln": "ghost:rms_norm"}),
]


@pytest.mark.parametrize("case,build,expected", GHOST_CASES, ids=[c[0] for c in GHOST_CASES])
def test_ghost_rules_match_a_per_example_loop(case, build, expected, monkeypatch):
    torch.manual_seed(0)
    model, x, y = build()
    routes = D.norm_routes(model)
    assert {k: routes[k] for k in expected} == expected
    assert "fallback" not in routes.values()
    monkeypatch.setattr(per_example_module, "_func_sq_norms", lambda *a: pytest.fail("torch.func fallback ran"))
    g = brute_grads(model, x, y)
    got = D.gradient_diversity(model, x, y, batch_size=4, dtype=F64)  # 2 batches
    n = x.shape[0]
    brute = float(g.square().sum() / g.sum(0).square().sum())
    assert got.n == n and rel(got.batch_bound, n * brute) < 1e-9
    params, buffers = D.functional_state(model, F64)
    sq, summed = D.per_example_sq_norms(model, as_f64(x), y, params=params, buffers=buffers)
    assert torch.allclose(sq, g.square().sum(1), rtol=1e-9, atol=0)
    assert torch.allclose(torch.cat([s.reshape(-1) for s in summed]), g.sum(0), rtol=1e-9, atol=1e-12)
    # A training step (float32, mean loss): the same norms, the same gradients as without GhostNorms.
    mean_loss(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with D.GhostNorms(model) as ghost:
        mean_loss(model(x), y).backward()
    assert ghost.fallback_layers == [] and ghost.fallback_parameters() == []
    assert torch.allclose(ghost.sq_norms() * n**2, g.square().sum(1), rtol=1e-4, atol=0)
    for p, want in zip(model.parameters(), plain, strict=True):
        assert torch.allclose(p.grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("route", ["gram", "per_example"])
@pytest.mark.parametrize("shape,natural", [((3, 16), "gram"), ((20, 4), "per_example")])
def test_both_routes_of_a_sequence_linear_agree(shape, natural, route, monkeypatch):
    """Each shape takes the route its FLOPs choose; forcing the other gives the same norms and gradients."""
    torch.manual_seed(1)
    model, x, y = seq(shape, shape[-1])
    assert D.ghost_route(shape[0], shape[-1], shape[-1], "linear") == natural
    params, buffers = D.functional_state(model, F64)
    want = D.per_example_sq_norms(model, x.to(F64), y, params=params, buffers=buffers)
    gram_calls = []
    gram = rules_module._gram_sq_norms
    monkeypatch.setattr(rules_module, "_gram_sq_norms", lambda a, d: gram_calls.append(a.shape) or gram(a, d))
    monkeypatch.setattr(rules_module, "ghost_route", lambda *a, **k: route)
    sq, summed = D.per_example_sq_norms(model, x.to(F64), y, params=params, buffers=buffers)
    assert bool(gram_calls) == (route == "gram")
    assert torch.allclose(sq, want[0], rtol=1e-12, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(summed, want[1], strict=True))
    assert torch.allclose(sq, brute_grads(model, x, y).square().sum(1), rtol=1e-9, atol=0)


def test_embedding_rule_is_the_sum_over_equal_ids():
    """Σ_{t,s}[id_t = id_s](δ_t·δ_s), padding rows excluded, against the dense per-example weight gradient."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 1, 0, 1], [3, 3, 3, 3, 3], [0, 0, 4, 2, 4]])
    grad = torch.randn(3, 5, 4, dtype=F64)
    for padding_idx in (None, 0):
        dense = torch.zeros(3, 6, 4, dtype=F64)
        for i, t in torch.cartesian_prod(torch.arange(3), torch.arange(5)).tolist():
            if ids[i, t] != padding_idx:
                dense[i, ids[i, t]] += grad[i, t]
        got = rules_module.embedding_sq_norms(ids, grad, 6, padding_idx)
        assert torch.allclose(got, dense.square().sum((1, 2)), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- fallback


class MHA(nn.Module):
    """nn.MultiheadAttention uses its out_proj's weight directly, never out_proj's forward."""

    def __init__(self, d=6):
        super().__init__()
        self.emb, self.attn, self.head = (
            nn.Embedding(9, d),
            nn.MultiheadAttention(d, 2, batch_first=True),
            nn.Linear(d, 9),
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        return self.head(self.attn(x, x, x, need_weights=False)[0])


class Transpose(nn.Module):
    """(N, T, C) <-> (N, C, T), for GroupNorm over the channels of a sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class WithGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.gain, self.head = nn.Embedding(9, 6), Gain(6), nn.Linear(6, 9)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.gain(self.emb(ids)))


# (case, builder, {layer: route} of the layers that must fall back, and of some that must not)
FALLBACK_CASES = [
    ("unknown_layer", lambda: (WithGain(), *tokens(6, 5, 9)), {"gain": "fallback", "emb": "ghost:embedding"}),
    ("group_norm", lambda: pooled(nn.Sequential(Transpose(), nn.GroupNorm(2, 6), Transpose())), {"norm.1": "fallback"}),
    ("weight_tying", lambda: decoder(tie=True), {"tok": "fallback", "head": "fallback", "pos": "ghost:embedding"}),
    ("multihead_attention", lambda: (MHA(), *tokens(5, 4, 9)), {"attn": "fallback", "attn.out_proj": "fallback"}),
]


@pytest.mark.parametrize("case,build,expected", FALLBACK_CASES, ids=[c[0] for c in FALLBACK_CASES])
def test_layers_without_a_rule_fall_back_are_listed_and_stay_exact(case, build, expected):
    torch.manual_seed(0)
    model, x, y = build()
    routes = D.norm_routes(model)
    assert {k: routes[k] for k in expected} == expected
    ghost = D.GhostNorms(model)
    fallen = sorted(k for k, v in expected.items() if v == "fallback")
    assert sorted(ghost.fallback_layers) == fallen and ghost.uncovered
    if case == "weight_tying":
        assert "weight tying" in ghost.fallback_reasons["head"]
    g = brute_grads(model, x, y)
    got = D.gradient_diversity(model, x, y, dtype=F64)
    assert rel(got.batch_bound, x.shape[0] * float(g.square().sum() / g.sum(0).square().sum())) < 1e-9
    params, buffers = D.functional_state(model, F64)
    assert torch.allclose(D.per_example_sq_norms(model, x, y, params=params, buffers=buffers)[0], g.square().sum(1))


class Shifted(Decoder):
    """Positions 1..T: 1-D ids of length T that are neither the model's input nor arange(T)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(torch.arange(1, ids.shape[1] + 1)))))


def test_positions_arange_of_the_batch_length_keep_the_ghost_path():
    torch.manual_seed(0)
    model, x, y = decoder(n=5, t=5, positions="1d")  # T = N: arange(T) is recognised as positions
    with D.GhostNorms(model) as ghost:
        example_losses(model(x), y).sum().backward()
    assert ghost.fallback_layers == []
    assert torch.allclose(ghost.sq_norms(), brute_grads(model, x, y).square().sum(1), rtol=1e-4, atol=0)


def test_ambiguous_one_dimensional_ids_fall_back_at_run_time():
    """1-D ids of length N that are not arange(N): one id per example, or positions? Ambiguous, so torch.func
    measures them; the strict context (the in-step estimator) says so and what works instead."""
    torch.manual_seed(0)
    model, (x, y) = Shifted(context=8), tokens(5, 5, 11)
    refusal = r"'pos' \(Embedding\).*arange\(T\)\[None\].*diversity_estimator=free"
    with pytest.raises(D.GhostUnsupported, match=refusal), D.GhostNorms(model):
        model(x)
    ghost = D.GhostNorms(model, on_unsupported="fallback")
    with ghost:
        mean_loss(model(x), y).backward()
    assert ghost.fallback_layers == ["pos"] and ghost.fallback_parameters() == ["pos.weight"]
    params, buffers = D.functional_state(model, F64)
    sq, _ = D.per_example_sq_norms(model, x, y, params=params, buffers=buffers)
    assert torch.allclose(sq, brute_grads(model, x, y).square().sum(1), rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- registry


def test_a_registered_rule_is_used_instead_of_the_fallback_and_is_exact(registry, monkeypatch):
    torch.manual_seed(0)
    model, (x, y) = WithGain(), tokens(6, 5, 9)
    calls = []

    @D.register_norm_rule(Gain)
    def gain_rule(layer, inputs, grad_output, params):
        calls.append(sorted(params))
        return gain_norms(layer, inputs, grad_output, params)

    assert D.norm_routes(model)["gain"] == "ghost:gain_rule" and D.GhostNorms(model).uncovered == []
    monkeypatch.setattr(per_example_module, "_func_sq_norms", lambda *a: pytest.fail("torch.func fallback ran"))
    g = brute_grads(model, x, y)
    params, buffers = D.functional_state(model, F64)
    sq, _ = D.per_example_sq_norms(model, x, y, params=params, buffers=buffers)
    assert calls == [["gain"]]
    assert torch.allclose(sq, g.square().sum(1), rtol=1e-9, atol=0)
    model.gain.gain.requires_grad_(False)  # a frozen parameter is not passed, nor measured
    assert D.norm_routes(model).get("gain") is None
    del calls[:]
    assert rel(D.gradient_diversity(model, x, y, dtype=F64).delta, _delta(brute_grads(model, x, y))) < 1e-9
    assert calls == []


def _delta(g: torch.Tensor) -> float:
    return float(g.square().sum() / g.sum(0).square().sum())


@pytest.mark.parametrize("layer_type", [nn.LayerNorm, nn.Linear])
def test_registering_a_built_in_type_replaces_its_rule(registry, layer_type):
    torch.manual_seed(0)
    model, x, y = decoder()
    builtin = registry[layer_type].fn
    calls = []

    def mine(layer, inputs, grad_output, params):
        calls.append(type(layer))
        return builtin(layer, inputs, grad_output, params)

    D.register_norm_rule(layer_type, name="mine")(mine)
    routes = D.norm_routes(model)
    assert routes["blocks.0.ln1" if layer_type is nn.LayerNorm else "head"] == "ghost:mine"
    ghost = D.GhostNorms(model)
    assert bool(ghost.fused) == (layer_type is nn.LayerNorm)  # a user's Linear rule runs from a hook
    got = D.gradient_diversity(model, x, y, dtype=F64)
    assert calls and set(calls) == {layer_type}
    assert rel(got.delta, _delta(brute_grads(model, x, y))) < 1e-9


# --------------------------------------------------------------------------- refusals and DropConnect


def test_batchnorm_in_train_mode_names_the_layer_and_what_still_works():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(
        ValueError,
        match=r"'1' \(BatchNorm1d\) is in train mode.*model\.eval\(\).*LayerNorm.*"
        r"train\.diversity_estimator=free \(P > 1",
    ):
        D.gradient_diversity(model, torch.randn(6, 4), torch.randint(3, (6,)))


def _brute_masked_draw(model: nn.Module, x, y, p: float, group: int, generator) -> tuple[float, torch.Tensor]:
    """Σ‖g_i^DC‖², Σ g_i^DC by a loop: example i at M_k ∘ W (every position), g_i = M_k ∘ ∇f_i(M_k ∘ W)."""
    params = {n: t.detach().to(F64) for n, t in model.named_parameters()}
    masked = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    groups = -(-x.shape[0] // group)
    drawn = {n: dropconnect_masks((groups, *params[n].shape), p, generator, F64) for n in masked}
    total, summed = 0.0, None
    for i in range(x.shape[0]):
        leaves = {n: t.clone().requires_grad_() for n, t in params.items()}
        at = {n: leaves[n] * drawn[n][i // group] if n in drawn else leaves[n] for n in leaves}
        loss = example_losses(functional_call(model, at, (as_f64(x[i : i + 1]),)), y[i : i + 1])[0]
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(leaves.values()))])
        total += float(g @ g)
        summed = g if summed is None else summed + g
    assert summed is not None
    return total, summed


@pytest.mark.parametrize("group", [1, 3, 40])
def test_dropconnect_masks_on_sequences_are_shared_by_the_positions_of_an_example(group, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 5), nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 9))
    x, y = tokens(10, 4, 9)
    ghost_draws = []
    draw = exact_module._dropconnect_draw_ghost
    monkeypatch.setattr(exact_module, "_dropconnect_draw_ghost", lambda *a: ghost_draws.append(1) or draw(*a))
    got = D.dropconnect_draw(model, x, y, 0.4, group, torch.Generator().manual_seed(3), dtype=F64)
    want = _brute_masked_draw(model, x, y, 0.4, group, torch.Generator().manual_seed(3))
    assert ghost_draws == [1]  # the masked ghost kernels, no torch.func
    assert got[0] == pytest.approx(want[0], rel=1e-9)
    assert torch.allclose(got[1], want[1], rtol=1e-9, atol=1e-12)
