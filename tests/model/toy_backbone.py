"""A toy Qwen2-VL folder the way a user has one on disk (``save_pretrained``), built offline.

``write_toy_qwen2vl(folder)`` writes a ``Qwen2VLForConditionalGeneration`` with random weights (hidden
32, 4 layers, 2 heads, 1 KV head, head_dim 16) and a byte-level BPE tokenizer made with the
``tokenizers`` library: Qwen's special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
the vision ones), no BOS, a Qwen-style chat template, saved as a ``PreTrainedTokenizerFast``.
"""
import os

import torch

import toy_data

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["a photo of a cat", "a photo of a dog", "goldfish", "tench", "great white shark", "red apple",
          "green tree", "blue sky", "user assistant system", "the quick brown fox jumps over the lazy dog"]
TEXT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, mrope_section=[2, 3, 3], max_position_embeddings=256)


def build_tokenizer():
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on a few lines, Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:], chat_template=CHAT_TEMPLATE)


def write_toy_qwen2vl(folder, seed: int = 0) -> str:
    """Writes the toy backbone + tokenizer into ``folder``; returns it."""
    from latteflow.text.backbones import build_backbone, tiny_qwen2vl_config

    tok = build_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    cfg = tiny_qwen2vl_config(None, vocab_size=len(tok), **TEXT, **ids)
    model = build_backbone(cfg, seed=seed)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return os.fspath(folder)


def load_toy(folder):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


TOY_CLASSES = list(toy_data.TOY_CLASSES)  # n01440764, n01443537, n01484850
TOY_PROMPTS = [toy_data.TOY_NAMES[c] for c in TOY_CLASSES]  # tench, goldfish, great white shark
write_toy_dcae = toy_data.write_toy_dcae  # one toy DC-AE (4x, 4 latent channels) for prepare and these fixtures


def write_toy_prepared(folder, vae_folder, per_class: int = 4, resolution: int = 16, seed: int = 0) -> str:
    """A prepare folder (two shards, the manifest) of DC-AE latents of random images, ``per_class`` per class."""
    from latteflow.core.files import weights_sha256
    from latteflow.data.shards import write_manifest, write_shard
    from latteflow.data.vae import DCAutoencoder

    ae = DCAutoencoder.from_pretrained(vae_folder, scaling_factor=0.5)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(TOY_CLASSES)).repeat_interleave(per_class)
    with torch.no_grad():
        latents = ae.encode(torch.rand(len(labels), 3, resolution, resolution, generator=g) * 2 - 1)
    os.makedirs(folder, exist_ok=True)
    half = len(labels) // 2
    shards = [write_shard(folder, 0, latents[:half], labels[:half]),
              write_shard(folder, 1, latents[half:], labels[half:])]
    write_manifest(folder, {
        "format": "latteflow-latents/1", "resolution": resolution, "latent_shape": list(latents.shape[1:]),
        "scaling_factor": 0.5, "flip": False, "dtype": "float32", "classes": TOY_CLASSES, "prompts": TOY_PROMPTS,
        "counts": [per_class] * len(TOY_CLASSES), "num_latents": len(labels), "shards": shards,
        "vae": {"folder": os.path.abspath(vae_folder), "sha256": weights_sha256(vae_folder)["sha256"]},
        "skipped": []})
    return os.fspath(folder)


def prepared_job(rank, world_size, out_dir, data, backbone):
    """One rank of the 2-rank gloo test: ``latteflow train --distributed`` on the prepare folder, then
    ``latteflow sample --distributed`` of its checkpoint (through their command-line mains)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from latteflow.evaluation import sample_ddp
    from latteflow.training import ddp

    rc = ddp.main(["--data", data, "--backbone", backbone, "--out", os.path.join(out_dir, "ddp"), "--steps", "2",
                   "--global-batch-size", "4", "--checkpoint-every", "2", "--num-groups", "2", "--lr", "1e-3",
                   "--backend", "reference", "--device", "cpu"])
    assert rc == 0, rc
    rc = sample_ddp.main(["--checkpoint", os.path.join(out_dir, "ddp", "step_00000002"), "--out",
                          os.path.join(out_dir, "samples"), "--per-class", "1", "--steps", "2", "--seed", "4",
                          "--batch-size", "2", "--device", "cpu"])
    assert rc == 0, rc
