"""The adapted layers' forward: each LoRA update is added inside its up-projection's GEMM (``torch.addmm``), with
peft's numbers, fewer full-width operators, and peft's own forward wherever it does something else."""

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FAST, in_process_trainer
from phi3_lora.config import LoraConfig, load_config
from phi3_lora.lora import attach_lora, fuse_adapter_outputs, skip_adapter_input_casts


class OpCounts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def with_nonzero_b(model):
    """``model`` with its adapters' B drawn at random (B = 0 at init would make every update zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def tiny_pair(dropout=0.0, **lora):
    """A 2-layer tiny Phi-3 with adapters whose B is not zero, and a deep copy of it with fused layers."""
    from transformers import Phi3ForCausalLM

    from phi3_lora.tiny import tiny_phi3_config, tiny_tokenizer
    torch.manual_seed(0)
    model = with_nonzero_b(attach_lora(Phi3ForCausalLM(tiny_phi3_config(tiny_tokenizer(), layers=2, hidden=64)),
                                       LoraConfig(r=4, alpha=8, dropout=dropout, **lora), seed=0))
    fused = copy.deepcopy(model)
    return model, fused, fuse_adapter_outputs(fused)


def loss_and_gradients(model, ids, autocast=False, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in both models
    with OpCounts() as ops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, ops.counts


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))  # the tiny vocabulary: 259


def test_fused_layers_give_peft_losses_and_gradients_with_fewer_operators(ids):
    """float32, dropout 0.1 (the same masks): the loss and every adapter gradient agree with peft's to 1e-6;
    each of the 8 adapted layers makes one addmm where peft makes an up-projection mm and a full-width add."""
    peft_model, fused_model, fused = tiny_pair(dropout=0.1)
    assert fused == 8  # 2 layers x qkv_proj, o_proj, gate_up_proj, down_proj
    peft_loss, peft_grads, peft_ops = loss_and_gradients(peft_model, ids)
    loss, grads, ops = loss_and_gradients(fused_model, ids)
    assert loss == pytest.approx(peft_loss, rel=1e-6)
    assert grads.keys() == peft_grads.keys() and len(grads) == 16
    for name, grad in peft_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert ops["addmm"] - peft_ops["addmm"] == 8 and peft_ops["mm"] - ops["mm"] == 8
    assert peft_ops["add"] - ops["add"] == 8
    assert sum(ops.values()) < sum(peft_ops.values())


def test_under_bf16_autocast_fused_layers_give_peft_numbers(ids):
    """Under bf16 autocast (as the loop runs on a GPU) the sum is bf16 GEMM output, rounded once where peft rounds
    the up-projection and then the sum: the loss and the gradients agree with peft's as closely as each agrees
    with float32's, and every layer's output is a bfloat16 tensor as peft's is."""
    peft_model, fused_model, _ = tiny_pair()
    reference_loss, reference_grads, _ = loss_and_gradients(peft_model, ids)
    skip_adapter_input_casts(peft_model)  # as the loop does under autocast
    skip_adapter_input_casts(fused_model)
    peft_loss, peft_grads, _ = loss_and_gradients(peft_model, ids, autocast=True)
    loss, grads, ops = loss_and_gradients(fused_model, ids, autocast=True)
    assert ops["addmm"] == 8
    assert loss == pytest.approx(peft_loss, rel=1e-3) and peft_loss == pytest.approx(reference_loss, rel=1e-3)

    def error(got, want):
        return sum((got[n] - g).norm() for n, g in want.items()) / sum(g.norm() for g in want.values())
    assert error(peft_grads, reference_grads) < 0.05 and error(grads, peft_grads) < 0.05
    layer = fused_model.base_model.model.model.layers[1].mlp.gate_up_proj
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(4, 8, layer.in_features)).dtype == torch.bfloat16


def test_peft_forward_stays_where_it_differs(ids):
    """Merged, disabled or several active adapters, peft's adapter_names, 16-bit inputs to float32 adapters
    without autocast (peft casts them), and DoRA layers: peft's forward, with its numbers."""
    peft_model, fused_model, _ = tiny_pair()
    layer = fused_model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features)
    with OpCounts() as ops:
        fused_out = layer(x)
    assert ops.counts["addmm"] == 1
    peft_layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(fused_out, peft_layer(x), rtol=1e-6, atol=1e-7)

    def unfused(call):
        with OpCounts() as ops:
            out = call()
        assert ops.counts["addmm"] == 0
        return out

    with fused_model.disable_adapter():
        torch.testing.assert_close(unfused(lambda: layer(x)), layer.base_layer(x))
    bf16_base = copy.deepcopy(layer)
    bf16_base.base_layer.to(torch.bfloat16)  # float32 adapters on a bf16 base: peft casts the input, and the sum back
    assert unfused(lambda: bf16_base(x.bfloat16())).dtype == torch.bfloat16
    unfused(lambda: layer(x, adapter_names=["default"] * 3))
    layer.merge()
    torch.testing.assert_close(unfused(lambda: layer(x)), fused_out, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    _, dora, fused = tiny_pair(use_dora=True)
    assert fused == 0 and not any("forward" in vars(m) for m in dora.modules())


@pytest.mark.parametrize("added", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "bias"])
def test_an_adapter_added_after_fusing_with_a_variant_or_bias_gets_peft_forward(ids, added):
    """Fusing looks at the adapters there are; an adapter added later with DoRA or a bias is computed by peft."""
    from peft import LoraConfig as PeftLoraConfig
    peft_model, fused_model, _ = tiny_pair()
    for model in (peft_model, fused_model):
        torch.manual_seed(3)
        model.add_adapter("later", PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                                                  **added))
        model.set_adapter("later")
        with torch.no_grad():  # DoRA's magnitudes start as the weight norms: at init it computes LoRA's numbers
            for name, p in model.named_parameters():
                if "lora_magnitude_vector.later" in name:
                    p.mul_(1.5)
    with torch.no_grad():
        torch.testing.assert_close(fused_model(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)


def test_a_fused_model_pickles_and_deep_copies(ids):
    """The forward is a functools.partial of the layer, as accelerate's hooks are: torch.save of the whole model
    loads back (and a deep copy computes with its own weights)."""
    import io
    _, fused_model, _ = tiny_pair()
    buffer = io.BytesIO()
    torch.save(fused_model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # our own object, just written
    copied = copy.deepcopy(fused_model)
    with torch.no_grad():
        copied.base_model.model.model.layers[0].mlp.down_proj.lora_B["default"].weight.zero_()
        want = fused_model(input_ids=ids).logits
        with OpCounts() as ops:
            torch.testing.assert_close(loaded(input_ids=ids).logits, want)
        assert ops.counts["addmm"] == 8
        assert not torch.allclose(copied(input_ids=ids).logits, want)


def test_the_loop_fuses_unless_told_not_to(tmp_path):
    """training.fuse_lora_add (on by default) decides; the loralib backend has no peft layers to fuse."""
    def fused_layers(*overrides):
        cfg = load_config(None, [*FAST, f"output_dir={tmp_path}", "data.eval_size=0", *overrides])
        return sum("forward" in vars(m) for m in in_process_trainer(cfg).model.modules())

    assert fused_layers() == 8
    assert fused_layers("training.fuse_lora_add=false") == 0
    assert fused_layers("lora.backend=loralib") == 0


def test_4bit_layers_fuse_with_peft_numbers(ids):
    """peft's Linear4bit (QLoRA) clones the base output before adding to it; the fused forward needs no clone."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[qlora]')")
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, ["model.load_in_4bit=true", "model.tiny_hidden_size=64", "lora.dropout=0"])
    model = with_nonzero_b(attach_lora(load_model(cfg.model, load_tokenizer(cfg.model)), cfg.lora, seed=0))
    fused_model = copy.deepcopy(model)
    assert fuse_adapter_outputs(fused_model) == 4 * cfg.model.tiny_layers
    assert {type(m).__name__ for m in fused_model.modules() if "forward" in vars(m)} == {"Linear4bit"}
    peft_loss, peft_grads, peft_ops = loss_and_gradients(model, ids)
    loss, grads, ops = loss_and_gradients(fused_model, ids)
    assert loss == pytest.approx(peft_loss, rel=1e-6)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert peft_ops["clone"] - ops["clone"] == 4 * cfg.model.tiny_layers
    # float32 activations under bf16 autocast: a 4-bit layer returns float32 whatever autocast says, and so does
    # peft's sum; the fused layer keeps peft's sum and its dtype
    layer, peft_layer = (m.base_model.model.model.layers[0].self_attn.o_proj for m in (fused_model, model))
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpCounts() as ops:
        fused_out, peft_out = layer(x), peft_layer(x)
    assert fused_out.dtype == peft_out.dtype == torch.float32 and ops.counts["addmm"] == 0
    torch.testing.assert_close(fused_out, peft_out)
