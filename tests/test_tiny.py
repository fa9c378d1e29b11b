"""The tiny components: real architectures at tiny sizes, offline, seeded."""

import pytest
import torch

from instantid_lab.tiny import (TINY_WORDS, TinyConfig, byte_alphabet, tiny_components, tiny_pipeline, tiny_tokenizer,
                                tiny_vocab)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_components("sdxl", seed=0)


def test_byte_alphabet_is_256_distinct_printable_characters():
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256
    assert all(c.isprintable() and not c.isspace() for c in alphabet)
    assert alphabet[ord("a")] == "a"


def test_vocab_has_every_byte_with_and_without_end_of_word_and_the_special_tokens():
    vocab, merges = tiny_vocab()
    assert all(c in vocab and c + "</w>" in vocab for c in byte_alphabet())
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert all(a + b in vocab for a, b in merges)


def test_tokenizer_knows_its_words_spells_the_rest_and_pads_to_max_length():
    tokenizer = tiny_tokenizer(max_length=77)
    ids = tokenizer("An Astronaut zq", padding="max_length", max_length=77).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) == 77
    assert tokens[:4] == ["<|startoftext|>", "an</w>", "astronaut</w>", "z"]
    assert tokens[4:6] == ["q</w>", "<|endoftext|>"] and set(tokens[6:]) == {"<|endoftext|>"}
    assert "astronaut" in TINY_WORDS
    assert tokenizer.decode(ids, skip_special_tokens=True) == "an astronaut zq"


def test_same_seed_builds_the_same_weights_and_another_seed_other_weights(sdxl):
    again, other = tiny_components("sdxl", seed=0), tiny_components("sdxl", seed=1)
    for name in ["unet", "controlnet", "vae", "text_encoder", "text_encoder_2"]:
        a, b, c = (comps[name].state_dict() for comps in (sdxl, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1), name


def test_sdxl_shaped_text_encoders_concatenate_to_the_unets_cross_attention_width(sdxl):
    config = TinyConfig.sdxl()
    unet = sdxl["unet"]
    widths = sdxl["text_encoder"].config.hidden_size + sdxl["text_encoder_2"].config.hidden_size
    assert widths == unet.config.cross_attention_dim == config.cross_attention_dim
    assert unet.config.addition_embed_type == "text_time"
    assert list(unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    tokens, pooled = torch.randn(2, 77, widths), torch.randn(2, sdxl["text_encoder_2"].config.projection_dim)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 8, 8)


def test_vae_downsamples_by_8_like_sdxls(sdxl):
    with torch.no_grad():
        latents = sdxl["vae"].encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    assert sdxl["vae"].config.scaling_factor == 0.13025


def test_sd_shaped_stack_has_one_text_encoder_and_no_text_time():
    sd = tiny_components("sd", seed=0)
    assert sd["text_encoder_2"] is None and sd["tokenizer_2"] is None
    assert sd["unet"].config.addition_embed_type is None
    assert sd["text_encoder"].config.hidden_size == sd["unet"].config.cross_attention_dim


def test_tiny_identitynet_has_nonzero_output_convolutions(sdxl):
    net = sdxl["controlnet"]
    assert all(block.weight.abs().sum() > 0 for block in net.controlnet_down_blocks)
    assert net.controlnet_mid_block.weight.abs().sum() > 0


def test_tiny_pipeline_has_the_adapter_installed():
    pipe = tiny_pipeline("sdxl", embedding_dim=512)
    assert pipe.has_identity_attention
    assert pipe.image_proj.config.embedding_dim == 512
    assert pipe.image_proj.config.output_dim == pipe.unet.config.cross_attention_dim


def test_unknown_kind_is_an_input_error():
    from instantid_lab.errors import InputError

    with pytest.raises(InputError, match="sdxl"):
        tiny_components("flux")
