"""HF InstructBlipForConditionalGeneration (Llama and OPT LMs) -> mmedge export -> torch-free chat.

Parity is against transformers: `save_pretrained` of a small random model with its whole
InstructBlipProcessor (a BERT WordPiece Q-Former tokenizer in `qformer_tokenizer/`), then
`generate` on the processor's inputs for the same image file, token for token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS, QUERIES, SIZE, QF_POSITIONS = 108, 4, 32, 24
IMAGE_ID = WORDS  # the processor appends "<image>" to the LM tokenizer: every LM id is a token
SPECIAL_IDS = (0, 1, 2, IMAGE_ID)  # pad, eos, bos, image: dropped when decoding
QF_WORDS = ["what", "is", "the", "colour", "of", "circle", "describe", "image", "a", "short", "description"]


def _qformer_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A tiny BERT-style (uncased WordPiece) tokenizer, as InstructBLIP's Q-Former uses."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate([*specials, *QF_WORDS, *"?.:,", *(f"w{i}" for i in range(20))])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    return transformers.BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _lm_tokenizer(bos: bool) -> transformers.PreTrainedTokenizerFast:
    """Whitespace words t0..t107 (pad t0, eos t1, bos t2); with `bos`, encoding prepends BOS as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(WORDS)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="t2 $A", special_tokens=[("t2", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t3", bos_token="t2", eos_token="t1", pad_token="t0"
    )


TEXT_CONFIGS = {
    "llama": {
        "model_type": "llama",
        "vocab_size": WORDS + 1,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "initializer_range": 0.3,
        "tie_word_embeddings": False,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
    "opt": {
        "model_type": "opt",
        "vocab_size": WORDS + 1,
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "ffn_dim": 96,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "word_embed_proj_dim": 48,
        "init_std": 0.3,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
}


def _write_hf(root: Path, variant: str) -> tuple[object, object]:
    torch.manual_seed(0)
    vc = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": SIZE,
        "patch_size": 8,
        "qkv_bias": True,
        "initializer_range": 0.2,
    }
    qc = {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "cross_attention_frequency": 2,
        "vocab_size": 64,
        "max_position_embeddings": QF_POSITIONS,
        "initializer_range": 0.2,
    }
    cfg = transformers.InstructBlipConfig(
        vision_config=vc,
        qformer_config=qc,
        text_config=TEXT_CONFIGS[variant],
        num_query_tokens=QUERIES,
        image_token_index=IMAGE_ID,
    )
    hf = transformers.InstructBlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init leaves the image path tiny; make image and instruction matter
        hf.query_tokens.normal_(0, 1.0)
        hf.language_projection.weight.normal_(0, 0.5)
        hf.qformer.embeddings.word_embeddings.weight.normal_(0, 1.0)
    proc = transformers.InstructBlipProcessor(
        image_processor=transformers.BlipImageProcessor(size={"height": SIZE, "width": SIZE}),
        tokenizer=_lm_tokenizer(bos=variant == "llama"),
        qformer_tokenizer=_qformer_tokenizer(),
        num_query_tokens=QUERIES,
    )
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    hf.save_pretrained(root)
    proc.save_pretrained(root)
    return hf, proc


@pytest.fixture(scope="module", params=["llama", "opt"])
def instructblip(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from mmedge import sdk
    from mmedge.export.exporter import export_model

    root = tmp_path_factory.mktemp(f"instructblip-{request.param}")
    hf, proc = _write_hf(root / "src", request.param)
    export_model(root / "src", root / "pkg")
    return request.param, hf, proc, sdk.Pipeline(str(root / "pkg")), root


def _image(root: Path, seed: int) -> str:
    from PIL import Image

    path = root / f"image{seed}.png"
    Image.fromarray((np.random.default_rng(seed).random((40, 57, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def test_components_and_manifest(instructblip) -> None:
    variant, _, _, pipe, _ = instructblip
    m = pipe.runner.manifest
    assert m.family == "instructblip" and m.variant == variant and m.task == "chat"
    assert sorted(m.components) == ["embed", "llm", "projector", "qformer", "vision"]
    steps = m.pipeline.paths["image"].steps
    assert [s.component for s in steps] == ["vision", "qformer", "projector"]
    assert steps[1].inputs == {
        "image_embeds": "image_embeds",
        "qformer_input_ids": "qformer_input_ids",
        "qformer_attention_mask": "qformer_attention_mask",
    }
    assert m.reads_instruction()
    # the Q-Former's own tokenizer is a second hashed file, as long as its position table
    t = m.instruction_tokenizer
    assert t is not None and t.file in m.files and t.context_length == QF_POSITIONS and t.pad_id == 0
    assert m.components["qformer"].dims["instruction"].max == QF_POSITIONS
    # the raw instruction after the queries; BOS where the LM tokenizer adds one (Llama here)
    bos = "{bos}" if variant == "llama" else ""
    assert m.prompt.first_turn == "{image}" + bos + "{prompt}"
    # parity covered real, padded instructions: one feed more than the two random ones
    parity = m.components["qformer"].precisions["fp32"].parity
    assert parity["passed"] and parity["samples"] == 3


def _hf_generate(hf, proc, image: str, question: str, n: int):
    from PIL import Image

    inputs = proc(images=Image.open(image).convert("RGB"), text=question, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, do_sample=False)
        logits = hf(**inputs).logits[0, -1].numpy()
    return inputs, out[0, inputs["input_ids"].shape[1] :].tolist(), logits


def test_chat_matches_transformers_generate(instructblip) -> None:
    """An image file and a question: the processor's inputs + HF generate == Pipeline.chat (greedy,
    20 tokens), and the prefill's last logits agree within 1e-3."""
    _, hf, proc, pipe, root = instructblip
    lm = pipe.lm
    for seed, question in enumerate(["what is the colour of the circle?", "Describe the image, w3 w7."]):
        image = _image(root, seed)
        inputs, ref, ref_logits = _hf_generate(hf, proc, image, question, 20)
        answer = pipe.chat(image, question, max_new_tokens=20)
        assert answer == lm.tokenizer.decode(ref)
        # every id but the specials is its own word: the same tokens, not only the same text
        assert lm.tokenizer.encode(answer, add_special_tokens=False) == [
            i for i in ref if i not in SPECIAL_IDS
        ]
        assert len(ref) == 20 or ref[-1] == 1  # 20 tokens, or HF stopped at EOS (and so did chat)
        # the prompt is HF's: the queries' slot, then the raw instruction (BOS where the LM adds one)
        hf_ids = inputs["input_ids"][0].tolist()
        assert hf_ids[:QUERIES] == [IMAGE_ID] * QUERIES
        items = pipe.prompts.encode(pipe.prompts.conversation((), question))
        assert items == [None, *hf_ids[QUERIES:]]
        _, prefix = pipe.image_prefix(image, "RGB", question)
        embeds = np.concatenate([prefix, lm.embed(np.array([hf_ids[QUERIES:]]))[0]])
        logits = lm.forward(embeds[None], lm.new_cache())[0][-1]
        assert np.abs(logits - ref_logits).max() < 1e-3


def test_the_instruction_reaches_the_qformer(instructblip) -> None:
    """Different instructions, same image: different image embeddings (cached apart), each equal to
    HF's query output projected into the LM."""
    _, hf, proc, pipe, root = instructblip
    from PIL import Image

    image = _image(root, 3)
    prefixes = {}
    for question in ("what is the colour of the circle?", "describe the image."):
        key, prefixes[question] = pipe.image_prefix(image, "RGB", question)
        inputs = proc(images=Image.open(image).convert("RGB"), text=question, return_tensors="pt")
        with torch.no_grad():
            ref = hf.get_image_features(
                inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
            ).pooler_output[0]
        assert np.abs(prefixes[question] - ref.numpy()).max() < 1e-4
    a, b = prefixes.values()
    assert np.abs(a - b).max() > 1e-2
    assert pipe.image_prefix(image, "RGB", "describe the image.")[0] == key  # cached by instruction too


def test_padded_instructions_match_unpadded(instructblip) -> None:
    """A batch of instructions of different lengths (right-padded) gives each one's own queries."""
    _, _, _, pipe, _ = instructblip
    r = pipe.runner
    feats = r.session("vision").run({"pixel_values": np.zeros((2, 3, SIZE, SIZE), np.float32)})[
        "image_embeds"
    ]
    ids, mask = r.instruction_tokenizer.encode_batch(["what is the colour of the circle?", "describe"])
    assert mask[1].sum() < mask.shape[1]  # the second one is padded
    both = r.session("qformer").run(
        {"image_embeds": feats, "qformer_input_ids": ids, "qformer_attention_mask": mask}
    )["query_output"]
    n = int(mask[1].sum())
    alone = r.session("qformer").run(
        {"image_embeds": feats[1:], "qformer_input_ids": ids[1:, :n], "qformer_attention_mask": mask[1:, :n]}
    )["query_output"]
    assert np.abs(both[1] - alone[0]).max() < 1e-4


def test_caption_multi_turn_and_bad_input(instructblip) -> None:
    from mmedge.errors import InvalidInputError

    _, _, _, pipe, root = instructblip
    image = _image(root, 4)
    assert pipe.caption(image, max_new_tokens=4, min_new_tokens=4)
    a1 = pipe.chat(image, "describe the image.", max_new_tokens=4, min_new_tokens=4)
    # a later turn keeps the first question's image embeddings: reusing the cache == recomputing
    a2 = pipe.chat(image, "t5 t6", history=[("describe the image.", a1)], max_new_tokens=4, min_new_tokens=4)
    from mmedge import sdk

    fresh = sdk.Pipeline(str(pipe.runner.package.root))
    again = fresh.chat(
        image, "t5 t6", history=[("describe the image.", a1)], max_new_tokens=4, min_new_tokens=4
    )
    assert again == a2
    # HF's processor does not truncate the Q-Former's text and its position table then fails;
    # here a question longer than the table is a typed error.
    long = " ".join(["circle"] * QF_POSITIONS)
    with pytest.raises(InvalidInputError, match=f"context of {QF_POSITIONS} tokens"):
        pipe.chat(image, long, max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="instruction"):
        pipe.runner.image_sources(np.zeros((1, 3, SIZE, SIZE), np.float32))
    with pytest.raises(InvalidInputError, match="sources"):
        pipe.runner.run_path("image", {"pixel_values": np.zeros((1, 3, SIZE, SIZE), np.float32)})


def test_hf_refuses_a_question_longer_than_the_qformer_positions(tmp_path: Path) -> None:
    """What the typed error mirrors: HF's processor passes the long text on, and the model fails."""
    hf, proc = _write_hf(tmp_path, "opt")
    from PIL import Image

    image = Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8))
    inputs = proc(images=image, text=" ".join(["circle"] * QF_POSITIONS), return_tensors="pt")
    assert inputs["qformer_input_ids"].shape[1] > QF_POSITIONS
    with pytest.raises((IndexError, RuntimeError)), torch.no_grad():
        hf.generate(**inputs, max_new_tokens=1)


def test_import_refuses_flan_t5() -> None:
    from mmedge.errors import UnsupportedError
    from mmedge.models.instructblip.hf import instructblip_config

    with pytest.raises(UnsupportedError, match="encoder-decoder"):
        instructblip_config({"text_config": {"model_type": "t5"}}, None)


def test_the_instruction_tokenizer_is_verified(instructblip, tmp_path: Path) -> None:
    """The second tokenizer is hashed like the first, and the manifest cannot drop or orphan it."""
    import json
    import shutil

    from mmedge.errors import IntegrityError
    from mmedge.runtime.package import verify_package

    _, _, _, pipe, _ = instructblip
    pkg = tmp_path / "pkg"
    shutil.copytree(pipe.runner.package.root, pkg)
    raw = json.loads((pkg / "manifest.json").read_text())
    dropped = {k: v for k, v in raw.items() if k != "instruction_tokenizer"}
    (pkg / "manifest.json").write_text(json.dumps(dropped))
    with pytest.raises(IntegrityError, match="instruction_tokenizer"):
        verify_package(pkg)
    (pkg / "manifest.json").write_text(json.dumps(raw))
    verify_package(pkg)
    with (pkg / "instruction_tokenizer.json").open("a") as f:
        f.write(" ")
    with pytest.raises(IntegrityError, match=r"instruction_tokenizer\.json"):
        verify_package(pkg)
