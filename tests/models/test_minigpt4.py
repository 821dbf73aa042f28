"""MiniGPT-4 assembled from its parts (HF BLIP-2 dir, HF Llama dir, projection file) -> package ->
torch-free chat, token for token against the same composition in PyTorch with transformers.

The reference follows the official demo (`minigpt4/conversation/conversation.py`,
`MiniGPTBase.get_context_emb`): the conversation rendered as one string, split at <ImageHere>, the
first piece tokenised with the tokenizer's specials and the rest without, the image's embeddings
between them, then `LlamaForCausalLM.generate(inputs_embeds=...)` and the answer cut at "###".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE, PATCH, WIDTH, QUERIES, QHIDDEN, LM_HIDDEN, VOCAB = 32, 8, 32, 4, 24, 48, 160
SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
WORDS = [f"t{i}" for i in range(40)]


def official_prompt(variant: str, question: str, history: tuple[tuple[str, str], ...] = ()) -> str:
    """The demo's Conversation.get_prompt() for one image: earlier (question, answer) turns, then
    `question` (sep / roles per variant; the image joins the first question after a space)."""
    sep, roles = (
        ("###", ("Human: ", "Assistant: ")) if variant == "vicuna" else ("", ("<s>[INST] ", " [/INST] "))
    )
    questions = [q for q, _ in history] + [question]
    questions[0] = "<Img><ImageHere></Img> " + questions[0]
    messages = [m for q, (_, a) in zip(questions, history) for m in ((roles[0], q), (roles[1], a))]
    messages += [(roles[0], questions[-1]), (roles[1], None)]
    return SYSTEM + sep + "".join(role + msg + sep if msg else role for role, msg in messages)


def official_items(tokenizer_file: Path, prompt: str) -> list[int | None]:
    """get_context_emb's tokens: the pieces around <ImageHere>, specials added to the first only."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    before, after = (
        tok.encode(s, add_special_tokens=i == 0).ids for i, s in enumerate(prompt.split("<ImageHere>"))
    )
    return [*before, None, *after]


def _tokenizer(path: Path) -> None:
    """A word-level tokenizer that adds BOS as a Llama tokenizer does; '<s>' in text is BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    split = pre_tokenizers.Whitespace()
    words: list[str] = []
    for variant in ("vicuna", "llama2"):
        for seg in official_prompt(variant, " ".join(WORDS)).replace("<s>", " ").split("<ImageHere>"):
            words += [w for w, _ in split.pre_tokenize_str(seg) if w not in words]
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The three parts on disk, and the PyTorch models they hold."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("minigpt4")
    torch.manual_seed(0)
    blip2 = transformers.Blip2ForConditionalGeneration(
        transformers.Blip2Config(
            vision_config={
                "hidden_size": WIDTH,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": SIZE,
                "patch_size": PATCH,
                "initializer_range": 0.2,
            },
            qformer_config={
                "hidden_size": QHIDDEN,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 48,
                "vocab_size": 50,
                "initializer_range": 0.2,
            },
            text_config={
                "model_type": "opt",
                "vocab_size": 50,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "ffn_dim": 32,
                "num_attention_heads": 2,
                "word_embed_proj_dim": 16,
            },
            num_query_tokens=QUERIES,
        )
    ).eval()
    with torch.no_grad():
        blip2.query_tokens.normal_(0, 1.0)
    blip2.save_pretrained(root / "blip2")
    transformers.BlipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(root / "blip2")

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=LM_HIDDEN,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=0.3,
        )
    ).eval()
    llama.save_pretrained(root / "llama")
    _tokenizer(root / "llama" / "tokenizer.json")

    projections = {}
    for variant, width_in in (("vicuna", QHIDDEN), ("llama2", 4 * WIDTH)):
        proj = torch.nn.Linear(width_in, LM_HIDDEN).eval()
        with torch.no_grad():
            proj.weight.normal_(0, 0.5)
        state = {f"llama_proj.{k}": v.detach().clone() for k, v in proj.state_dict().items()}
        save_file(state, str(root / f"{variant}.safetensors"))
        torch.save({"model": state}, root / f"{variant}.pth")  # the released layout
        projections[variant] = proj
    return {"root": root, "blip2": blip2, "llama": llama, "proj": projections}


def _assemble_args(root: Path, variant: str, projection: str, out: Path) -> list[str]:
    return [
        "assemble", "minigpt4", "--variant", variant, "--vision", str(root / "blip2"),
        "--llm", str(root / "llama"), "--projection", str(root / projection), "--out", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module", params=["vicuna", "llama2"])
def package(request: pytest.FixtureRequest, parts: dict) -> tuple[str, object]:
    from mmedge import sdk
    from mmedge.sdk.cli import main

    variant, root = request.param, parts["root"]
    out = root / f"pkg-{variant}"
    assert main(_assemble_args(root, variant, f"{variant}.safetensors", out)) == 0
    return variant, sdk.Pipeline(str(out))


def _reference(
    parts: dict, variant: str, image: np.ndarray, question: str
) -> tuple[list, torch.Tensor, list[int]]:
    """(prompt items with None for the image, image embeddings, greedy tokens) in PyTorch."""
    from PIL import Image

    blip2, llama, proj = parts["blip2"], parts["llama"], parts["proj"][variant]
    items = official_items(parts["root"] / "llama" / "tokenizer.json", official_prompt(variant, question))
    pixels = transformers.BlipImageProcessor(size={"height": SIZE, "width": SIZE})(
        Image.fromarray(image), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        feats = blip2.vision_model(pixel_values=pixels).last_hidden_state
        if variant == "vicuna":
            queries = blip2.query_tokens.expand(feats.shape[0], -1, -1)
            feats = blip2.qformer(query_embeds=queries, encoder_hidden_states=feats).last_hidden_state
        else:  # the official encode_img: drop CLS, view (bs, pn / 4, hs * 4)
            bs, pn, hs = feats[:, 1:].shape
            feats = feats[:, 1:].reshape(bs, pn // 4, hs * 4)
        image_embeds = proj(feats)
        inputs = _with_image(
            items, image_embeds[0], lambda ids: llama.get_input_embeddings()(torch.tensor(ids))
        )
        out = llama.generate(
            inputs_embeds=inputs[None], attention_mask=torch.ones((1, len(inputs)), dtype=torch.long),
            max_new_tokens=20, do_sample=False,
        )[0].tolist()  # fmt: skip
    if out and out[-1] == llama.config.eos_token_id:
        out = out[:-1]
    return items, image_embeds[0], out


def _with_image(items: list, image: Any, embed: Any) -> Any:
    """Token embeddings of the ids before and after the image slot, the image's embeddings between."""
    at = items.index(None)
    parts = [embed(items[:at]), image, embed(items[at + 1 :])]
    return torch.cat(parts) if isinstance(image, torch.Tensor) else np.concatenate(parts)


def _image(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((40, 57, 3)) * 255).astype(np.uint8)


def test_manifest(package) -> None:
    variant, pipe = package
    m = pipe.runner.manifest
    assert (m.family, m.variant, m.task) == ("minigpt4", variant, "chat")
    image_path = [s.component for s in m.pipeline.paths["image"].steps]
    assert image_path == (
        ["vision", "qformer", "projector"] if variant == "vicuna" else ["vision", "projector"]
    )
    assert m.pipeline.image_tokens.count == (QUERIES if variant == "vicuna" else (SIZE // PATCH) ** 2 // 4)
    assert m.prompt.stop_strings == ("###",)
    assert m.preprocess.resize == "exact" and m.preprocess.image_size == SIZE
    assert m.provenance.source["kind"] == "assembled"


@pytest.mark.parametrize("seed", [2, 3])
def test_chat_matches_transformers(package, parts: dict, seed: int) -> None:
    from mmedge.runtime.generation import GenerationConfig

    variant, pipe = package
    image = _image(seed)
    question = " ".join(np.random.default_rng(seed).choice(WORDS, 3 + seed))
    items, image_embeds, ref = _reference(parts, variant, image, question)
    assert len(ref) >= 3  # a random LM that stops at once would prove little
    # the prompt, token for token as the official demo builds it
    assert pipe.prompts.encode(pipe.prompts.conversation([], question)) == items
    _, prefix = pipe.image_prefix(image)
    assert np.abs(prefix - image_embeds.numpy()).max() < 1e-4
    # greedy tokens from the package's own embeddings of that prompt
    embeds = _with_image(items, prefix, lambda ids: pipe.lm.embed(np.array([ids]))[0])
    assert list(pipe.lm.generate_ids(embeds, GenerationConfig(max_new_tokens=20))) == ref
    # and the whole chat call: the answer cut at the demo's "###"
    text = pipe.lm.tokenizer.decode(ref)
    expected = text[: text.find("###")] if "###" in text else text
    assert pipe.chat(image, question, max_new_tokens=20) == expected


def test_later_turns_render_as_the_demo(package, parts: dict) -> None:
    """Two earlier turns: the whole conversation and a turn appended to a kept cache, as the demo."""
    variant, pipe = package
    history = (("t1 t2", "t3 t4"), ("t5", "t6 t7 t8"))
    items = official_items(
        parts["root"] / "llama" / "tokenizer.json", official_prompt(variant, "t9", history)
    )
    assert pipe.prompts.encode(pipe.prompts.conversation(history, "t9")) == items
    # a kept cache holds the earlier turns and the last answer; only the new turn is appended
    earlier = official_items(
        parts["root"] / "llama" / "tokenizer.json", official_prompt(variant, "t5", history[:1])
    )
    answer = pipe.lm.tokenizer.encode(" t6 t7 t8", add_special_tokens=False)
    assert earlier + answer + pipe.prompts.encode(pipe.prompts.next_turn("t9")) == items


def test_pickle_projection_needs_allow_pickle(parts: dict, tmp_path: Path) -> None:
    from mmedge.errors import UnsupportedError
    from mmedge.models.registry import Parts, get_family

    root = parts["root"]
    fam = get_family("minigpt4")

    def assemble(**kw):
        return fam.assemble(Parts("llama2", root / "blip2", root / "llama", root / "llama2.pth", **kw))

    with pytest.raises(UnsupportedError, match="pickle"):
        assemble()
    model = assemble(allow_pickle=True).model  # read with weights_only=True from the released layout
    assert torch.equal(model.llama_proj.weight, parts["proj"]["llama2"].weight)
    from mmedge.sdk.cli import main

    assert main(_assemble_args(root, "llama2", "llama2.pth", tmp_path / "pkg")) == 1
    assert not (tmp_path / "pkg").exists()


def test_wrong_projection_width_is_refused(parts: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmedge.errors import ConfigError
    from mmedge.models.registry import Parts, get_family

    root = parts["root"]
    fam = get_family("minigpt4")
    # the vicuna projection (Q-Former width) given for the llama2 variant (4 x ViT width)
    with pytest.raises(ConfigError, match=rf"reads {QHIDDEN} features.*gives {4 * WIDTH}"):
        fam.assemble(Parts("llama2", root / "blip2", root / "llama", root / "vicuna.safetensors"))
    wide = tmp_path / "wide.safetensors"
    save_file(
        {
            "llama_proj.weight": torch.zeros(LM_HIDDEN + 8, QHIDDEN),
            "llama_proj.bias": torch.zeros(LM_HIDDEN + 8),
        },
        str(wide),
    )
    with pytest.raises(ConfigError, match=rf"writes {LM_HIDDEN + 8} features.*embeds tokens in {LM_HIDDEN}"):
        fam.assemble(Parts("vicuna", root / "blip2", root / "llama", wide))
    extra = tmp_path / "extra.safetensors"
    save_file(
        {
            "llama_proj.weight": torch.zeros(LM_HIDDEN, QHIDDEN),
            "llama_proj.bias": torch.zeros(LM_HIDDEN),
            "lora_A": torch.zeros(2),
        },
        str(extra),
    )
    with pytest.raises(ConfigError, match="lora_A"):
        fam.assemble(Parts("vicuna", root / "blip2", root / "llama", extra))


def test_assemble_refuses_other_families_and_variants(parts: dict, tmp_path: Path, capsys) -> None:
    from mmedge.sdk.cli import main

    root = parts["root"]
    args = _assemble_args(root, "vicuna", "vicuna.safetensors", tmp_path / "pkg")
    assert main([args[0], "blip2", *args[2:]]) == 1
    assert "not assembled from parts" in capsys.readouterr().err
    assert main([*args[:3], "v2", *args[4:]]) == 1
    assert "'v2' is not one of" in capsys.readouterr().err
