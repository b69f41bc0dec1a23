"""BERT / MiniLM weight import against HF transformers' PyTorch BertModel on the same weights."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_reference import assert_activations_follow_hf, randomized
from mmjax.encoders.base import ENCODERS
from mmjax.encoders.text import BertEncoder
from mmjax.layers.embeddings import LearnedPositions
from mmjax.transfer.bert import blank_module, export_bert, import_bert, load_bert, save_bert
from mmjax.transfer.io import WeightMismatchError, read_safetensors, write_safetensors
from mmjax.transfer.minilm import encode_sentences, load_minilm, minilm_path

IDS = np.array([[2, 17, 33, 91, 5, 3, 0, 0, 0],
                [2, 45, 3, 0, 0, 0, 0, 0, 0],
                [2, 9, 8, 7, 6, 5, 4, 99, 3]], np.int64)
MASK = IDS != 0
TYPES = np.array([[0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1]])
# Parameter std by the first key in the HF name (else 0.3), chosen so that LayerNorm inputs have
# a small variance (~1e-3): embeddings of HF's std 0.02 for the embedding LayerNorm; a small
# attention-LayerNorm gain and feed-forward output for each output LayerNorm, whose input is
# their sum. eps 1e-6 instead of 1e-12 then moves every hidden state by > 1e-4. The large
# feed-forward input weights bring the GELU's inputs back to O(1), where its forms differ.
STDS = {"_embeddings": 0.02, "attention.output.dense": 0.3, "intermediate.dense.weight": 6.0,
        "output.dense": 0.003, "pooler": 0.1}
LN_GAINS = {"attention.output.LayerNorm": 0.03}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random HF BertModel (every weight random, LayerNorms included), saved."""
  cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=128, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
  folder = tmp_path_factory.mktemp("tiny_bert")
  randomized(transformers.BertModel(cfg), STDS, LN_GAINS).save_pretrained(folder)
  return folder


def _hf_model(folder):
  return transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()


def _torch_run(model, ids=IDS, mask=MASK, types=TYPES):
  """(hidden states (depth + 1 arrays (B, L, D)), pooler output (B, D)) of an HF BertModel."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                token_type_ids=torch.from_numpy(types), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states], out.pooler_output.numpy()


def _torch_outputs(folder, ids=IDS, mask=MASK, types=TYPES):
  return _torch_run(_hf_model(folder), ids, mask, types)


@nnx.jit
def _hidden(model, ids, mask, types):
  return model(ids, mask, types, return_hidden=True)


def _run(model, ids=IDS, mask=MASK, types=TYPES):
  out, hidden = _hidden(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool),
                        jnp.asarray(types, jnp.int32))
  return [np.asarray(h) for h in hidden], np.asarray(out.pooled)


def _params(model):
  return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_follows_hf_config(model, cfg):
  """Every LayerNorm's eps, every feed-forward activation and the position scheme are HF's."""
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LayerNorm)]
  assert len(norms) == 1 + 2 * cfg.num_hidden_layers  # embeddings, then 2 per layer
  assert [m.epsilon for m in norms] == [cfg.layer_norm_eps] * len(norms)
  assert len(model.encoder.layers) == cfg.num_hidden_layers
  assert_activations_follow_hf(model.encoder.layers, cfg.hidden_act)
  # transformers 5's BertConfig drops the field unless config.json has it; absolute is all it runs.
  assert getattr(cfg, "position_embedding_type", "absolute") == "absolute"
  assert isinstance(model.position_embed, LearnedPositions)
  assert model.position_embed.embedding.shape == (cfg.max_position_embeddings, cfg.hidden_size)
  assert model.type_embed.embedding.shape == (cfg.type_vocab_size, cfg.hidden_size)


def test_hidden_states_and_pooler_match_torch(hf_dir):
  model = load_bert(hf_dir)
  assert model.spec.dropout == 0.0 and model.spec.max_len == 128 and model.pool == "pooler"
  ours, pooled = _run(model)
  ref_model = _hf_model(hf_dir)
  ref, ref_pooled = _torch_run(ref_model)
  assert len(ours) == len(ref) == 3
  for i, (a, b) in enumerate(zip(ours, ref)):  # every position, padded ones included
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"hidden state {i}")
  np.testing.assert_allclose(pooled, ref_pooled, atol=1e-5, rtol=0)
  # The weights make eps matter: HF's own model with eps 1e-6 moves every output by > 1e-4.
  for m in ref_model.modules():
    if isinstance(m, torch.nn.LayerNorm):
      m.eps = 1e-6
  moved, moved_pooled = _torch_run(ref_model)
  assert min(np.abs(a - b).max() for a, b in zip(moved + [moved_pooled], ref + [ref_pooled])) > 1e-4


def test_a_checkpoint_pooler_is_left_out_of_an_encoder_without_one(hf_dir, caplog):
  """bert-base-uncased ships its pooler; an encoder built without one (a token-level question
  encoder) takes the rest, and the log names what it left."""
  with caplog.at_level(logging.INFO, logger="mmjax.transfer.io"):
    model = load_bert(hf_dir, pooler=False)
  assert model.pooler is None
  assert "not loading the checkpoint's pooler (pooler.dense.weight, pooler.dense.bias)" in caplog.text
  ours, _ = _run(model)
  ref, _ = _torch_outputs(hf_dir)
  for i, (a, b) in enumerate(zip(ours, ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"hidden state {i}")


def test_built_module_follows_the_hf_config(hf_dir, tmp_path):
  _assert_follows_hf_config(load_bert(hf_dir), transformers.BertConfig.from_pretrained(hf_dir))
  # Another position scheme is refused, not loaded as absolute positions.
  cfg = json.loads((hf_dir / "config.json").read_text())
  cfg["position_embedding_type"] = "relative_key"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  os.symlink(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
    load_bert(tmp_path)


def test_import_export_import_is_bitwise(hf_dir, tmp_path):
  tensors = read_safetensors(hf_dir)
  model = load_bert(hf_dir)
  exported = export_bert(model)
  assert set(exported) == set(tensors) - {"embeddings.position_ids"}
  for k, v in exported.items():
    assert v.dtype == tensors[k].dtype and np.array_equal(v, tensors[k]), k
  save_bert(model, tmp_path)
  again = load_bert(tmp_path)
  first, second = _params(model), _params(again)
  assert first.keys() == second.keys()
  assert all(np.array_equal(first[k], second[k]) for k in first)
  # transformers reads the saved folder back, and computes the same thing.
  (*_, last), pooled = _torch_outputs(tmp_path)
  (*_, orig_last), orig_pooled = _torch_outputs(hf_dir)
  np.testing.assert_array_equal(last, orig_last)
  np.testing.assert_array_equal(pooled, orig_pooled)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertModel"]


def test_prefixed_and_legacy_names_load(hf_dir, tmp_path):
  tensors = read_safetensors(hf_dir)
  legacy = {}
  for k, v in tensors.items():
    k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    legacy["bert." + k] = v
  legacy["cls.predictions.bias"] = np.zeros(100, np.float32)  # a pre-training head, left out
  write_safetensors(tmp_path / "model.safetensors", legacy)
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  a, b = _params(load_bert(tmp_path)), _params(load_bert(hf_dir))
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_mismatches_are_named(hf_dir):
  tensors = read_safetensors(hf_dir)
  model = blank_module(lambda r: BertEncoder("tiny", vocab_size=100, rngs=r), nnx.Rngs(0))
  before = _params(model)
  broken = dict(tensors)
  del broken["encoder.layer.1.intermediate.dense.bias"]
  broken["encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 31), np.float32)
  broken["encoder.layer.7.output.dense.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(WeightMismatchError) as err:
    import_bert(model, broken)
  msg = str(err.value)
  assert "missing tensors (1): encoder.layer.1.intermediate.dense.bias" in msg
  assert "encoder.layer.0.attention.self.key.weight: got (31, 32)" in msg
  assert "unexpected tensors (1): encoder.layer.7.output.dense.weight" in msg
  after = _params(model)
  assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing was assigned
  with pytest.raises(WeightMismatchError, match=r"word_embeddings.weight: got \(100, 32\)"):
    import_bert(blank_module(lambda r: BertEncoder("tiny", rngs=r), nnx.Rngs(0)), tensors)  # vocab 1000


def test_pickle_files_are_refused(hf_dir, tmp_path):
  state = transformers.BertModel.from_pretrained(hf_dir).state_dict()
  torch.save(state, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  with pytest.raises(ValueError, match="refusing"):
    load_bert(tmp_path / "pytorch_model.bin")
  os.replace(tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="refusing"):
    load_bert(tmp_path)


SENTENCES = [
    "A man is playing a guitar.",
    "hello",
    "Hello!",
    "The quick brown fox jumps over the lazy dog.",
    "Two dogs are running through a field of tall grass while their owner watches from the porch.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I can't believe it's not butter!!!",
    "3.14159 is approximately pi, and 2.71828 is e.",
    "The meeting is at 10:30 a.m. on 2024-05-17 in room 4B.",
    "Call me at +1 (555) 123-4567.",
    "Price: $1,299.99 (tax incl.)",
    "e-mail: someone@example.com; web: https://example.org/path?q=1&x=2",
    "naïve café résumé — coöperate",
    "Straße, Übermut, Ärger, Ölkanne",
    "東京は日本の首都です。",
    "北京欢迎你",
    "Привет, как дела?",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "emoji test 😀🎉👍",
    "¿Dónde está la biblioteca?",
    "C'est la vie.",
    "#hashtag @mention",
    "...",
    "?!?!",
    "a",
    "1 2 3 4 5 6 7 8 9 10",
    "The red square is to the left of the blue circle.",
    "Is there a green object closer to the yellow circle than to the gray square?",
    "How many objects have the same shape as the orange one?",
    "A picture of a cat sitting on a windowsill in the afternoon sun.",
    "Cats are independent animals.",
    "The stock market fell sharply on Monday after the announcement.",
    "Investors reacted negatively to the central bank's decision to raise interest rates.",
    "Machine learning models can be trained on large datasets.",
    "JAX transforms numerical functions: grad, jit, vmap and pmap.",
    "def f(x): return x ** 2 + 1",
    "SELECT * FROM users WHERE id = 42;",
    "ALL CAPS SENTENCE WITH SHOUTING",
    "mIxEd CaSe TeXt",
    "   leading and trailing spaces   ",
    "tab\tseparated\tvalues",
    "line one\nline two",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "The year 1999 was followed by 2000, then 2001.",
    "She said, \"Don't go there,\" and left.",
    "It's 25°C outside — perfect weather for a walk.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The mitochondria is the powerhouse of the cell.",
    "Shakespeare wrote Hamlet around 1600.",
    "The children were playing football in the park.",
    "Kids play soccer outdoors.",
    ("This is a deliberately long sentence that keeps going with many clauses, commas, and "
     "subordinate phrases so that it produces far more word pieces than the others, which tests "
     "the handling of longer sequences, including positions well beyond the first few dozen, and "
     "it continues further still, describing nothing in particular but providing plenty of tokens "
     "for the encoder to attend over before it finally, mercifully, comes to an end."),
    "",
]
LONG = ["short one", " ".join(f"token{i % 7}" for i in range(300))]  # truncated to 256 word pieces


def _torch_mean_pooled(model, tokenizer, sentences):
  enc = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
  with torch.no_grad():
    last = model(**enc).last_hidden_state
  m = enc["attention_mask"].unsqueeze(-1).float()
  return ((last * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy(), enc["input_ids"].shape[1]


@pytest.fixture(scope="module")
def minilm():
  """(all-MiniLM-L6-v2 as a `BertEncoder`, its tokenizer, HF's BertModel of the same folder)."""
  model, tokenizer = load_minilm()
  return model, tokenizer, _hf_model(minilm_path())


def test_minilm_hidden_states_and_sentence_embeddings_match_torch(minilm):
  model, tokenizer, ref_model = minilm
  assert model.pool == "mean" and model.spec.hidden == 384 and model.spec.depth == 6
  # The tokenizer really read the vocabulary (bert-base-uncased ids), offline.
  assert tokenizer("Hello world")["input_ids"] == [101, 7592, 2088, 102]
  assert len(SENTENCES) >= 50
  # The batch encode_sentences makes: padded to a multiple of 16.
  enc = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, pad_to_multiple_of=16,
                  return_tensors="np")
  ids, mask, types = enc["input_ids"], enc["attention_mask"].astype(bool), enc["token_type_ids"]
  ref, _ = _torch_run(ref_model, ids, mask, types)
  ours, _ = _run(model, ids, mask, types)
  assert len(ours) == len(ref) == 7
  for i, (a, b) in enumerate(zip(ours, ref)):
    np.testing.assert_allclose(a[mask], b[mask], atol=1e-5, rtol=0, err_msg=f"hidden state {i}")
    # Padding after short rows is ill-conditioned: float32 torch is up to 2.1e-4 off float64 there.
    np.testing.assert_allclose(a[~mask], b[~mask], atol=5e-4, rtol=0,
                               err_msg=f"hidden state {i} (padding)")
  m = mask[..., None]
  ref_mean = (ref[-1] * m).sum(1) / m.sum(1)  # sentence-transformers' mean pooling
  ours = encode_sentences(model, tokenizer, SENTENCES, normalize=False)
  assert ours.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(ours, ref_mean, atol=1e-5, rtol=0)
  # Truncation to max_len, and L2 normalisation as sentence-transformers' Normalize module.
  ref_long, width = _torch_mean_pooled(ref_model, tokenizer, LONG)
  assert width == 256
  unit = encode_sentences(model, tokenizer, LONG)
  np.testing.assert_allclose(unit, ref_long / np.linalg.norm(ref_long, axis=1, keepdims=True),
                             atol=1e-5, rtol=0)
  # Paraphrases are closer than unrelated sentences (the embedding is a meaningful one).
  unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
  kids, football, cats = (SENTENCES.index(s) for s in (
      "Kids play soccer outdoors.", "The children were playing football in the park.",
      "Cats are independent animals."))
  assert unit[kids] @ unit[football] > unit[kids] @ unit[cats] + 0.2
  built = ENCODERS.build("minilm")
  assert isinstance(built, BertEncoder) and built.pool == "mean"
  np.testing.assert_array_equal(built.word_embed.embedding[...], model.word_embed.embedding[...])


def test_minilm_follows_the_hf_config(minilm):
  _assert_follows_hf_config(minilm[0], transformers.BertConfig.from_pretrained(minilm_path()))
