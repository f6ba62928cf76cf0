"""make_layer_parallel on users' own Hugging Face and timm models (xbraid_transformers.adapters).

The oracle is always the untouched library model through autograd: at step 1 in serial mode the
wrapped model must be it (outputs, loss, every parameter gradient, float64); at the default step
converged MGRIT must equal the serial wrapped model; a coarse view at step 2 * 0.5 must be the
untouched model with every other block. The blocks are found without being named: through the
models' own _no_split_modules (any transformers model) or a known family's path (timm). No
weights are downloaded: tiny configs, random init.
"""
import copy
import importlib.abc
import importlib.util
import importlib.machinery
import os
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xbraid_transformers as xbt
from xbraid_transformers.adapters import (make_layer_parallel, restore_blocks, set_parallel,
                                          wrapped_blocks)
from xbraid_transformers.core.layer_parallel import find_stacks

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

LAYERS, VOCAB, SEQ, BATCH = 8, 40, 8, 2
# 8 blocks, cfactor 2: 4 coarse intervals, so 4 iterations solve forward and adjoint exactly.
CONVERGED = dict(levels=2, cfactor=2, fwd_iters=4, bwd_iters=4)


# ---------------------------------------------------------------------- timm without torchvision
class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty ``torchvision.*`` modules whose every attribute is a placeholder class."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_timm_vision_transformer():
    """timm's VisionTransformer. ``import timm`` imports torchvision (FrozenBatchNorm2d, the data
    transforms) although the ViT never calls it; the PyPI torchvision wheels are built against a
    CUDA torch and fail to import beside a CPU torch ("operator torchvision::nms does not
    exist"). When torchvision cannot be imported, timm is imported against placeholder
    torchvision modules, which are removed again afterwards."""
    if importlib.util.find_spec("timm") is None:   # pip install --no-deps timm (README)
        pytest.skip("timm is not installed")
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        finder = _StubFinder()
        sys.meta_path.insert(0, finder)
        try:
            from timm.models.vision_transformer import VisionTransformer
        finally:
            sys.meta_path.remove(finder)
            for name in [n for n in sys.modules
                         if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
        return VisionTransformer
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer


# ---------------------------------------------------------------------- the families
def gpt2(dropout=0.0, layers=LAYERS):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=layers, n_head=2, embd_pdrop=0.0,
        resid_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama(dropout=0.0, layers=LAYERS):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attention_dropout=dropout, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


# Decoders found through their _no_split_modules (Llama's layout, GPT-NeoX's parallel residual).
DECODER_SIZE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                    max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def decoder(name: str, dropouts=("attention_dropout",), **options):
    """The builder of a tiny ``{name}ForCausalLM`` (its dropout fields set to ``dropout``)."""
    def build_decoder(dropout=0.0, layers=LAYERS):
        config = getattr(transformers, f"{name}Config")(
            num_hidden_layers=layers, **{field: dropout for field in dropouts}, **options,
            **DECODER_SIZE)
        return getattr(transformers, f"{name}ForCausalLM")(config)
    return build_decoder


qwen2 = decoder("Qwen2", num_key_value_heads=1)
mistral = decoder("Mistral", num_key_value_heads=1)
gpt_neox = decoder("GPTNeoX", dropouts=("attention_dropout", "hidden_dropout"))
phi3 = decoder("Phi3", dropouts=("attention_dropout", "resid_pdrop"), num_key_value_heads=1,
               embd_pdrop=0.0)
gemma = decoder("Gemma", num_key_value_heads=1, head_dim=8)
olmo = decoder("Olmo", num_key_value_heads=1)


def hf_vit(dropout=0.0, layers=LAYERS):
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout)
    return transformers.ViTForImageClassification(config)


def timm_vit(dropout=0.0, layers=LAYERS):
    VisionTransformer = import_timm_vision_transformer()
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16,
                             depth=layers, num_heads=2, mlp_ratio=2.0, proj_drop_rate=dropout,
                             attn_drop_rate=dropout, drop_path_rate=dropout)


def text_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, :3] = 0          # left padding: the mask must reach every block evaluation
    return dict(input_ids=ids, attention_mask=mask, labels=ids)


def image_batch():
    g = torch.Generator().manual_seed(5)
    return dict(pixel_values=torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64),
                labels=torch.tensor([0, 2]))


def hf_loss(model, batch):
    out = model(**batch)
    return out.logits, out.loss


def timm_loss(model, batch):
    logits = model(batch["pixel_values"])
    return logits, F.cross_entropy(logits, batch["labels"])


FAMILIES = {
    "gpt2": (gpt2, text_batch, hf_loss),
    "llama": (llama, text_batch, hf_loss),
    "hf_vit": (hf_vit, image_batch, hf_loss),
    "timm_vit": (timm_vit, image_batch, timm_loss),
    "qwen2": (qwen2, text_batch, hf_loss),
    "mistral": (mistral, text_batch, hf_loss),
    "gpt_neox": (gpt_neox, text_batch, hf_loss),
    "phi3": (phi3, text_batch, hf_loss),
    "gemma": (gemma, text_batch, hf_loss),
    "olmo": (olmo, text_batch, hf_loss),
}
# Where each family keeps its blocks (found by make_layer_parallel without being told).
BLOCK_PATHS = {"gpt2": "transformer.h", "llama": "model.layers", "hf_vit": "vit.layers",
               "timm_vit": "blocks", "gpt_neox": "gpt_neox.layers",
               **{f: "model.layers" for f in ("qwen2", "mistral", "phi3", "gemma", "olmo")}}


def build(family, dropout=0.0, layers=LAYERS):
    torch.manual_seed(0)
    make, make_batch, loss_fn = FAMILIES[family]
    return make(dropout, layers).double().train(), make_batch(), loss_fn


def run(model, batch, loss_fn):
    """Output, loss and every parameter gradient (by parameter name) of one forward/backward.
    The random state is reset first, so dropout outside the stacks draws the same masks."""
    torch.manual_seed(123)
    model.zero_grad()
    out, loss = loss_fn(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), loss.detach(), grads


def assert_same_gradients(ours, theirs, rename=lambda n: n):
    assert sorted(rename(n) for n in ours) == sorted(theirs), "different parameters"
    worst = 0.0
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[rename(name)], msg=name)
        worst = max(worst, (grad - theirs[rename(name)]).abs().max().item())
    return worst


def original_name(name: str) -> str:
    """The untouched model's parameter name (no buffer layers: stack layer j is block j)."""
    return name.replace(".stack.layers.", ".")


def report(request, **figures):
    """Record the equality figures (shown with pytest -rP)."""
    print(request.node.name, {k: f"{v:.1e}" for k, v in figures.items()})


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", list(FAMILIES))
def test_step_one_in_serial_mode_is_the_untouched_model(family, request):
    original, batch, loss_fn = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # a checked family is found without a warning
        wrapped = make_layer_parallel(copy.deepcopy(original), step_size=1.0,
                                      mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    set_parallel(wrapped, False)
    assert len(wrapped_blocks(wrapped)) == 1 and not find_stacks(wrapped)[0].parallel
    assert wrapped.get_submodule(BLOCK_PATHS[family]) is wrapped_blocks(wrapped)[0]
    assert wrapped_blocks(wrapped)[0].family == family
    out, loss, grads = run(wrapped, batch, loss_fn)
    ref_out, ref_loss, ref_grads = run(original, batch, loss_fn)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(loss, ref_loss)
    worst = assert_same_gradients(grads, ref_grads, original_name)
    report(request, out=(out - ref_out).abs().max().item(),
           loss=(loss - ref_loss).abs().item(), grad=worst)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converged_mgrit_at_the_default_step_equals_serial(family, request):
    """Dropout on inside the blocks: the synchronised masks make MGRIT solve the same ODE."""
    original, batch, loss_fn = build(family, dropout=0.1)
    parallel = make_layer_parallel(original, mgrit=xbt.MGRITConfig(**CONVERGED), dropout_seed=7)
    serial = set_parallel(copy.deepcopy(parallel), False)
    stack = find_stacks(parallel)[0]
    assert stack.step_size == 1 / LAYERS
    out, loss, grads = run(parallel, batch, loss_fn)
    assert stack.parallel and stack.stats.fwd_iters > 0 and stack.stats.bwd_iters > 0
    assert stack.stats.fwd_residuals[0] > 1e-6        # the first guess was far from the answer
    ref_out, ref_loss, ref_grads = run(serial, batch, loss_fn)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(loss, ref_loss)
    worst = assert_same_gradients(grads, ref_grads)
    report(request, out=(out - ref_out).abs().max().item(),
           loss=(loss - ref_loss).abs().item(), grad=worst)


def test_the_default_step_is_another_network():
    original, batch, loss_fn = build("gpt2")
    wrapped = set_parallel(make_layer_parallel(copy.deepcopy(original)), False)
    assert find_stacks(wrapped)[0].step_size == 1 / LAYERS
    assert not torch.allclose(run(wrapped, batch, loss_fn)[0], run(original, batch, loss_fn)[0])


def test_buffer_layers_and_keys_of_the_original_model():
    """Buffer blocks at step 1 around an ODE part at step 1: still the untouched model; the
    state dict has the untouched model's keys, and loads in both directions."""
    original, batch, loss_fn = build("gpt2")
    wrapped = make_layer_parallel(copy.deepcopy(original), step_size=1.0, buffer_layers=(1, 3),
                                  mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    set_parallel(wrapped, False)
    blocks = wrapped.transformer.h
    assert (len(blocks.front), len(blocks.stack.layers), len(blocks.back)) == (1, 4, 3)
    torch.testing.assert_close(run(wrapped, batch, loss_fn)[0], run(original, batch, loss_fn)[0])
    state, ref_state = wrapped.state_dict(), original.state_dict()
    assert list(state) == list(ref_state)
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key
    other, _, _ = build("gpt2")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    wrapped.load_state_dict(other.state_dict())       # original keys into the wrapped model
    torch.testing.assert_close(run(wrapped, batch, loss_fn)[0], run(other, batch, loss_fn)[0])
    torch.testing.assert_close(blocks.back[2].attn.c_attn.weight, other.transformer.h[7].attn.c_attn.weight)
    original.load_state_dict(wrapped.state_dict())    # and back into a plain model
    torch.testing.assert_close(original.transformer.h[1].mlp.c_fc.weight,
                               other.transformer.h[1].mlp.c_fc.weight)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_restore_blocks_gives_back_the_original_keys(family):
    """Wrapped and restored, the state dict has the untouched model's keys, in its order, with
    its values; the parameters' names are the untouched model's again."""
    original, _, _ = build(family)
    wrapped = make_layer_parallel(copy.deepcopy(original), buffer_layers=(1, 1),
                                  mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    reference = original.state_dict()
    assert list(wrapped.state_dict()) == list(reference)
    restore_blocks(wrapped)
    assert type(wrapped.get_submodule(BLOCK_PATHS[family])) is type(original.get_submodule(BLOCK_PATHS[family]))
    restored = wrapped.state_dict()
    assert list(restored) == list(reference)
    for key, value in reference.items():
        assert torch.equal(restored[key], value), key
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in original.named_parameters()]


# ---------------------------------------------------------------------- errors
def test_a_cache_is_refused_in_layer_parallel_mode_and_works_in_serial_mode():
    original, batch, _ = build("llama")
    wrapped = make_layer_parallel(copy.deepcopy(original), step_size=1.0,
                                  mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    assert wrapped.config.use_cache is False
    ids = batch["input_ids"]
    wrapped(ids)                                     # no cache by default
    with pytest.raises(ValueError, match="cache .*cannot be used in layer-parallel mode"):
        wrapped(ids, use_cache=True)
    with pytest.raises(ValueError, match="cache"):
        wrapped.generate(ids[:, :4], max_new_tokens=2, do_sample=False)
    set_parallel(wrapped, False)   # serial on one process: every block runs once, caches work
    prompt = ids[1:, :4]
    assert torch.equal(wrapped.generate(prompt, max_new_tokens=3, do_sample=False),
                       original.generate(prompt, max_new_tokens=3, do_sample=False))


def test_gpt2_cache_is_refused_too():
    original, batch, _ = build("gpt2")
    wrapped = make_layer_parallel(original, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    with pytest.raises(ValueError, match="past_key_values"):
        wrapped(batch["input_ids"], use_cache=True)


def test_post_norm_stacks_are_refused():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=32)
    bert = transformers.BertForMaskedLM(config)
    with pytest.raises(ValueError, match="post-norm block: it computes LayerNorm\\(x \\+ F\\(x\\)\\)"):
        make_layer_parallel(bert)
    with pytest.raises(ValueError, match="BertLayer is a post-norm block"):
        make_layer_parallel(bert, blocks="bert.encoder.layer")
    assert not wrapped_blocks(bert)
    torch_post_ln = nn.Module()
    torch_post_ln.layers = nn.ModuleList(nn.TransformerEncoderLayer(8, 2, 16) for _ in range(4))
    with pytest.raises(ValueError, match="post-LN"):
        make_layer_parallel(torch_post_ln, blocks="layers")


def opt(layers=4, **options):
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32,
                                    num_hidden_layers=layers, num_attention_heads=2,
                                    max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0,
                                    pad_token_id=0, bos_token_id=0, eos_token_id=0, **options)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(config).double()


def test_opt_post_norm_is_refused_and_pre_norm_opt_is_found_unchecked():
    """OPT's norm placement is a config option: post-norm (OPT-350m) is refused, found or
    named (and BLOOM's residual from the normalised input likewise); pre-norm OPT (no
    structural check) is found through _no_split_modules with a warning, and is the untouched
    model at step 1 in serial mode."""
    post = opt(do_layer_norm_before=False)
    for blocks in (None, "model.decoder.layers"):
        with pytest.raises(ValueError, match="OPTDecoderLayer has do_layer_norm_before=False: .*"
                                             "not a forward-Euler step"):
            make_layer_parallel(post, blocks=blocks)
    assert not wrapped_blocks(post)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=16, n_layer=4, n_head=2,
        apply_residual_connection_post_layernorm=True))
    with pytest.raises(ValueError, match="BloomBlock has apply_residual_connection_post_layernorm=True"):
        make_layer_parallel(bloom)
    pre = opt()
    with pytest.warns(UserWarning, match="OPTDecoderLayer .*'model.decoder.layers'.* not a block "
                                         "family xbraid_transformers has checked"):
        wrapped = make_layer_parallel(copy.deepcopy(pre), step_size=1.0,
                                      mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    set_parallel(wrapped, False)
    batch = text_batch()
    out, loss, grads = run(wrapped, batch, hf_loss)
    ref_out, ref_loss, ref_grads = run(pre, batch, hf_loss)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(loss, ref_loss)
    assert_same_gradients(grads, ref_grads, original_name)


def test_encoder_decoder_models_are_refused():
    """T5 (pre-norm) keeps two stacks of T5Block: not one ODE. BART's post-norm is the first
    reason given."""
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match=r"2 separate lists \('encoder.block' \(2 x T5Block\), "
                                         r"'decoder.block' \(2 x T5Block\)\): it is an "
                                         "encoder-decoder, whose blocks do not form one stack"):
        make_layer_parallel(t5)
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32))
    with pytest.raises(ValueError, match="BartEncoderLayer is a post-norm block"):
        make_layer_parallel(bart)
    assert not wrapped_blocks(t5) and not wrapped_blocks(bart)


def test_layers_called_with_their_own_arguments_are_refused():
    """Sliding-window and full-attention layers get different masks; LayerDrop would drop the
    whole stack."""
    sliding = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_hidden_layers=4, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
        max_window_layers=2, **DECODER_SIZE))
    for blocks in (None, "model.layers"):
        with pytest.raises(ValueError, match="config.layer_types: 2 x 'full_attention', 2 x "
                                             "'sliding_attention'"):
            make_layer_parallel(sliding, blocks=blocks)
    with pytest.raises(ValueError, match=r"LayerDrop \(0.1\)"):
        make_layer_parallel(opt(layerdrop=0.1))


def test_unknown_models_and_paths_are_explained():
    with pytest.raises(ValueError, match="found no block list in Sequential: no nn.ModuleList"):
        make_layer_parallel(nn.Sequential(nn.Linear(2, 2)))
    original, _, _ = build("gpt2")
    with pytest.raises(ValueError, match="must name a non-empty nn.ModuleList"):
        make_layer_parallel(original, blocks="transformer.wte")
    make_layer_parallel(original, blocks="transformer.h")
    with pytest.raises(ValueError, match="layer-parallel already"):
        make_layer_parallel(original)


# ---------------------------------------------------------------------- round trip
def train(model, batch, loss_fn, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model, batch)[1].backward()
        opt.step()


@pytest.mark.parametrize("family", ["gpt2", "llama", "hf_vit"])
def test_round_trip_through_save_pretrained(family, tmp_path):
    """Wrap (step 0.3, buffers), train layer-parallel, restore, save_pretrained,
    from_pretrained, wrap again: step and buffers come back from config.json and the outputs
    are the trained ones."""
    model, batch, loss_fn = build(family)
    make_layer_parallel(model, mgrit=xbt.MGRITConfig(levels=2, cfactor=2), step_size=0.3,
                        buffer_layers=(2, 2))
    train(model, batch, loss_fn)
    model.eval()
    set_parallel(model, False)
    with torch.no_grad():
        trained = loss_fn(model, batch)[0]
    restore_blocks(model)
    assert type(model.get_submodule(BLOCK_PATHS[family])) is nn.ModuleList
    assert getattr(model.config, "use_cache", None) == getattr(type(model.config)(), "use_cache", None)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    make_layer_parallel(reloaded, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    stack = wrapped_blocks(reloaded)[0]
    assert stack.step_size == 0.3 and stack.buffer_layers == (2, 2)
    set_parallel(reloaded, False)
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(reloaded, batch)[0], trained)


def test_timm_round_trip_through_a_state_dict(tmp_path):
    model, batch, loss_fn = build("timm_vit")
    make_layer_parallel(model, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    train(model, batch, loss_fn)
    model.eval()
    set_parallel(model, False)
    with torch.no_grad():
        trained = loss_fn(model, batch)[0]
    h = wrapped_blocks(model)[0].step_size
    restore_blocks(model)
    assert type(model.blocks) is nn.Sequential and len(model.blocks) == LAYERS
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    fresh, _, _ = build("timm_vit")
    fresh.load_state_dict(torch.load(tmp_path / "vit.pt"))
    make_layer_parallel(fresh.eval(), step_size=h, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    set_parallel(fresh, False)
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(fresh, batch)[0], trained)


# ---------------------------------------------------------------------- the library's tools
def test_adaptive_controller_switches_a_wrapped_model_to_serial():
    model, batch, loss_fn = build("gpt2")
    make_layer_parallel(model, mgrit=xbt.MGRITConfig(levels=2, cfactor=2, fwd_iters=1,
                                                     bwd_iters=1))
    ctl = xbt.AdaptiveController(model, probe_every=1, threshold=1e-12, floor=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ctl.before_step()
    loss_fn(model, batch)[1].backward()
    opt.step()
    decision = ctl.after_step()
    assert decision.rho["forward"] is not None and decision.rho["forward"] > 0
    assert decision.action == "serial" and not find_stacks(model)[0].parallel


def test_multilevel_coarse_view_of_a_wrapped_model_is_the_model_with_every_other_block():
    """Step 0.5, stride 2: the coarse view runs blocks 0, 2, 4, 6 with step 1, which is the
    untouched 4-block model holding those blocks."""
    model, batch, loss_fn = build("gpt2")
    make_layer_parallel(model, step_size=0.5, mgrit=xbt.MGRITConfig(**CONVERGED))
    coarse, _, _ = build("gpt2", layers=LAYERS // 2)
    state = {k: v for k, v in model.state_dict().items() if ".h." not in k}
    for j in range(LAYERS // 2):
        state.update({f"transformer.h.{j}.{k}": v for k, v in
                      model.transformer.h.stack.layers[2 * j].state_dict().items()})
    coarse.load_state_dict(state)
    with xbt.multilevel.coarse_view(model, stride=2):
        out, loss, grads = run(model, batch, loss_fn)
        stack = find_stacks(model)[0]
        assert len(stack.layers) == LAYERS // 2 and stack.parallel and stack.stats.fwd_iters > 0
    ref_out, ref_loss, ref_grads = run(coarse, batch, loss_fn)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(loss, ref_loss)
    blocks = model.transformer.h.stack.layers
    for j in range(LAYERS // 2):
        for name, p in blocks[2 * j].named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[f"transformer.h.{j}.{name}"])
        assert all(p.grad is None for p in blocks[2 * j + 1].parameters())  # skipped
    outside = {n: g for n, g in grads.items() if ".h." not in n}
    assert outside and all(torch.allclose(g, ref_grads[n]) for n, g in outside.items())


def test_per_layer_outputs_recorded_by_hooks_are_flagged_in_layer_parallel_mode():
    model, batch, _ = build("llama")
    make_layer_parallel(model, mgrit=xbt.MGRITConfig(levels=2, cfactor=2))
    with pytest.warns(UserWarning, match="not the per-layer states"):
        model(batch["input_ids"], output_hidden_states=True)
