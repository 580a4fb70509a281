"""The one-row kernel is chosen by timing the candidates, and a named one is used as named."""

from __future__ import annotations

import time

import pytest
import torch

import model
from model.serving import cpu_kernels, kernel_choice
from model.serving.engine_config import EngineConfig
from model_support import suggest


class Timed(torch.nn.Module):
    """A stand-in linear whose one-row product takes the time `costs` gives its current kernel."""

    def __init__(self, costs: dict[str, float], packed: bool = True):
        super().__init__()
        self.n_in = 4
        self.costs = costs
        self.packed = torch.zeros(1) if packed else None
        self.one_row = None
        self.seen: list[str] = []

    def forward(self, x):
        self.seen.append(self.one_row)
        time.sleep(self.costs[self.one_row])
        return x


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("fastest", kernel_choice.KERNELS)
def test_the_fastest_kernel_is_chosen_for_layers_and_head(two_threads, fastest):
    slow, fast = 0.004, 0.0
    layers = [Timed({k: fast if k == fastest else slow for k in kernel_choice.KERNELS}) for _ in range(3)]
    head_fastest = kernel_choice.KERNELS[(kernel_choice.KERNELS.index(fastest) + 1) % 3]
    head = Timed({k: fast if k == head_fastest else slow for k in kernel_choice.KERNELS})
    chosen = kernel_choice.choose(layers, head)
    assert chosen == {"layers": fastest, "head": head_fastest}
    assert all(m.one_row == fastest for m in layers) and head.one_row == head_fastest
    assert set(layers[0].seen) == set(kernel_choice.KERNELS), "every candidate was timed"


def test_only_kernels_a_module_can_run_are_candidates(two_threads):
    """No packed copy: "packed" is never timed, however fast it would be."""
    unpacked = [Timed({"split": 0.004, "plain": 0.0, "packed": 0.0}, packed=False)]
    assert kernel_choice.choose(unpacked, None) == {"layers": "plain"}
    assert set(unpacked[0].seen) == {"split", "plain"}
    torch.set_num_threads(1)  # one thread: nothing to split over
    assert kernel_choice.candidates(unpacked) == ["plain"]


def test_a_named_kernel_is_used_and_an_unknown_one_refused(two_threads):
    layers, head = [Timed({}), Timed({})], Timed({}, packed=False)
    assert kernel_choice.apply(layers, head, "packed") == {"layers": "packed", "head": "plain"}
    assert [m.one_row for m in layers] == ["packed", "packed"] and head.one_row == "plain"
    assert not layers[0].seen, "a named kernel is not timed"
    with pytest.raises(ValueError, match="unknown one-row kernel 'fast'"):
        kernel_choice.apply(layers, head, "fast")


def test_engine_takes_the_kernel_from_its_config(tiny_gpt2):
    """Unpacked, the named kernel runs everywhere; packed, the layers' one copy is the packed one
    and the head (never packed: the embedding reads its rows) takes the named kernel."""
    for pack, layers in ((False, "plain"), (True, "packed" if cpu_kernels.cpu_packing_available() else "plain")):
        engine = model.Engine.from_pretrained(str(tiny_gpt2), device="cpu", dtype=torch.float32,
                                              config=EngineConfig(slots=2, cpu_one_row="plain", cpu_pack=pack))
        try:
            assert engine.stats()["one_row_kernels"] == {"layers": layers, "head": "plain"}
            assert suggest(engine, "Hello", n=1, max_new_tokens=3, greedy=True, stop=None)[0].token_ids
        finally:
            engine.close()
    with pytest.raises(ValueError, match="unknown one-row kernel 'fastest'"):
        model.Engine.from_pretrained(str(tiny_gpt2), device="cpu", dtype=torch.float32,
                                     config=EngineConfig(slots=2, cpu_one_row="fastest"))


@pytest.mark.parametrize("kernel", kernel_choice.KERNELS)
def test_each_kernel_takes_its_own_path_and_gives_x_at_w(two_threads, monkeypatch, kernel):
    """A one-row product with the kernel named runs that kernel (and only it) and equals x @ W + b."""
    if kernel == "packed" and not cpu_kernels.cpu_packing_available():
        pytest.skip("this torch build has no oneDNN packing")  # the other kernels still run
    calls = []

    def counted(name, fn):
        def wrapper(*args):
            calls.append(name)
            return fn(*args)
        monkeypatch.setattr(cpu_kernels, name, wrapper)

    counted("one_row_matmul", cpu_kernels.one_row_matmul)
    counted("one_row_matmul_t", cpu_kernels.one_row_matmul_t)
    counted("_packed_linear", cpu_kernels._packed_linear)
    gen = torch.Generator().manual_seed(3)
    plain = model.network.gpt.Conv1D(8, 6)
    torch.nn.init.normal_(plain.weight, generator=gen)
    torch.nn.init.normal_(plain.bias, generator=gen)
    w = plain.weight.detach().clone()
    linear = cpu_kernels.CpuLinear(plain)
    body = model.network.gpt.GPTBody(model.network.config.GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    head = cpu_kernels.CpuLMHead(model.network.gpt.LMHead(body))
    for module in (linear, head):
        if kernel == "packed":  # a packed layer has only its packed copy
            module.pack()
        module.one_row = kernel
    x = torch.randn(1, 1, 8, generator=gen)
    with torch.no_grad():
        got_linear, got_head = linear(x), head(x)
        torch.testing.assert_close(got_linear, x @ w + linear.bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_head, x @ body.wte.weight.t(), atol=1e-5, rtol=1e-5)
    expected = {"split": ["one_row_matmul", "one_row_matmul_t"], "plain": [],
                "packed": ["_packed_linear", "_packed_linear"]}[kernel]
    assert calls == expected


def test_packed_products_run_at_a_few_row_counts_and_give_the_same_rows(monkeypatch):
    """Every prompt length would be a new oneDNN primitive (kept, ~0.5 MB each for a gpt2 matrix):
    the packed product runs at bucketed row counts, and the padded rows change nothing."""
    from model.serving import cpu_kernels
    from model.serving.cpu_kernels import row_bucket

    if not cpu_kernels.cpu_packing_available():
        pytest.skip("this torch has no oneDNN packing")
    assert len({row_bucket(m) for m in range(1, 4097)}) <= 48
    assert all(m <= row_bucket(m) < m + max(16, m / 4) for m in range(1, 4097))
    assert [row_bucket(m) for m in (1, 16, 17, 33, 256, 257)] == [1, 16, 32, 48, 256, 320]

    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    class Ops:
        @staticmethod
        def _linear_pointwise(x, *args):
            seen.append(x.numel() // x.shape[-1])
            return real(x, *args)

    weight = torch.randn(64, 96)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous())
    bias = torch.randn(96)
    monkeypatch.setattr(cpu_kernels.torch.ops, "mkldnn", Ops)
    for rows in (3, 21, 100, 130):
        x = torch.randn(1, rows, 64)
        y = cpu_kernels._packed_linear(x, packed, bias)
        assert y.shape == (1, rows, 96)
        torch.testing.assert_close(y, x @ weight + bias, rtol=1e-5, atol=1e-4)
    assert seen == [3, 32, 112, 160]


def test_a_float32_engine_holds_each_matrix_once(tiny_gpt2):
    """Packed, a body matrix has no plain weight beside it; the engine counts the weights once and
    the packed LM head beside the embedding it is tied to, and nothing else."""
    from model.serving.quantize import weight_bytes

    if not cpu_kernels.cpu_packing_available():
        pytest.skip("this torch build has no oneDNN packing")
    plain = model.load(str(tiny_gpt2), device="cpu")
    vocab = plain.transformer.wte.weight
    engine = model.Engine.from_pretrained(str(tiny_gpt2), device="cpu", dtype=torch.float32,
                                          config=EngineConfig(slots=2))
    try:
        layers = [m for m in engine.model.modules() if isinstance(m, cpu_kernels.CpuLinear)]
        assert layers and all(m.weight is None and m.packed is not None for m in layers)
        head_copy = engine.model.lm_head.packed.numel() * engine.model.lm_head.packed.element_size()
        assert head_copy >= vocab.numel() * vocab.element_size()
        packed_body = cpu_kernels.packed_bytes(engine.model) - head_copy
        body = sum(m.numel() * m.element_size() for n, m in plain.named_parameters()
                   if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")))
        assert body <= packed_body <= 1.05 * body  # oneDNN's layout, not a second copy
        assert engine.weight_bytes() == weight_bytes(plain) - body + packed_body + head_copy
    finally:
        engine.close()
