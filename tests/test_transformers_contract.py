"""Both model classes behave as transformers causal LMs where a user expects one: the forward's
output object and arguments, embeddings access and resizing, gradient checkpointing, the HF Trainer
and PEFT."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import make_tiny_model_dir, randomize, tiny_config
from twotower import NemotronHForCausalLM, TwoTowerForCausalLM
from twotower.objectives import ar_loss, corrupt, diffusion_loss
from twotower.two_tower import TwoTowerConfig

IDS = torch.randint(4, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def single(seed=0):
    torch.manual_seed(seed)
    return randomize(NemotronHForCausalLM(tiny_config("M*E-M")).eval(), seed=seed)


def two_tower(seed=0):
    torch.manual_seed(seed)
    return randomize(TwoTowerForCausalLM(TwoTowerConfig(**tiny_config("M*E-M").to_dict())).eval(), seed=seed)


@pytest.fixture(params=["single", "two-tower"])
def model(request):
    return single() if request.param == "single" else two_tower()


def test_forward_returns_transformers_output_with_the_ar_loss(model):
    out = model(input_ids=IDS, labels=IDS)
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert out.logits.shape == (2, 11, 97) and out.logits.dtype == torch.float32
    lm = model if isinstance(model, NemotronHForCausalLM) else model.context_model()
    total, count = ar_loss(lm, IDS)
    assert abs(out.loss.item() - total.item() / count) <= 1e-5
    # -100 is ignored; the other targets keep their own terms
    labels = IDS.clone()
    labels[0, 5:] = -100
    logp = torch.log_softmax(out.logits, -1)
    expected = -torch.cat([logp[0, :4].gather(-1, IDS[0, 1:5, None]), logp[1, :-1].gather(-1, IDS[1, 1:, None])])
    assert abs(model(IDS, labels=labels).loss.item() - expected.mean().item()) <= 1e-5
    assert abs(model(IDS, labels=labels, num_items_in_batch=7).loss.item() - expected.sum().item() / 7) <= 1e-5


def test_tuple_output_embeddings_input_and_hidden_states(model):
    out = model(IDS, output_hidden_states=True)
    n_layers = len(model.config.layer_kinds)
    assert len(out.hidden_states) == n_layers + 1
    head = model.get_output_embeddings()
    assert torch.allclose(head(out.hidden_states[-1]).float(), out.logits, atol=1e-6)
    embeds = model.get_input_embeddings()(IDS)
    assert torch.allclose(embeds, out.hidden_states[0])
    assert torch.allclose(model(inputs_embeds=embeds).logits, out.logits, atol=1e-6)
    loss, logits = model(IDS, labels=IDS, return_dict=False)[:2]
    assert torch.equal(logits, out.logits) and loss.dim() == 0
    with pytest.raises(ValueError, match="exactly one"):
        model(IDS, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="output_attentions"):
        model(IDS, output_attentions=True)
    with pytest.raises(TypeError, match="unsupported arguments"):
        model(IDS, head_mask=torch.ones(2))
    assert torch.equal(model(IDS, token_type_ids=torch.zeros_like(IDS), position_ids=IDS).logits, out.logits)
    with pytest.raises(ValueError, match="token_type_ids"):
        model(IDS, token_type_ids=torch.ones_like(IDS))


def test_past_key_values_continue_the_sequence(model):
    full = model(IDS).logits
    first = model(IDS[:, :7], use_cache=True)
    assert first.past_key_values is not None and first.past_key_values.length == 7
    rest = model(IDS[:, 7:], past_key_values=first.past_key_values).logits
    assert (torch.cat([first.logits, rest], 1) - full).abs().max() <= 1e-5
    assert model(IDS).past_key_values is None  # a plain forward keeps no cache
    with pytest.raises(TypeError, match="HybridCache"):
        model(IDS, past_key_values=transformers.DynamicCache())


def test_resize_token_embeddings_keeps_the_old_tokens(model):
    before = model(IDS).logits
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    after = model(IDS).logits
    assert after.shape[-1] == 120
    assert (after[..., :97] - before).abs().max() <= 1e-5
    model(torch.tensor([[119, 5]]))  # a new token is a valid input
    if isinstance(model, TwoTowerForCausalLM):  # both towers and both heads grew, the context stays frozen
        assert model.denoiser_tower.embeddings.num_embeddings == 120 and model.lm_head.weight.shape[0] == 120
        assert not any(p.requires_grad for p in model.context_tower.parameters())
        model.generate_mask_diffusion(IDS[:1, :4], max_new_tokens=4, block_size=4)


def gradients(model, loss_of):
    model.zero_grad()
    loss_of(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_gradient_checkpointing_gives_equal_gradients(objective):
    if objective == "ar":
        make, loss_of = single, lambda m: m(IDS, labels=IDS).loss
    else:
        noise = corrupt(IDS, 3, torch.Generator().manual_seed(1))
        make, loss_of = two_tower, lambda m: m(IDS, diffusion_block_size=4, noise=noise).loss
    plain = make().train()
    checkpointed = make().train()
    checkpointed.gradient_checkpointing_enable()
    calls = []
    for block in checkpointed.modules():
        if getattr(block, "gradient_checkpointing", False):
            func = block._gradient_checkpointing_func
            block._gradient_checkpointing_func = lambda *a, func=func, **k: calls.append(1) or func(*a, **k)
    expected, got = gradients(plain, loss_of), gradients(checkpointed, loss_of)
    assert len(calls) >= len(checkpointed.config.layer_kinds)  # every block of the path ran checkpointed
    assert expected.keys() == got.keys() and len(expected) > 10
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=1e-4, atol=1e-6), name


def test_diffusion_loss_goes_through_forward_as_an_output_object():
    model = two_tower()
    noise = corrupt(IDS, 3, torch.Generator().manual_seed(1))
    out = model(IDS, diffusion_block_size=4, noise=noise)
    total, count = diffusion_loss(model, IDS, 4, noise=noise)
    assert torch.equal(out.masked_loss_sum, total) and int(out.num_masked) == int(count) == int(noise[1].sum())
    assert abs(out.loss.item() - total.item() / int(count)) <= 1e-6
    with pytest.raises(TypeError, match="diffusion loss takes no"):
        model(IDS, diffusion_block_size=4, labels=IDS)


class TokenRows(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        ids = torch.randint(4, 97, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_hf_trainer_runs_a_step(tmp_path):
    model = single().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenRows())
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("make", [single, two_tower], ids=["single", "two-tower"])
def test_peft_lora_causal_lm_trains_a_step(make):
    peft = pytest.importorskip("peft")
    model = make()
    # the labels' loss is the context tower's (the AR model of either class)
    targets = r".*(backbone|context_tower)\.layers\.\d+\.mixer\.(in_proj|q_proj|v_proj)"
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets))
    trainable = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora.train()
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # LoRA's B starts at zero: A moves only from the second step
        loss = lora(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in lora.named_parameters() if p.requires_grad and not torch.equal(trainable[n], p)]
    assert len(changed) == len(trainable)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("contract"), vocab_size=300)


def test_single_tower_generate_and_pipeline(model_dir):
    model = TwoTowerForCausalLM.from_pretrained(model_dir).context_model()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    expected = model.generate_ar(ids, max_new_tokens=6)
    assert torch.equal(model.generate(ids, max_new_tokens=6), expected)
    assert torch.equal(model.generate(input_ids=ids, do_sample=False, max_length=ids.shape[1] + 6), expected)
    out = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected) and out.stats.generated_tokens == 6
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = pipe("Once upon a time", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text == tokenizer.decode(expected[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="mode 'ar' only"):
        model.generate(ids, max_new_tokens=2, mode="diffusion")
