"""pading.model.generator: shapes, stochasticity, gradients (tiny dims, CPU)."""

import math
import os
import signal
import threading

import pytest
import torch

from pading.config import GeneratorConfig
from pading.errors import ConfigError, DataError
from pading.model.generator import GMMNGenerator, PrimitiveGenerator, build_generator
from pading.model.losses import mmd_loss

SEMANTIC_DIM, EMBED_DIM, NUM_PRIMITIVES = 8, 16, 8
SIGMAS_SQUARED = (2.0, 5.0, 10.0)




def _config(**overrides) -> GeneratorConfig:
    settings = dict(num_primitives=NUM_PRIMITIVES, num_layers=2, num_heads=4, feedforward_dim=32, gmmn_hidden_dim=32)
    settings.update(overrides)
    return GeneratorConfig(**settings)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_primitive_generator_shapes():
    generator = PrimitiveGenerator(SEMANTIC_DIM, EMBED_DIM, _config())
    semantic = torch.randn(5, SEMANTIC_DIM)
    out = generator(semantic)
    assert out.shape == (5, EMBED_DIM)
    assert torch.isfinite(out).all()
    assert generator.project(torch.randn(3, SEMANTIC_DIM)).shape == (3, EMBED_DIM)
    assert generator.primitives.shape == (NUM_PRIMITIVES, EMBED_DIM)
    # final LayerNorm with its initial affine: zero mean, unit variance per sample
    assert torch.allclose(out.mean(dim=1), torch.zeros(5), atol=1e-5)


def test_primitive_generator_noise_is_the_stochastic_input():
    generator = PrimitiveGenerator(SEMANTIC_DIM, EMBED_DIM, _config()).eval()  # no dropout
    semantic = torch.randn(4, SEMANTIC_DIM)
    first, second = generator(semantic), generator(semantic)
    assert not torch.allclose(first, second)  # fresh noise draws differ
    noise = torch.randn(generator.num_layers, 4, EMBED_DIM)
    assert torch.allclose(generator(semantic, noise), generator(semantic, list(noise)))
    seeded = [generator(semantic, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.allclose(seeded[0], seeded[1])
    silent = PrimitiveGenerator(SEMANTIC_DIM, EMBED_DIM, _config(noise_std=0.0)).eval()
    assert torch.allclose(silent(semantic), silent(semantic))


def test_primitive_generator_rows_are_independent():
    """A sample's output depends only on its own semantics (self-attention over one token)."""
    generator = PrimitiveGenerator(SEMANTIC_DIM, EMBED_DIM, _config()).eval()
    semantic = torch.randn(3, SEMANTIC_DIM)
    noise = torch.randn(generator.num_layers, 3, EMBED_DIM)
    together = generator(semantic, noise)
    alone = generator(semantic[1:2], noise[:, 1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)


def test_primitive_generator_gradients_from_mmd():
    generator = PrimitiveGenerator(SEMANTIC_DIM, EMBED_DIM, _config())
    real = torch.randn(6, EMBED_DIM) + 1.0
    loss = mmd_loss(generator(torch.randn(6, SEMANTIC_DIM)), real, SIGMAS_SQUARED)
    loss.backward()
    assert generator.primitives.grad is not None and generator.primitives.grad.abs().sum() > 0
    assert generator.semantic_projection.weight.grad.abs().sum() > 0
    for parameter in generator.parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all()


def test_primitive_generator_rejects_bad_input():
    generator = PrimitiveGenerator(SEMANTIC_DIM, EMBED_DIM, _config())
    with pytest.raises(DataError, match="semantic"):
        generator(torch.randn(2, SEMANTIC_DIM + 1))
    with pytest.raises(DataError, match="noise"):
        generator(torch.randn(2, SEMANTIC_DIM), [torch.randn(2, EMBED_DIM)])  # one draw for two layers
    with pytest.raises(ConfigError, match="num_heads"):
        PrimitiveGenerator(SEMANTIC_DIM, 18, _config())


def test_gmmn_generator_shapes_noise_and_gradients():
    generator = GMMNGenerator(SEMANTIC_DIM, EMBED_DIM, _config())
    semantic = torch.randn(6, SEMANTIC_DIM)
    out = generator(semantic)
    assert out.shape == (6, EMBED_DIM)
    generator.eval()
    assert not torch.allclose(generator(semantic), generator(semantic))
    noise = torch.randn(6, SEMANTIC_DIM)
    assert torch.allclose(generator(semantic, noise), generator(semantic, noise))
    generator.train()
    loss = mmd_loss(generator(semantic), torch.randn(6, EMBED_DIM) + 1.0, SIGMAS_SQUARED)
    loss.backward()
    assert generator.mlp[0].weight.grad.abs().sum() > 0
    assert generator.mlp[-1].weight.grad.abs().sum() > 0
    # the alignment projection is fixed: a buffer, the same for every instance
    projected = generator.project(torch.randn(3, SEMANTIC_DIM))
    assert projected.shape == (3, EMBED_DIM)
    assert "fixed_projection" in dict(generator.named_buffers())
    other = GMMNGenerator(SEMANTIC_DIM, EMBED_DIM, _config())
    assert torch.equal(generator.fixed_projection, other.fixed_projection)


def test_build_generator_dispatches_on_kind():
    assert isinstance(build_generator(_config(kind="primitive"), SEMANTIC_DIM, EMBED_DIM), PrimitiveGenerator)
    assert isinstance(build_generator(_config(kind="gmmn"), SEMANTIC_DIM, EMBED_DIM), GMMNGenerator)


def _layer_norm(values):
    """LayerNorm with unit weight and zero bias, written out: (v - mean) / sqrt(var + 1e-5)."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return [(v - mean) / (variance + 1e-5) ** 0.5 for v in values]


def test_noise_enters_the_cross_attention_residual_before_its_layer_norm():
    """The authors' release adds the noise to token + CrossAttn(token) and only then applies
    the cross-attention LayerNorm. A layer with zeroed attention/FFN weights and a constant
    cross-attention output c makes the expected output a chain of written-out LayerNorms:
    out = LN(LN(LN(t) + c + z)); noise after the LayerNorm would give LN(LN(t) + c) + z instead."""
    from pading.model.generator import PrimitiveDecoderLayer

    layer = PrimitiveDecoderLayer(embed_dim=4, num_heads=1, feedforward_dim=8, dropout=0.0).eval()
    with torch.no_grad():
        for param in layer.parameters():
            param.zero_()
        for norm in (layer.self_attention_norm, layer.cross_attention_norm, layer.feedforward_norm):
            norm.weight.fill_(1.0)
        layer.cross_attention.out_proj.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 6.0]))  # c
    token, noise = [1.0, 2.0, 3.0, 4.0], [0.0, 10.0, 0.0, 0.0]
    out = layer(torch.tensor([token]), torch.zeros(3, 4), torch.tensor([noise]))[0].tolist()

    after_self = _layer_norm(token)  # self-attention output is zero
    c = [0.0, 0.0, 0.0, 6.0]
    release = _layer_norm(_layer_norm([x + ci + z for x, ci, z in zip(after_self, c, noise)]))
    assert out == pytest.approx(release, abs=1e-5)
    noise_after_norm = _layer_norm([a + z for a, z in zip(_layer_norm([x + ci for x, ci in zip(after_self, c)]), noise)])
    assert max(abs(a - b) for a, b in zip(out, noise_after_norm)) > 0.1  # the two placements differ here


@torch.no_grad()
def test_the_written_out_attention_gives_what_multihead_attention_gives():
    """PrimitiveDecoderLayer computes its attention blocks itself (the self-attention over a
    single token without its query and key projections, the cross-attention with a cheaper
    dropout mask) from nn.MultiheadAttention's parameters. Without dropout it must give that
    module's outputs; with dropout, their mean over many draws."""
    from pading.model.generator import PrimitiveDecoderLayer

    layer = PrimitiveDecoderLayer(embed_dim=32, num_heads=4, feedforward_dim=8, dropout=0.25).eval()
    for attention in (layer.self_attention, layer.cross_attention):
        attention.in_proj_bias.normal_()  # non-zero biases, so that a dropped bias would show
        attention.out_proj.bias.normal_()
    token, primitives = torch.randn(6, 32), torch.randn(11, 32)
    reference_self = layer.self_attention(token[:, None], token[:, None], token[:, None], need_weights=False)[0][:, 0]
    reference_cross = layer.cross_attention(token[None], primitives[None], primitives[None], need_weights=False)[0][0]
    assert torch.allclose(layer._attend_to_itself(token), reference_self, atol=1e-6)
    assert torch.allclose(layer._attend_to_primitives(token, primitives), reference_cross, atol=1e-6)

    layer.train()
    draws = torch.stack([layer._attend_to_primitives(token, primitives) for _ in range(4000)])
    assert not torch.allclose(draws[0], reference_cross, atol=1e-3)  # dropout is on in training
    assert torch.allclose(draws.mean(0), reference_cross, atol=0.05 * float(reference_cross.abs().max()))
    own = torch.stack([layer._attend_to_itself(token) for _ in range(4000)])
    assert torch.allclose(own.mean(0), reference_self, atol=0.05 * float(reference_self.abs().max()))


def test_the_dropout_mask_keeps_each_element_with_probability_one_minus_p():
    from pading.model.dropout import Dropout, dropout_mask

    mask = dropout_mask(torch.empty(200_000), 0.1)
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert (mask == 0).float().mean().item() == pytest.approx(0.1, abs=0.003)  # ~5 std of the estimate
    torch.manual_seed(3)
    first = dropout_mask(torch.empty(50), 0.5)
    torch.manual_seed(3)
    assert torch.equal(first, dropout_mask(torch.empty(50), 0.5))  # drawn from torch's seeded generator
    half = dropout_mask(torch.empty(200_000, dtype=torch.float16), 0.1)
    assert half.dtype == torch.float16 and (half == 0).float().mean().item() == pytest.approx(0.1, abs=0.003)
    layer, x = Dropout(0.3), torch.randn(10)
    assert torch.equal(layer.eval()(x), x)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        Dropout(1.0)


@pytest.mark.parametrize("ahead", [0, 50, 5000])
def test_masks_from_a_tape_are_those_of_the_default_generator_seeded_alike(ahead):
    """A tape's uniforms, drawn ahead in one block or not, and past its end, are the default
    generator's: the same masks in the same order (float64 masks keep the default generator)."""
    from pading.model.dropout import UniformTape, drawing_from, dropout_mask

    shapes = [(3, 5), (7,), (2, 4, 6), (1000,), (4, 1)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        expected = [dropout_mask(torch.empty(shape), 0.3) for shape in shapes]
        expected_half = dropout_mask(torch.empty(9, dtype=torch.bfloat16), 0.3)
    with drawing_from(UniformTape(11, ahead=ahead)) as tape:
        masks = [dropout_mask(torch.empty(shape), 0.3) for shape in shapes]
        state = torch.random.get_rng_state()
        double = dropout_mask(torch.empty(6, dtype=torch.float64), 0.3)
        assert not torch.equal(torch.random.get_rng_state(), state)  # drawn from the default generator
        half = dropout_mask(torch.empty(9, dtype=torch.bfloat16), 0.3)
    assert all(torch.equal(a, b) for a, b in zip(masks, expected))
    assert torch.equal(half, expected_half) and half.dtype == torch.bfloat16
    assert tape.used == sum(math.prod(shape) for shape in shapes) + 9
    assert double.dtype == torch.float64
    # torch's default dtype does not change the draws (float32 masks, one 32-bit word each)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with drawing_from(UniformTape(11, ahead=ahead)):
            again = [dropout_mask(torch.empty(shape, dtype=torch.float32), 0.3) for shape in shapes]
    finally:
        torch.set_default_dtype(previous)
    assert all(torch.equal(a, b) for a, b in zip(again, expected))
    # a forked child draws its stream itself: the helper thread, and its pending draw, stay in the parent
    from pading.model.dropout import _draw_helper

    release = threading.Event()
    _draw_helper().submit(release.wait, 60)  # holds the helper, so the tape's draw is pending at the fork
    try:
        tape = UniformTape(11, ahead=5000)
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child process
            try:
                signal.alarm(30)  # a child that waits on the parent's draw dies instead of hanging the test
                os.write(writer, tape.take((3, 5)).numpy().tobytes() + tape.take((7,)).numpy().tobytes())
            finally:
                os._exit(0)
    finally:
        release.set()
    os.close(writer)
    with os.fdopen(reader, "rb") as stream:
        from_child = torch.frombuffer(bytearray(stream.read()), dtype=torch.float32)
    os.waitpid(child, 0)
    assert torch.equal(from_child.add(0.7).floor_().mul_(1 / 0.7), torch.cat([expected[0].flatten(), expected[1]]))
    assert torch.equal(tape.take((3, 5)).add(0.7).floor_().mul_(1 / 0.7), expected[0])  # the parent's own draw
    # the masks are not views that later masks write over: autograd's saved masks stay valid
    x = torch.randn(7, requires_grad=True)
    with drawing_from(UniformTape(5, ahead=100)):
        y = x * dropout_mask(x, 0.5)
        z = y * dropout_mask(y, 0.5)
    z.sum().backward()
    assert x.grad is not None


def test_the_cross_attention_in_blocks_of_rows_gives_the_same_output_and_gradients(monkeypatch):
    """Many samples at once are attended in blocks of rows (bounded memory); the blocks must
    give what one block gives, forward and backward."""
    import pading.model.generator as module

    layer = module.PrimitiveDecoderLayer(embed_dim=16, num_heads=4, feedforward_dim=8, dropout=0.1).eval()
    primitives = torch.randn(7, 16)

    def output_and_gradient(rows_per_block):
        monkeypatch.setattr(module, "ATTENTION_ROWS_PER_BLOCK", rows_per_block)
        token = torch.randn(10, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = layer._attend_to_primitives(token, primitives)
        (out * torch.arange(16.0)).sum().backward()
        return out.detach(), token.grad

    whole, whole_gradient = output_and_gradient(4096)
    blocked, blocked_gradient = output_and_gradient(3)  # blocks of 3, 3, 3 and 1 rows
    assert torch.allclose(blocked, whole, atol=1e-6) and torch.allclose(blocked_gradient, whole_gradient, atol=1e-6)


def test_a_worker_with_no_rows_gets_an_empty_batch_through_the_generator():
    """With several workers one may hold no rows of a step; the generator must pass 0 rows
    through (forward and backward) like any other count."""
    generator = PrimitiveGenerator(SEMANTIC_DIM, EMBED_DIM, _config()).train()
    semantic = torch.zeros(0, SEMANTIC_DIM, requires_grad=True)
    out = generator(semantic)
    assert out.shape == (0, EMBED_DIM)
    out.sum().backward()
    assert semantic.grad.shape == (0, SEMANTIC_DIM)
