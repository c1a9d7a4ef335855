"""The offline tokenizer: word-level over the shapes world's vocabulary.

No hub is reachable on the build machines, so the embedded default builds its
tokenizer from the words the world can say (questions of every family, answers,
captions, the chat roles) with the ``tokenizers`` library, wraps it as a
``transformers.PreTrainedTokenizerFast`` and saves it with the base, so every run
tokenizes alike. A real run names a hub id or a local folder instead.
"""

from __future__ import annotations

import os

from engine.errors import InputError
from engine.world.config import FAMILIES, WorldConfig
from engine.world.families import make_sample
from engine.world.generate import sample_rng
from engine.world.render import COLOUR_NAMES, SHAPES, SIZES

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4 in this order
USER, ASSISTANT = "USER:", "ASSISTANT:"
# The base's caption instruction per caption style (BaseTrainConfig.caption_style).
CAPTION_PROMPTS = {
    "objects": "Describe the objects in the image.",
    "rows": "Describe the image row by row.",
}
_VOCAB_SAMPLES_PER_FAMILY = 300  # every template and name shows up many times over


def world_corpus(world: WorldConfig) -> list[str]:
    """Texts whose words make the world's vocabulary: questions of every family and the
    catalogues (colours, shapes and plurals, sizes, numbers 0..99, caption words)."""
    texts = [USER, ASSISTANT, *CAPTION_PROMPTS.values()]
    texts += ["yes no empty card showing Row in row column , . : ? !"]
    texts += [" ".join(COLOUR_NAMES), " ".join(SHAPES), " ".join(SIZES)]
    texts += [" ".join(s + ("es" if s.endswith("s") else "s") for s in SHAPES)]
    texts += [" ".join(str(n) for n in range(100))]
    for f in FAMILIES:
        for i in range(_VOCAB_SAMPLES_PER_FAMILY):
            rng = sample_rng(world.seed, f"vocab-{f}", i)
            s = make_sample(rng, world, f, "meadow")
            texts += [s.question, s.answer]
    return texts


def build_world_tokenizer(world: WorldConfig, max_length: int = 4096):
    """A word-level ``PreTrainedTokenizerFast``: lowercased words and punctuation marks,
    special tokens <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4; bos added first, as Llama's
    tokenizer does; llava-hf's chat template; ``max_length`` its model_max_length."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from engine.llava.chat import LLAVA_CHAT_TEMPLATE

    norm = normalizers.Lowercase()
    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in world_corpus(world):
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # bos first, as Llama's tokenizer adds it: the llava-hf template renders none
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",
        model_max_length=max_length,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def load_tokenizer(source: str):
    """A saved tokenizer folder or hub id -> ``PreTrainedTokenizerFast``.

    Raises:
        InputError: the folder is missing, or the tokenizer has no '<image>' or pad token.
    """
    from transformers import AutoTokenizer

    if source.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(source)):
        raise InputError(f"tokenizer folder not found: {source!r} (fix the path)")
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(source))
    except OSError as err:
        raise InputError(
            f"cannot load tokenizer {source!r}: {err}. Name a local folder, a reachable hub "
            "id, or tokenizer: world for the offline one"
        ) from None
    check_tokenizer(tok)
    return tok


def image_token_id(tokenizer) -> int:
    """Id of the '<image>' placeholder the LLaVA forward fills with image features."""
    tid = tokenizer.convert_tokens_to_ids(IMAGE)
    if tid is None or tid == tokenizer.unk_token_id:
        raise InputError(
            f"tokenizer {tokenizer.name_or_path!r} has no {IMAGE!r} token: add it "
            f"(tokenizer.add_special_tokens) and resize the model's embeddings"
        )
    return int(tid)


def check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer the chat formatting cannot use (no image, pad or eos token)."""
    image_token_id(tokenizer)
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the usual fix for Llama tokenizers
